"""The CPU ranks' exchanges over gloo against shared memory (wanserve/kernels/shm_exchange.py).

    .venv/bin/python benchmarks/cpu_exchange.py [--iters 200]    # ~15 s, 2 ranks, one core each

One `torchrun` job of 2 ranks, each pinned to its own core and OMP_NUM_THREADS=1 as the engine
runs them, times the exchanges the engine makes, with both ranks entering each one together
(a barrier first, not timed): an all-to-all of a Ulysses-2 query of the benchmark model (640
tokens x 512 wide, 1.3 MB) and of three times that, an all-gather of the same, a one-row halo
of a VAE activation (16 channels x 5 frames x 256 wide), and a plain copy of the 1.3 MB for
scale. Prints the median milliseconds per exchange and gloo / shared memory.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def measure(iters: int) -> dict:
    import torch
    import torch.distributed as dist

    from wanserve.engine.cpu import shm_exchange

    dist.init_process_group("gloo")
    channel = shm_exchange.open_channel(dist.group.WORLD, 16 << 20, 60.0)
    me, world = dist.get_rank(), dist.get_world_size()
    query = torch.randn(640 * 512)
    qkv = torch.randn(3 * 640 * 512)
    row = torch.randn(1, 16, 5, 1, 256)

    def gloo_all_to_all(x):
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x)

    def gloo_all_gather(x):
        dist.all_gather([torch.empty_like(x) for _ in range(world)], x)

    def gloo_halo(x):
        ops, peer = [], 1 - me
        ops.append(dist.P2POp(dist.isend, x, peer))
        ops.append(dist.P2POp(dist.irecv, torch.empty_like(x), peer))
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    def shm_halo(x):
        posted = channel.post_neighbours(x if me > 0 else None, x if me < world - 1 else None)
        posted.wait(x if me > 0 else None, x if me < world - 1 else None)

    copy_target = torch.empty_like(query)
    cases = {
        "all-to-all 1.3 MB": {"gloo": lambda: gloo_all_to_all(query),
                              "shm": lambda: channel.all_to_all(query)},
        "all-to-all 3.9 MB": {"gloo": lambda: gloo_all_to_all(qkv),
                              "shm": lambda: channel.all_to_all(qkv)},
        "all-gather 1.3 MB": {"gloo": lambda: gloo_all_gather(query),
                              "shm": lambda: channel.all_gather(query)},
        "halo row 80 KB": {"gloo": lambda: gloo_halo(row), "shm": lambda: shm_halo(row)},
        "copy 1.3 MB (no exchange)": {"copy": lambda: copy_target.copy_(query)},
    }
    results = {}
    for name, variants in cases.items():
        results[name] = {}
        for label, run in variants.items():
            times = []
            for _ in range(iters):
                dist.barrier()
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            results[name][label] = statistics.median(times) * 1e3
    dist.barrier()
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=200)
    args = p.parse_args()
    cmd = [str(REPO / ".venv/bin/torchrun"), "--standalone", "--nproc-per-node", "2",
           __file__, "--worker", str(args.iters)]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{'exchange (2 ranks, median ms)':<30} {'gloo':>8} {'shm':>8} {'gloo/shm':>9}")
    for name, row in results.items():
        if "copy" in row:
            print(f"{name:<30} {row['copy']:8.3f}")
        else:
            print(f"{name:<30} {row['gloo']:8.3f} {row['shm']:8.3f} "
                  f"{row['gloo'] / row['shm']:9.1f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(REPO))
        out = measure(int(sys.argv[2]))
        import torch.distributed as dist

        if dist.get_rank() == 0:
            print(json.dumps(out), flush=True)
        dist.destroy_process_group()
        sys.exit(0)
    sys.exit(main())
