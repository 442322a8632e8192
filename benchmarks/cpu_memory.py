"""What keeping freed memory in the process (wanserve/engine/cpu_memory.py) costs and saves on one rank.

    .venv/bin/python benchmarks/cpu_memory.py [--config configs/tiny.yaml] [--repeat 4]

1. First touch: microseconds per 4 KiB page to write a freshly mapped page against one already
   written (an anonymous mmap, one byte per page).
2. For `cpu.keep_freed_memory` true and false, one fresh one-rank process each (the
   setting is process-wide) runs the engine's `generate` on a cycle of six request sizes,
   --repeat times, and reports per request the seconds, the page faults and the resident memory
   after it, and the process's peak resident memory (VmHWM, loading included).
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIZES = [(128, 128, 9), (256, 144, 17), (96, 160, 13), (256, 256, 17), (144, 112, 5),
         (192, 192, 9)]


def touch_cost_us(megabytes: int = 64) -> tuple[float, float]:
    size, page = megabytes << 20, 4096
    region = mmap.mmap(-1, size)
    try:
        timings = []
        for value in (1, 2):  # first touch, then the same pages again
            start = time.perf_counter()
            for offset in range(0, size, page):
                region[offset] = value
            timings.append((time.perf_counter() - start) / (size // page) * 1e6)
        return timings[0], timings[1]
    finally:
        region.close()


def status_mib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) >> 10
    return -1


def child(argv: list[str], repeat: int) -> dict:
    from wanserve.engine.assembly import assemble
    from wanserve.engine.config import load_config
    from wanserve.engine.parallel.distributed import init_distributed, shutdown
    from wanserve.engine.serving.generate import generate
    from wanserve.engine.serving.offline import request_from_spec
    from wanserve.engine.startup import resolve_model_path

    cfg = load_config(argv)
    ctx = init_distributed(cfg.layout, cfg.collective_timeout_s)
    try:
        served = assemble(cfg, ctx, resolve_model_path(cfg))
        pipe = served.pipe
        runs = []
        for round_ in range(repeat):
            for i, (width, height, frames) in enumerate(SIZES):
                spec = {"width": width, "height": height, "num_frames": frames, "seed": i}
                request = request_from_spec(f"r{round_}-{i}", spec, cfg)
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                generate(pipe, request, lambda *_: False)
                runs.append({"seconds": time.perf_counter() - start,
                             "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults,
                             "rss_mib": status_mib("VmRSS")})
        return {"kept": cfg.cpu.keep_freed_memory,
                "allocator": served.info["cpu_tuning"]["allocator"],
                "runs": runs, "peak_mib": status_mib("VmHWM")}
    finally:
        shutdown()


def run_child(args: argparse.Namespace, keep: bool) -> dict:
    cmd = [str(REPO / ".venv" / "bin" / "torchrun"), "--standalone", "--nproc-per-node", "1",
           __file__, "--child", "--repeat", str(args.repeat), "--config", str(args.config),
           "--set", f"cpu.keep_freed_memory={str(keep).lower()}"]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=REPO / "configs" / "tiny.yaml")
    p.add_argument("--repeat", type=int, default=4, help="cycles through the six sizes")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.child:
        sys.path.insert(0, str(REPO))
        print(json.dumps(child(["--config", str(args.config), *rest], args.repeat)))
        return 0
    first, again = touch_cost_us()
    print(f"first touch {first:.2f} us/page, already mapped {again:.2f} us/page")
    print(f"{'freed memory':<14}{'s/request':>10}{'faults/request':>16}"
          f"{'RSS after each cycle (MiB)':>30}{'peak (MiB)':>12}")
    for keep in (True, False):
        result = run_child(args, keep)
        later = result["runs"][len(SIZES):]  # the first cycle grows the heap either way
        cycles = [r["rss_mib"] for r in result["runs"][len(SIZES) - 1::len(SIZES)]]
        print(f"{'kept' if keep else 'glibc default':<14}"
              f"{statistics.median(r['seconds'] for r in later):>10.3f}"
              f"{statistics.median(r['faults'] for r in later):>16.0f}"
              f"{' '.join(map(str, cycles)):>30}{result['peak_mib']:>12}")
    print("medians over every cycle after the first; the same request sizes in both processes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
