"""Serving overhead: one request over real HTTP vs the same request run in-process.

    .venv/bin/python benchmarks/serving_overhead.py [--size 256x256 --frames 17 --steps 8]

(a) HTTP: a one-rank server started through ./launch.sh on a free port; POST /v1/videos
    (multipart, sync) and time until the JSON response is parsed.
(b) In-process: `torchrun --nproc-per-node 1 -m wanserve.engine.serving.offline`, the same engine code
    (run_request) without HTTP; its `wall` covers generation including the VAE decode.
Both get identical parameters and the same input image, uploaded at exactly the target size
so the server's fit is the identity (checked). The phases run one after the other.
Goal: HTTP / in-process <= 1.03 (printed as PASS/MISS, not asserted).
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from build_bench_model import model_flags  # noqa: E402
from conftest import start_server, wait_ready  # noqa: E402  (the suite's server harness)

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = REPO / ".venv" / "bin" / "torchrun"
STAGES = ("text_encode", "image_encode", "denoise", "step_mean", "vae_decode", "generate_total")
PROMPT = "a lighthouse in a storm"
GOAL = 1.03


def input_png(width: int, height: int, image_seed: int) -> bytes:
    from wanserve.api.images import decode_image, fit_to_size
    from wanserve.engine.serving.offline import synthetic_image

    pixels = synthetic_image(width, height, image_seed)
    buf = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buf, format="PNG")  # lossless
    fitted = fit_to_size(decode_image(buf.getvalue(), max_bytes=1 << 30, max_pixels=1 << 30),
                         width, height)
    if not np.array_equal(fitted, pixels):
        raise SystemExit("the server would not see the in-process image; refusing to compare")
    return buf.getvalue()


def timed_posts(url: str, form: dict, png: bytes, warmup: int, repeats: int,
                label: str) -> list[dict]:
    """POST the same synchronous request warmup + repeats times; the measured runs' end-to-end
    time, MP4 size and the server's own stage timings."""
    runs = []
    with requests.Session() as session:
        for i in range(warmup + repeats):
            start = time.perf_counter()
            response = session.post(url + "/v1/videos", data=form, timeout=3600,
                                    files={"input_reference": ("input.png", png, "image/png")})
            e2e = time.perf_counter() - start
            body = response.json()
            if response.status_code != 200:
                raise SystemExit(f"{label}: POST /v1/videos: {response.status_code} {body}")
            print(f"  {label} run {i}: {e2e:.3f}s{' (warm-up)' if i < warmup else ''}", flush=True)
            if i >= warmup:
                mp4_bytes = len(base64.b64decode(body["data"][0]["b64_json"]))
                runs.append({"e2e": e2e, "mp4_bytes": mp4_bytes, **body["timings"]})
    return runs


@contextlib.contextmanager
def bench_server(log_path: Path, *args: str, nproc: int = 1, env: dict | None = None):
    """A server through ./launch.sh (the test suite's harness), its log kept at `log_path`."""
    tmp = Path(tempfile.mkdtemp(prefix="wanserve-bench-"))
    server = start_server(tmp, *args, nproc=nproc, env=env, wait=False)
    try:
        wait_ready(server, timeout=3600)  # a real checkpoint can take minutes to load
        yield server
    finally:
        code = server.stop()
        shutil.copy(server.log_path, log_path)
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"  server stopped (exit {code}); log: {log_path}", flush=True)


def http_phase(args: argparse.Namespace, flags: list[str], png: bytes,
               log_path: Path) -> list[dict]:
    form = {"prompt": PROMPT, "size": args.size, "num_frames": str(args.frames),
            "num_inference_steps": str(args.steps), "seed": str(args.seed),
            "guidance_scale": str(args.guidance)}
    with bench_server(log_path, "--config", str(args.config), *flags) as server:
        return timed_posts(server.url, form, png, args.warmup, args.repeats, "http")


