"""Soak: a bounded run of mixed traffic against a real server, and nothing may grow.

    .venv/bin/python benchmarks/soak.py                    # ~20 minutes, one rank
    .venv/bin/python benchmarks/soak.py --minutes 5 --ulysses 2
    .venv/bin/python benchmarks/soak.py --minutes 5 --dp 2

Starts the tiny server on loopback with store caps, primes it (the largest request once, one
of each kind of traffic, a burst of bad requests), takes each rank's idle figures, then runs
`--clients` workers of mixed traffic for `--minutes`: synchronous and asynchronous creates with
random valid parameters (sizes, frames, steps, seeds, guidance on and off, last frames, step
cache presets, per-request adapters: two LoRAs registered, one, a scale, both or none;
`--no-adapters` leaves them out), `stream: true` jobs whose content is read while they decode
(to the end, or dropped after the first chunk), cancels, deletes, list pages, `Range`
downloads, thumbnails, event streams dropped after the first event, and bad requests, some in concurrent bursts. Every
`--sample-every` seconds it records each rank's resident memory, descriptors, threads, child
processes and mapped /dev/shm, and the data dir's bytes, the SQLite file's size and rows.

At the end it waits for every accepted job to end, lets the server settle, prints the figures,
writes JSON (`--out`) and a PNG (`--plot`), and exits 1 if a check fails:
  - resident memory after the warm-up grows by less than 5 % from its first to its last quarter;
  - descriptors, threads, child processes and mapped /dev/shm are back at their idle values;
  - no 5xx;
  - every accepted job ended completed, cancelled or failed with a reason (or was deleted by
    the soak, or evicted by the caps, as the server's log says): none lost;
  - the stored MP4s stay under `--max-stored-bytes` (plus the newest one, always kept) and the
    rows under `--max-stored-videos` plus the jobs that can be live.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bad_requests import invalid_requests  # noqa: E402
from conftest import png_bytes, rank_pids, raw_request, start_server  # noqa: E402
from resources import process_figures, shm_files  # noqa: E402
from soak_plot import write_plot  # noqa: E402
from soak_traffic import Traffic  # noqa: E402

RSS_GROWTH_LIMIT = 0.05
SETTLE_S = 30
MAX_QUEUE = 8
ADAPTER_VALUES = ["a", "b:0.5", "a:0.7,b:0.3", "none"]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # removed while the sample was taken (an expired job, a save)
        return 0


def data_dir_figures(data_dir: Path) -> dict:
    videos = [_size(p) for p in (data_dir / "videos").glob("*.mp4")]
    total = sum(_size(Path(root) / name) for root, _, names in os.walk(data_dir)
                for name in names)
    db = data_dir / "jobs.sqlite3"
    db_bytes = sum(_size(p) for p in data_dir.glob("jobs.sqlite3*"))
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        rows = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
    return {"dir_bytes": total, "mp4_bytes": sum(videos), "mp4_max": max(videos, default=0),
            "db_bytes": db_bytes, "rows": rows}


class Sampler:
    def __init__(self, ranks: dict[int, int], data_dir: Path, every_s: float):
        self.ranks, self.data_dir, self.every_s = ranks, data_dir, every_s
        self.samples: list[dict] = []
        self.failed: list[str] = []  # samples that could not be taken
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.monotonic()

    def sample(self) -> dict:
        return {"t": round(time.monotonic() - self.t0, 2),
                "ranks": {rank: process_figures(pid) for rank, pid in self.ranks.items()},
                "shm_files": shm_files(), **data_dir_figures(self.data_dir)}

    def _run(self):
        while not self._stop.wait(self.every_s):
            try:
                self.samples.append(self.sample())
            except (OSError, sqlite3.Error) as exc:  # one sample lost, not the rest
                self.failed.append(f"{exc}")

    def start(self):
        self.t0 = time.monotonic()
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()


def settled(sampler: Sampler, idle: dict, timeout: float = SETTLE_S) -> dict:
    """The first sample whose descriptors, threads, children and /dev/shm are at most idle's,
    or the last one at the timeout (closing connections and threads takes a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        now = sampler.sample()
        if not over_idle(idle, now) or time.monotonic() > deadline:
            return now
        time.sleep(0.5)


def over_idle(idle: dict, now: dict) -> list[str]:
    return [f"rank {rank} {key} {now['ranks'][rank][key]} > idle {figures[key]}"
            for rank, figures in idle["ranks"].items()
            for key in ("fds", "threads", "children", "shm_bytes")
            if now["ranks"][rank][key] > figures[key]]


def rss_growth(samples: list[dict], warmup_s: float) -> dict[int, float]:
    """Per rank: mean RSS of the last quarter after the warm-up over that of the first, - 1."""
    after = [s for s in samples if s["t"] >= warmup_s]
    quarter = max(1, len(after) // 4)
    growth = {}
    for rank in after[0]["ranks"] if after else ():
        first = sum(s["ranks"][rank]["rss_mib"] for s in after[:quarter]) / quarter
        last = sum(s["ranks"][rank]["rss_mib"] for s in after[-quarter:]) / quarter
        growth[rank] = round(last / first - 1, 4)
    return growth


def evicted_ids(log: str) -> set[str]:
    return set(re.findall(r"evicted job (video_[0-9a-f]{32})", log))


def checks(args, traffic: Traffic, samples: list[dict], idle: dict, final: dict,
           warmup_s: float, log: str) -> dict[str, str | None]:
    """Each check's failure, or None when it held."""
    growth = rss_growth(samples, warmup_s)
    grown = {r: g for r, g in growth.items() if g >= RSS_GROWTH_LIMIT}
    outcomes = traffic.outcomes(evicted_ids(log))
    lost = {job: end for job, end in outcomes.items()
            if end not in ("completed", "cancelled", "failed", "deleted", "evicted")}
    unexplained = [job for job, end in outcomes.items()
                   if end == "failed" and not traffic.jobs[job].get("error")]
    largest = max((s["mp4_max"] for s in samples), default=0)
    over_bytes = [s["mp4_bytes"] for s in samples if s["mp4_bytes"] > args.max_stored_bytes + largest]
    row_bound = args.max_stored_videos + MAX_QUEUE + traffic.replicas
    over_rows = [s["rows"] for s in samples if s["rows"] > row_bound]
    return {
        "rss_growth": f"grew {grown}" if grown else None,
        "back_to_idle": "; ".join(over_idle(idle, final)) or None,
        "no_5xx": f"{traffic.server_errors[:5]}" if traffic.server_errors else None,
        "bad_requests_4xx": f"{traffic.bad_not_4xx[:5]}" if traffic.bad_not_4xx else None,
        "no_job_lost": f"{len(lost)} lost: {dict(list(lost.items())[:5])}" if lost else None,
        "failures_have_reasons": f"{unexplained[:5]}" if unexplained else None,
        "disk_under_cap": (f"MP4 bytes {max(over_bytes)} > cap {args.max_stored_bytes} + "
                           f"{largest}" if over_bytes else
                           f"rows {max(over_rows)} > {row_bound}" if over_rows else None),
    }


def run(args) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="wanserve-soak-"))
    flags = ["--max-queue", str(MAX_QUEUE), "--video-ttl", str(args.video_ttl),
             "--max-stored-videos", str(args.max_stored_videos),
             "--max-stored-bytes", str(args.max_stored_bytes)]
    if args.ulysses > 1:
        flags += ["--ulysses", str(args.ulysses)]
    if args.dp > 1:
        flags += ["--dp", str(args.dp)]
    if args.adapters:
        flags += adapter_flags(tmp)
    server = start_server(tmp, *flags, nproc=args.ulysses * args.dp)
    try:
        return soak(args, server, flags)
    finally:
        exit_code = server.stop()
        print(f"server exit code {exit_code}; log {server.log_path}")


