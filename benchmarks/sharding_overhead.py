"""Denoising step time with the weights sharded (FSDP2 all-gathers each block before it runs):
U2 on the bench model, unsharded against `--shard-weights`, and against `--shard-weights
--text-encoder shard`.

    .venv/bin/python benchmarks/sharding_overhead.py [--config configs/bench-cpu.yaml]
        [--repeat 3] [--rounds 2] [wanserve.engine.serving.offline flags ...]

Per variant, one two-rank `wanserve.engine.serving.offline` (Ulysses 2) runs the same request
--repeat times (the first is a warm-up); the variants take turns within each round. Prints the
median and the fastest `step_mean` and text-encode time of each and their ratios to the
unsharded run; on a shared machine the fastest is the least disturbed. On gloo and a CPU the
all-gathers are memory copies between processes: a GPU's NCCL all-gathers overlap the previous
block's compute (FSDP2's prefetch), so the CPU ratio bounds the cost from above.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_bench_model import model_flags  # noqa: E402
from lora_overhead import run, turns_parser  # noqa: E402

VARIANTS = {
    "unsharded": [],
    "sharded": ["--shard-weights"],
    "sharded+text": ["--shard-weights", "--text-encoder", "shard"],
}


def main() -> int:
    args, rest = turns_parser().parse_known_args()
    flags = ["--config", str(args.config), *model_flags(args.config, args.model),
             "--ulysses", "2", *rest]
    steps: dict[str, list[float]] = {name: [] for name in VARIANTS}
    encodes: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp_name:
        for _ in range(args.rounds):
            for name, extra in VARIANTS.items():
                # a new prompt each request: the text encoder runs every time
                requests = [{"seed": 0, "prompt": f"a lantern on a lake, take {i}"}
                            for i in range(args.repeat + 1)]
                runs = run(Path(tmp_name), name, flags + extra, requests, 1, nproc=2)
                steps[name] += [r["step_mean"] for r in runs]
                encodes[name] += [r["text_encode"] for r in runs]
    base, fastest = statistics.median(steps["unsharded"]), min(steps["unsharded"])
    print(f"U2, {args.config.name}: over {len(steps['unsharded'])} requests each, "
          "median and fastest")
    for name, values in steps.items():
        value = statistics.median(values)
        print(f"  {name:13s} step {value * 1000:8.1f} ms  {value / base:5.3f}x   fastest "
              f"{min(values) * 1000:8.1f} ms  {min(values) / fastest:5.3f}x   text encode "
              f"{statistics.median(encodes[name]) * 1000:6.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
