"""What each CPU multi-rank measure buys, component by component, on the bench model.

    .venv/bin/python benchmarks/cpu_components.py [--rounds 2] [--iters 8]

Per round, one `torchrun` job each for one rank and Ulysses 2. Each job builds the engine's own
model (wanserve.engine.assembly.assemble) and times, one thread per rank:

- a transformer forward at 256x256, 17 frames (1280 tokens), alternating a prompt it has seen
  (cross-attention keys/values remembered) with a fresh copy (recomputed): median wall s, and
  rank 0's CPU s per forward (getrusage of its thread; wall minus CPU is time blocked, except
  that a rank waiting on shared memory first spins for ~1 ms, which counts as CPU);
- the VAE decode and encode of the same video: on two ranks both with the overlapped halo
  exchange (wanserve/engine/cpu/sharded_conv.py) and with distvae 0.1.0's own convolutions; on one rank
  both with wanserve/engine/cpu/vae_kernels.py and with torch's default CPU kernels.

Ratios are read within one round: the machine's speed drifts between jobs.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_bench_model import model_flags  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "bench-cpu.yaml"
JOBS = {"1 rank": (1, []), "U2": (2, ["--ulysses", "2"])}


def _timed(fn, iters: int) -> tuple[float, float]:
    """Median wall seconds of fn() and the calling thread's mean CPU seconds per call."""
    walls = []
    before = resource.getrusage(resource.RUSAGE_THREAD)
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_THREAD)
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / iters
    return statistics.median(walls), cpu


def _overlapped_halos(vae, on: bool) -> None:
    from wanserve.engine.cpu.sharded_conv import use_overlapped_halos

    for module in vae.modules():
        if type(module).__name__ in ("WanCausalConv3dAdapter", "Conv2dAdapter"):
            module.__dict__.pop("forward", None)  # back to distvae's own forward
    if on:
        use_overlapped_halos(vae)


def _undo_fast_cpu_kernels(vae) -> None:
    """Back to torch's own kernels: drop the per-instance rebinding vae_kernels made."""
    for module in vae.modules():
        for name in ("forward", "_conv_forward"):
            module.__dict__.pop(name, None)


def worker(argv: list[str], iters: int) -> dict:
    import torch

    from wanserve.engine.assembly import assemble
    from wanserve.engine.config import load_config
    from wanserve.engine.parallel.distributed import init_distributed, shutdown
    from wanserve.engine.startup import resolve_model_path

    cfg = load_config(argv)
    ctx = init_distributed(cfg.layout, cfg.collective_timeout_s)
    try:
        served = assemble(cfg, ctx, resolve_model_path(cfg))
        pipe = served.pipe
        g = torch.Generator().manual_seed(0)
        latents = torch.randn(1, 36, 5, 32, 32, generator=g)
        prompt = torch.randn(1, 512, pipe.transformer.config.text_dim, generator=g)
        timestep = torch.tensor([500.0])
        z = torch.randn(1, 16, 5, 32, 32, generator=g)
        video = torch.rand(1, 3, 17, 256, 256, generator=g) * 2 - 1
        result = {}
        with torch.no_grad():
            def forward(text):
                return lambda: pipe.transformer(latents, timestep, text, return_dict=False)

            forward(prompt)()  # warm-up; the prompt is now remembered
            hit = _timed(forward(prompt), iters)
            miss = _timed(lambda: forward(prompt.clone())(), iters)
            result["forward_remembered"], result["forward_recomputed"] = hit, miss
            # two ranks: overlapped halos vs distvae's own; one rank: vae_kernels vs torch's
            variants = ["overlapped", "distvae"] if served.vae_sharded else ["", "torch kernels"]
            for variant in variants:
                if served.vae_sharded:
                    _overlapped_halos(pipe.vae, variant == "overlapped")
                elif variant:
                    _undo_fast_cpu_kernels(pipe.vae)
                suffix = f" {variant}" if variant else ""
                pipe.vae.decode(z[:, :, :2])  # warm-up
                result["vae_decode" + suffix] = _timed(lambda: pipe.vae.decode(z), 2)
                result["vae_encode" + suffix] = _timed(lambda: pipe.vae.encode(video), 2)
        return result
    finally:
        shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--iters", type=int, default=8, help="forwards per variant")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.worker:
        result = worker(rest, args.iters)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return 0
    flags = ["--config", str(CONFIG), *model_flags(CONFIG, None)]
    rows = []
    for round_ in range(1, args.rounds + 1):
        for name, (nproc, extra) in JOBS.items():
            cmd = [str(REPO / ".venv/bin/torchrun"), "--standalone", "--nproc-per-node",
                   str(nproc), __file__, "--worker", "--iters", str(args.iters), *flags, *extra]
            proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                  capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            result = json.loads(line[len("RESULT "):])
            rows.append((round_, name, result))
            print(f"round {round_}, {name}:")
            for key, value in result.items():
                print(f"  {key:<22} wall {value[0]:6.3f} s   rank 0 CPU {value[1]:6.3f} s")
    out = REPO / "bench-out" / "cpu_components.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps([{"round": r, "job": n, **res} for r, n, res in rows], indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
