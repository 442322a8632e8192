"""Latency against throughput: a burst of requests on one rank, on U2 and on two replicas.

    .venv/bin/python benchmarks/replica_throughput.py [--layouts 1,U2,DP2] [--burst 8]
        [--config configs/tiny.yaml] [--size 128x128 --frames 9 --steps 12]
    .venv/bin/python benchmarks/replica_throughput.py --gpu-table [--step-seconds S]

Per layout, one server through ./launch.sh; `--burst` asynchronous requests submitted at once,
then polled to the end. Reports the time until the last video was stored, videos per minute,
and the p50 / p95 of each request's latency (submit → completed). Layouts run one after the
other on the same machine, so their ratios come from one run.

`--gpu-table` prints, for 8 GPUs, the latency and throughput of U8, U4C2, 2×U2C2, 4×C2 and
8×1 at A14B 480p × 81 frames × 40 steps: from `--step-seconds` (a CFG step measured on one GPU,
benchmarks/gpu_served.py) when given, else from the FLOP model of BENCHMARKS.md at 800 TFLOP/s -
labelled as such either way.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_bench_model import model_flags  # noqa: E402
from gpu_served import forward_flops, video_tokens  # noqa: E402
from serving_overhead import bench_server  # noqa: E402
from wanserve.engine.model.model_layouts import WAN22_I2V_A14B  # noqa: E402  (on the path through gpu_served)
from conftest import png_bytes  # noqa: E402  (on the path through serving_overhead)

REPO = Path(__file__).resolve().parent.parent
LAYOUTS = {"1": (1, []), "U2": (2, ["--ulysses", "2"]), "DP2": (2, ["--dp", "2"]),
           "C2": (2, ["--cfg", "2"])}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def burst(server, count: int, form: dict) -> dict:
    png = png_bytes(160, 120)

    def submit(i: int) -> tuple[str, float]:
        start = time.perf_counter()
        resp = requests.post(server.url + "/v1/videos", headers={"Prefer": "respond-async"},
                             data={**form, "seed": str(i)}, timeout=60,
                             files={"input_reference": ("r.png", png, "image/png")})
        resp.raise_for_status()
        return resp.json()["id"], start

    start = time.perf_counter()
    with ThreadPoolExecutor(count) as pool:
        submitted = list(pool.map(submit, range(count)))
    latencies, pending = [], dict(submitted)
    while pending:
        for job_id, t0 in list(pending.items()):
            job = requests.get(f"{server.url}/v1/videos/{job_id}", timeout=30).json()
            if job["status"] in ("failed", "cancelled"):
                raise SystemExit(f"{job_id} {job['status']}: {job.get('error')}")
            if job["status"] == "completed":
                latencies.append(time.perf_counter() - t0)
                del pending[job_id]
        time.sleep(0.05)
    makespan = time.perf_counter() - start
    return {"videos": count, "makespan_s": round(makespan, 2),
            "videos_per_min": round(60 * count / makespan, 2),
            "p50_s": round(statistics.median(latencies), 2),
            "p95_s": round(percentile(latencies, 0.95), 2)}


def measure(args) -> list[dict]:
    width, height = args.size.split("x")
    form = {"prompt": "a lighthouse in a storm", "width": width, "height": height,
            "num_frames": str(args.frames), "num_inference_steps": str(args.steps)}
    rows = []
    for name in args.layouts.split(","):
        nproc, flags = LAYOUTS[name]
        log = REPO / "bench-out" / f"replica_throughput-{name}.log"
        log.parent.mkdir(exist_ok=True)
        print(f"{name}: starting {nproc} rank(s)", flush=True)
        with bench_server(log, "--config", str(args.config),
                          *model_flags(args.config, args.model), *flags, nproc=nproc) as server:
            burst(server, 1, form)  # warm-up
            row = {"layout": name, "ranks": nproc, **burst(server, args.burst, form)}
        print(f"  {row}", flush=True)
        rows.append(row)
    base = rows[0]
    print(f"\n{args.burst} requests, {args.size} × {args.frames} frames × {args.steps} steps")
    print(f"{'layout':<8}{'ranks':>6}{'all done s':>11}{'videos/min':>11}{'p50 s':>8}"
          f"{'p95 s':>8}{'throughput ×':>14}")
    for r in rows:
        print(f"{r['layout']:<8}{r['ranks']:>6}{r['makespan_s']:>11}{r['videos_per_min']:>11}"
              f"{r['p50_s']:>8}{r['p95_s']:>8}"
              f"{r['videos_per_min'] / base['videos_per_min']:>14.2f}")
    return rows


def gpu_table(step_seconds: float | None, steps: int = 40) -> list[dict]:
    """8 GPUs. One CFG step is two forwards; a layout of `sp` × `cfg` GPUs per replica splits
    a step's FLOPs over them and adds Ulysses' all-to-alls (BENCHMARKS.md's model)."""
    tokens = video_tokens(832, 480, 81)
    t = WAN22_I2V_A14B.transformer
    d, ffn, layers = t["num_attention_heads"] * t["attention_head_dim"], t["ffn_dim"], t["num_layers"]
    if step_seconds is None:
        step_seconds = 2 * forward_flops(tokens, d, ffn, layers) / 800e12
        source = "FLOP model at 800 TFLOP/s (not measured)"
    else:
        source = f"measured one-GPU CFG step of {step_seconds:.2f} s"
    nvlink = 450e9
    rows = []
    for name, dp, sp, cfg in (("U8", 1, 8, 1), ("U4C2", 1, 4, 2), ("2×U2C2", 2, 2, 2),
                              ("4×C2", 4, 1, 2), ("8×1", 8, 1, 1)):
        compute = step_seconds / (sp * cfg)
        # q, k, v and the output, each GPU's share of every other GPU's tokens, per layer
        # and per forward a GPU runs in the step (two without CFG parallel)
        a2a = 4 * (tokens / sp) * d * 2 * (sp - 1) / sp / nvlink if sp > 1 else 0.0
        comm = a2a * layers * (2 // cfg)
        latency = steps * (compute + comm)
        rows.append({"layout": name, "replicas": dp, "gpus_per_replica": sp * cfg,
                     "latency_s": round(latency, 1),
                     "videos_per_min": round(60 * dp / latency, 2)})
    print(f"8 GPUs, A14B 480p × 81 frames × {steps} steps; {source}; "
          "text encoder and VAE left out")
    print(f"{'layout':<9}{'replicas':>9}{'GPUs each':>10}{'latency s':>11}{'videos/min':>11}")
    for r in rows:
        print(f"{r['layout']:<9}{r['replicas']:>9}{r['gpus_per_replica']:>10}"
              f"{r['latency_s']:>11}{r['videos_per_min']:>11}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layouts", default="1,U2,DP2")
    p.add_argument("--burst", type=int, default=8)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "tiny.yaml")
    p.add_argument("--model")
    p.add_argument("--size", default="128x128")
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--gpu-table", action="store_true")
    p.add_argument("--step-seconds", type=float)
    p.add_argument("--out", type=Path, default=REPO / "bench-out" / "replica_throughput.json")
    args = p.parse_args()
    rows = gpu_table(args.step_seconds) if args.gpu_table else measure(args)
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                    "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