def adapter_flags(tmp: Path) -> list[str]:
    """Two LoRAs of the tiny model registered per request (not fused): requests switch among
    them, a scale and both at once."""
    from lora_files import make_lora, write_diffusers
    from wanserve.engine.model.tiny_model import ensure_tiny_model

    flags = []
    for name, seed in (("a", 1), ("b", 2)):
        path = write_diffusers(make_lora(ensure_tiny_model(), seed), tmp / f"{name}.safetensors")
        flags += ["--lora", f"{name}={path}"]
    return flags


def soak(args, server, flags: list[str]) -> int:
    ranks = rank_pids(server.proc.pid)
    models = requests.get(server.url + "/v1/models", timeout=10).json()["data"][0]
    traffic = Traffic(server, random.Random(args.seed), png_bytes(96, 64, seed=1),
                      png_bytes(96, 64, seed=2), invalid_requests(), raw_request,
                      last_frame=models["capabilities"].get("last_frame", False),
                      presets=list(models.get("step_cache", {}).get("presets", {}))
                      or ["fast", "balanced"], replicas=args.dp,
                      adapters=ADAPTER_VALUES if args.adapters else [])
    sampler = Sampler(ranks, server.data_dir, args.sample_every)
    traffic.prime()
    idle = settled(sampler, sampler.sample(), timeout=5)
    sampler.start()
    warmup_s = max(10.0, args.minutes * 60 * args.warmup_fraction)
    began = time.monotonic()
    traffic.run(args.clients, args.minutes * 60)
    traffic.drain(timeout=300)
    final = settled(sampler, idle)
    sampler.stop()
    sampler.samples.append(final)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "flags": flags, "ranks": len(ranks),
        "minutes": args.minutes, "traffic_s": round(time.monotonic() - began, 1),
        "clients": args.clients, "requests": dict(traffic.statuses),
        "jobs": dict(Counter(traffic.outcomes(evicted_ids(server.log())).values())),
        "idle": idle, "final": final, "warmup_s": warmup_s,
        "rss_growth": rss_growth(sampler.samples, warmup_s),
        "max_dir_bytes": max(s["dir_bytes"] for s in sampler.samples),
        "max_mp4_bytes": max(s["mp4_bytes"] for s in sampler.samples),
        "max_db_bytes": max(s["db_bytes"] for s in sampler.samples),
        "max_rows": max(s["rows"] for s in sampler.samples),
        "samples": sampler.samples, "samples_failed": sampler.failed,
    }
    result["checks"] = checks(args, traffic, sampler.samples, idle, final, warmup_s, server.log())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    plot(Path(args.plot), sampler.samples, warmup_s)
    report(result, args)
    return 1 if any(result["checks"].values()) else 0


