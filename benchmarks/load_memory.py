"""Each rank's peak host memory while the server loads the real-layout checkpoint, with and
without --shard-weights, at 1, 2 and 4 ranks.

    .venv/bin/python benchmarks/load_memory.py [--model wan2.2-i2v-a14b] [--layers 1]
        [--runs 1,1s,2,2s,4,4s] [--dtype bfloat16] [--out bench-out/load_memory.json]

The checkpoint is benchmarks/real_layout.py's (the published widths, the layer counts cut to
--layers; written once). Each run starts the server through the model's preset (`N` ranks with
Ulysses N; `Ns`: the same with --shard-weights), waits until it is ready and reads /health:
every rank's resident high-water mark (VmHWM) from the start of the load until the sharded
experts are filled, and the experts' bytes each rank holds and read. No request is sent.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_layout import checkpoint_dir  # noqa: E402
from serving_overhead import bench_server  # noqa: E402  (the suite's harness)

from wanserve.engine.model.model_layouts import LAYOUTS  # noqa: E402

MIB = 2**20


def parse_run(spec: str) -> tuple[int, bool]:
    return int(spec.rstrip("s")), spec.endswith("s")


def measure(ranks: int, sharded: bool, dtype: str, folder: Path, preset: str, log: Path) -> dict:
    flags = ["--dtype", dtype] + (["--ulysses", str(ranks)] if ranks > 1 else [])
    flags += ["--shard-weights"] if sharded else []
    start = time.perf_counter()
    with bench_server(log, "--config", str(REPO / preset), "--model", str(folder),
                      *flags, nproc=ranks) as server:
        ready_s = time.perf_counter() - start
        health = requests.get(server.url + "/health", timeout=30).json()
    sharding = health.get("sharding") or {}
    row = {"ranks": ranks, "shard_weights": sharded, "dtype": dtype, "ready_s": round(ready_s, 1),
           "load_peak_host_mib_per_rank": [r["host_mib"]
                                           for r in health["load"]["peak_memory_per_rank"]],
           "loading": sharding.get("loading", "whole experts on every rank"),
           "expert_param_mib_per_rank": [round(b / MIB, 1)
                                         for b in sharding.get("param_bytes_per_rank", [])],
           "checkpoint_mib_read_per_rank": [
               round(b / MIB, 1) for b in sharding.get("checkpoint_bytes_read_per_rank", [])]}
    print(f"  {ranks} rank(s){', sharded' if sharded else ''}: ready {ready_s:.0f}s, load peak "
          f"per rank {row['load_peak_host_mib_per_rank']} MiB", flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| ranks | --shard-weights | dtype | loading | load peak host per rank (MiB) | "
             "experts held per rank (MiB) | experts read per rank (MiB) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(" | ".join([
            f"| {r['ranks']}", "yes" if r["shard_weights"] else "no", r["dtype"], r["loading"],
            " / ".join(f"{v:.0f}" for v in r["load_peak_host_mib_per_rank"]),
            " / ".join(f"{v:.0f}" for v in r["expert_param_mib_per_rank"]) or "-",
            " / ".join(f"{v:.0f}" for v in r["checkpoint_mib_read_per_rank"]) or "-"]) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="wan2.2-i2v-a14b", choices=sorted(LAYOUTS))
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--runs", default="1,1s,2,2s,4,4s",
                   help="comma-separated: N ranks, 's' for --shard-weights")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="the served dtype (the checkpoint is bf16: float32 makes every rank "
                   "copy what it loads; bf16 on the CPU maps the files and reads them later)")
    p.add_argument("--out", type=Path, default=Path("bench-out/load_memory.json"))
    args = p.parse_args()
    layout = LAYOUTS[args.model].cut(args.layers)
    folder = checkpoint_dir(layout)
    if not (folder / "model_index.json").exists():
        raise SystemExit(f"no checkpoint at {folder}: run benchmarks/real_layout.py --model "
                         f"{args.model} --layers {args.layers} --write-only first")
    disk_mib = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / MIB
    experts_mib = sum(f.stat().st_size for name in layout.experts
                      for f in (folder / name).rglob("*.safetensors")) / MIB
    print(f"{folder}: {disk_mib:.0f} MiB, experts {experts_mib:.0f} MiB", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in args.runs.split(","):
        ranks, sharded = parse_run(spec)
        rows.append(measure(ranks, sharded, args.dtype, folder, layout.preset,
                            args.out.with_suffix(f".{spec}.server.log").resolve()))
        args.out.write_text(json.dumps({"layout": layout.name, "layers": layout.layers,
                                        "checkpoint_mib": disk_mib, "experts_mib": experts_mib,
                                        "rows": rows}, indent=1))
    print("\n" + table(rows) + f"\n\ncheckpoint on disk: {disk_mib:.0f} MiB, of which the "
          f"experts {experts_mib:.0f} MiB\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
