"""What each CPU multi-rank measure buys, component by component, on the bench model.

    .venv/bin/python benchmarks/cpu_components.py [--rounds 2] [--iters 8]

Per round, one `torchrun` job each for: one rank; Ulysses 2 with the ranks pinned to their
cores (the default); Ulysses 2 unpinned (`parallel.pin_cpu_cores=false`). Each job builds the
engine's own pipeline (engine.main.prepare_pipeline) and times, one thread per rank:

- a transformer forward at 256x256, 17 frames (1280 tokens), alternating a prompt it has seen
  (cross-attention keys/values remembered) with a fresh copy (recomputed): median wall s, and
  rank 0's CPU s per forward (getrusage of its thread; wall minus CPU is time blocked, except
  that a rank waiting on shared memory first spins for ~1 ms, which counts as CPU);
- on two ranks exchanging through shared memory, the same forward with one measure switched
  off, taking turns with the default forward by forward (ratio off / on of the medians):
  gloo's event-loop threads back at normal priority (engine/gloo_threads.py), and xfuser's own
  Ulysses all-to-alls instead of the folded ones (engine/shm_transport.py);
- the VAE decode and encode of the same video: on two ranks both with the overlapped halo
  exchange (kernels/cpu_sharded_conv.py) and with distvae 0.1.0's own convolutions; on one rank
  both with kernels/cpu_kernels.py and with torch's default CPU kernels.

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
JOBS = {"1 rank": (1, []), "U2 pinned": (2, ["--ulysses", "2"]),
        "U2 unpinned": (2, ["--ulysses", "2", "--set", "parallel.pin_cpu_cores=false"])}


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
    from kernels.cpu_sharded_conv import use_overlapped_halos

    for module in vae.modules():
        if type(module).__name__ in ("WanCausalConv3dAdapter", "Conv2dAdapter"):
            module.__dict__.pop("forward", None)  # back to distvae's own forward
    if on:
        use_overlapped_halos(vae)


def _gloo_loops_idle(on: bool) -> None:
    from engine.gloo_threads import set_gloo_loop_policy

    set_gloo_loop_policy(None if on else os.SCHED_OTHER)


def _folded_all_to_alls(on: bool) -> None:
    import xfuser.model_executor.layers.usp as usp

    from engine import shm_transport

    usp._ft_c_input_all_to_all = (shm_transport._input_all_to_all if on
                                  else shm_transport._xfuser_input_all_to_all)
    usp._ft_c_output_all_to_all = (shm_transport._output_all_to_all if on
                                   else shm_transport._xfuser_output_all_to_all)


# (what, how to switch it; on is the engine's default): compared forward by forward, in turn
FORWARD_AB = {"gloo loop threads at normal priority": _gloo_loops_idle,
              "xfuser's own Ulysses all-to-alls": _folded_all_to_alls}


def _alternating(fn, switch, iters: int, barrier) -> float:
    """Median wall of fn() with the switch off over with it on, calls taking turns."""
    walls = {True: [], False: []}
    for i in range(2 * iters):
        on = i % 2 == 1
        switch(on)
        barrier()
        start = time.perf_counter()
        fn()
        walls[on].append(time.perf_counter() - start)
    switch(True)
    return statistics.median(walls[False]) / statistics.median(walls[True])


def _undo_fast_cpu_kernels(vae) -> None:
    """Back to torch's own kernels: drop the per-instance rebinding cpu_kernels made."""
    for module in vae.modules():
        for name in ("forward", "_conv_forward"):
            module.__dict__.pop(name, None)


def worker(argv: list[str], iters: int) -> dict:
    import torch

    from engine.config import load_config
    from engine.distributed import init_distributed, shutdown
    from engine.main import prepare_pipeline, resolve_model_path

    cfg = load_config(argv)
    ctx = init_distributed(cfg.layout, cfg.collective_timeout_s, cfg.pin_cpu_cores)
    try:
        pipe = prepare_pipeline(cfg, ctx, resolve_model_path(cfg))
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
            if ctx.world_size > 1 and pipe.wanserve_info["parallel"]["exchanges"].startswith(
                    "shared memory"):
                import torch.distributed as dist

                for what, switch in FORWARD_AB.items():
                    result[f"forward with {what} / default"] = _alternating(
                        forward(prompt), switch, iters, lambda: dist.barrier(ctx.step_group))
            # two ranks: overlapped halos vs distvae's own; one rank: cpu_kernels vs torch's
            variants = ["overlapped", "distvae"] if pipe.parallel_vae else ["", "torch kernels"]
            for variant in variants:
                if pipe.parallel_vae:
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
                if isinstance(value, float):  # a ratio of two variants measured in turn
                    print(f"  {key:<58} {value:6.3f}")
                else:
                    print(f"  {key:<22} wall {value[0]:6.3f} s   rank 0 CPU {value[1]:6.3f} s")
    out = REPO / "bench-out" / "cpu_components.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps([{"round": r, "job": n, **res} for r, n, res in rows], indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
