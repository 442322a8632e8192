"""Compiled blocks against eager, on the bench model (configs/bench-cpu.yaml), in one process.

    .venv/bin/python benchmarks/compile.py [--rounds 3] [--steps 8] [--size 256x256]
        [--frames 17] [--ulysses 1] [--threads 2]

One `torchrun` job assembles the engine's own model with `--compile regional`: the warm-up
before the ready barrier compiles the blocks, and its compile seconds are the engine's own
count (torch._dynamo's compile callbacks). Then the same request (same seed, image, prompt)
runs `--rounds` times compiled and eager in turn (`torch.compiler.set_stance("force_eager")`
runs the very same modules uncompiled), so the ratio is read within one run on one machine
state. Prints the mean denoising-step time of each, their ratio, the recompiles after the
warm-up, and the largest difference between the compiled and the eager video (float frames).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_bench_model import model_flags  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "bench-cpu.yaml"


def worker(argv: list[str], spec: dict, rounds: int) -> dict:
    import numpy as np
    import torch

    from wanserve.engine.assembly import assemble
    from wanserve.engine.config import load_config
    from wanserve.engine.parallel.distributed import init_distributed, shutdown
    from wanserve.engine.serving.offline import request_from_spec
    from wanserve.engine.serving.worker import end_of_job, run_request
    from wanserve.engine.startup import resolve_model_path

    cfg = load_config(argv)
    ctx = init_distributed(cfg.layout, cfg.collective_timeout_s)
    try:
        served = assemble(cfg, ctx, resolve_model_path(cfg))
        request = request_from_spec("bench", spec, cfg, served.features)
        steps: dict[str, list[float]] = {"compiled": [], "eager": []}
        frames = {}
        for _ in range(rounds):
            for kind in ("compiled", "eager"):
                with torch.compiler.set_stance("force_eager" if kind == "eager" else "default"):
                    result = run_request(ctx, served, request)
                end_of_job(ctx, served)
                if result is not None:
                    steps[kind].append(result.timings["step_mean"])
                    frames[kind] = result.frames
        compile_report = served.compiled.report
        out = {"warmup": compile_report["warmup"], "recompiles": compile_report["recompiles"],
               "step_s": steps}
        if frames:
            out["max_diff"] = float(np.abs(frames["compiled"] - frames["eager"]).max())
        return out
    finally:
        shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="requests of each kind, in turn")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", default="256x256")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--ulysses", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each rank")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--worker", type=str, help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    width, height = (int(v) for v in args.size.split("x"))
    spec = {"width": width, "height": height, "num_frames": args.frames, "seed": 11,
            "num_inference_steps": args.steps}
    if args.worker:
        result = worker(rest, json.loads(args.worker), args.rounds)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return 0
    flags = ["--config", str(CONFIG), *model_flags(CONFIG, None), "--compile", "regional",
             "--set", f"compile.backend={args.backend}", "--ulysses", str(args.ulysses)]
    cmd = [str(REPO / ".venv/bin/torchrun"), "--standalone", "--nproc-per-node",
           str(args.ulysses), __file__, "--worker", json.dumps(spec), "--rounds",
           str(args.rounds), *flags]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
                          capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"the benchmark job failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(line[len("RESULT "):])
    compiled, eager = (statistics.mean(result["step_s"][k]) for k in ("compiled", "eager"))
    warmup = result["warmup"]
    print(f"bench model, {width}x{height}, {args.frames} frames, {args.steps} steps, "
          f"Ulysses {args.ulysses}, OMP_NUM_THREADS={args.threads}, backend {args.backend}")
    print(f"warm-up: {warmup['seconds']:.1f} s, of which compiling {warmup['compile_seconds']:.1f}"
          f" s ({warmup['compiles']} compiles); recompiles after it: {result['recompiles']}")
    print(f"step (s): compiled {compiled:.3f}  eager {eager:.3f}  eager/compiled "
          f"{eager / compiled:.2f}  (per round: "
          + ", ".join(f"{e / c:.2f}" for c, e in zip(result["step_s"]["compiled"],
                                                    result["step_s"]["eager"])) + ")")
    print(f"max |compiled - eager| on float frames: {result['max_diff']:.2e}")
    out = REPO / "bench-out" / "compile.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), **result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