def inprocess_phase(args: argparse.Namespace, flags: list[str], width: int, height: int,
                    tmp: Path) -> list[dict]:
    spec = {"prompt": PROMPT, "width": width, "height": height, "num_frames": args.frames,
            "num_inference_steps": args.steps, "seed": args.seed,
            "guidance_scale": args.guidance, "image_seed": args.image_seed}
    (tmp / "reqs.json").write_text(json.dumps([spec]))
    out = tmp / "out.npz"
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "1", "-m", "wanserve.engine.serving.offline",
           "--requests", str(tmp / "reqs.json"), "--out", str(out),
           "--repeat", str(args.warmup + args.repeats), "--config", str(args.config), *flags]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"wanserve.engine.serving.offline failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    runs = json.loads(Path(f"{out}.json").read_text())["runs"]
    for run in runs:
        print(f"  local run {run['round']}: {run['wall']:.3f}s"
              f"{' (warm-up)' if run['round'] < args.warmup else ''}")
    return [run for run in runs if run["round"] >= args.warmup]


def med(runs: list[dict], key: str) -> float | None:
    values = [run[key] for run in runs if key in run]
    return statistics.median(values) if values else None


def summarise(http: list[dict], local: list[dict]) -> dict:
    for run in http:  # what HTTP adds besides the engine and the MP4 encoder
        run["serving_other"] = run["e2e"] - run["generate_total"] - run["mp4_encode"]
        run["e2e_minus_mp4"] = run["e2e"] - run["mp4_encode"]
    wall = med(local, "wall")
    stages = {key: {"http": med(http, key), "inprocess": med(local, key)}
              for key in STAGES + ("mp4_encode", "serving_other")}
    for row in stages.values():
        h, p = row["http"], row["inprocess"]
        row["ratio"] = h / p if h is not None and p else None
    return {"http_e2e_median": med(http, "e2e"), "http_e2e_min": min(r["e2e"] for r in http),
            "inprocess_wall_median": wall, "inprocess_wall_min": min(r["wall"] for r in local),
            "ratio": med(http, "e2e") / wall, "ratio_excl_mp4": med(http, "e2e_minus_mp4") / wall,
            "stages": stages, "goal_ratio_max": GOAL}


def report(s: dict) -> None:
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    print(f"\n{'stage (median s)':<22}{'HTTP':>10}{'in-proc':>10}{'ratio':>8}")
    print(f"{'end to end / wall':<22}{s['http_e2e_median']:>10.4f}"
          f"{s['inprocess_wall_median']:>10.4f}{s['ratio']:>8.3f}")
    for name, row in s["stages"].items():
        print(f"{name:<22}{fmt(row['http']):>10}{fmt(row['inprocess']):>10}"
              f"{'-' if row['ratio'] is None else format(row['ratio'], '.3f'):>8}")
    print(f"\nHTTP e2e: median {s['http_e2e_median']:.4f}s, min {s['http_e2e_min']:.4f}s; "
          f"in-process wall: median {s['inprocess_wall_median']:.4f}s")
    for label, key in (("as is", "ratio"), ("excluding mp4_encode", "ratio_excl_mp4")):
        verdict = "PASS" if s[key] <= GOAL else "MISS"
        print(f"HTTP / in-process ({label}): {s[key]:.3f}  goal <= {GOAL}: {verdict}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="256x256", help="WxH, multiples of 16")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--image-seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "tiny.yaml")
    p.add_argument("--model", help="default: the preset's (bench model if it names none)")
    p.add_argument("--out", type=Path, default=Path("bench-out/serving_overhead.json"))
    args = p.parse_args()
    args.config = args.config.resolve()
    width, height = (int(v) for v in args.size.lower().split("x"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    flags = model_flags(args.config, args.model)
    png = input_png(width, height, args.image_seed)
    print(f"{args.size}, {args.frames} frames, {args.steps} steps, seed {args.seed}, "
          f"{args.warmup} warm-up + {args.repeats} runs per side; {args.config.name} {flags}")
    print("phase 1: HTTP through ./launch.sh")
    http = http_phase(args, flags, png, args.out.with_suffix(".server.log").resolve())
    print("phase 2: in-process (wanserve.engine.serving.offline)")
    with tempfile.TemporaryDirectory(prefix="wanserve-bench-") as tmp:
        local = inprocess_phase(args, flags, width, height, Path(tmp))
    summary = summarise(http, local)
    report(summary)
    params = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"params": params, "model_flags": flags, **summary,
                                    "http_runs": http, "inprocess_runs": local}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