def plot(path: Path, samples: list[dict], warmup_s: float) -> None:
    ranks = sorted(samples[0]["ranks"]) if samples else []

    def per_rank(key, scale=1.0):
        return {f"rank {r}": [(s["t"], s["ranks"][r][key] * scale) for s in samples] for r in ranks}

    def total(key, scale=1.0, name=""):
        return {name or key: [(s["t"], s[key] * scale) for s in samples]}

    write_plot(path, [
        ("resident memory (MiB)", per_rank("rss_mib")),
        ("open file descriptors", per_rank("fds")),
        ("threads", per_rank("threads")),
        ("/dev/shm mapped (MiB)", per_rank("shm_bytes", 1 / 2**20)),
        ("data dir and stored MP4s (MiB)", {**total("dir_bytes", 1 / 2**20, "data dir"),
                                            **total("mp4_bytes", 1 / 2**20, "MP4s")}),
        ("SQLite rows", total("rows", name="rows")),
        ("SQLite file with its WAL (KiB)", total("db_bytes", 1 / 1024, "file")),
    ], warmup_s)


def report(result: dict, args) -> None:
    print(f"soak: {result['traffic_s']} s of traffic, {result['ranks']} rank(s), "
          f"{args.clients} clients, {len(result['samples'])} samples "
          f"({len(result['samples_failed'])} could not be taken)")
    print(f"requests by action and status: {json.dumps(result['requests'], sort_keys=True)}")
    print(f"jobs: {result['jobs']}")
    for rank, figures in result["idle"]["ranks"].items():
        final = result["final"]["ranks"][rank]
        print(f"rank {rank}: RSS growth {100 * result['rss_growth'].get(rank, 0):.2f} % "
              f"(last vs first quarter after {result['warmup_s']:.0f} s); idle -> end: "
              + ", ".join(f"{k} {figures[k]} -> {final[k]}" for k in figures))
    print(f"data dir max {result['max_dir_bytes']} B (MP4s {result['max_mp4_bytes']} B, cap "
          f"{args.max_stored_bytes}); SQLite max {result['max_db_bytes']} B, "
          f"{result['max_rows']} rows (cap {args.max_stored_videos})")
    for name, failure in result["checks"].items():
        print(f"  {name}: {'PASS' if failure is None else 'FAIL ' + failure}")
    print(f"wrote {args.out} and {args.plot}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--ulysses", type=int, default=1)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--sample-every", type=float, default=2.0)
    p.add_argument("--warmup-fraction", type=float, default=0.15)
    p.add_argument("--video-ttl", type=float, default=120.0)
    p.add_argument("--max-stored-videos", type=int, default=40)
    p.add_argument("--max-stored-bytes", type=int, default=1 << 20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adapters", action=argparse.BooleanOptionalAction, default=True,
                   help="register two LoRAs and let 30 %% of creates use them")
    p.add_argument("--out", default=str(REPO / "bench-out" / "soak.json"))
    p.add_argument("--plot", default=str(REPO / "bench-out" / "soak.png"))
    return run(p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
