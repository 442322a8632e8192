"""Build the transformer-bound CPU benchmark model and print its path.

    .venv/bin/python benchmarks/build_bench_model.py    # -> ~/.cache/wanserve/bench-wide-<digest>

The tiny model's experts are so small that the VAE and the encoders dominate a request on CPU,
so parallel speed-ups of the denoising loop are drowned out. This is the same miniature
Wan2.2-I2V (random, seeded, diffusers format) with wider, deeper experts: 8 heads x 64
(inner 512), ffn 2048, 4 layers. At 256x256 x 17 frames and 8 steps the denoising loop is
about 60% of a one-rank request (BENCHMARKS.md).
Use it with configs/bench-cpu.yaml; the benchmark scripts pass its path as --model.
"""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

# wanserve.engine.model.tiny_model imports torch: it is imported inside the functions, so the benchmark
# drivers can import bench_model_path() without loading torch themselves.


def bench_spec() -> dict:
    from wanserve.engine.model.tiny_model import TINY_SPEC

    spec = copy.deepcopy(TINY_SPEC)
    spec["name"] = "bench-wide"
    spec["transformer"].update(num_attention_heads=8, attention_head_dim=64, ffn_dim=2048,
                               num_layers=4, text_dim=32)
    spec["vae"]["base_dim"] = 16  # the VAE of every figure taken with it (the tiny one has 8)
    return spec


def ensure_bench_model(cache_dir: Path | None = None) -> Path:
    """The bench model's folder, built on first use (the tiny model's builder, wider spec)."""
    from wanserve.engine.model.tiny_model import ensure_random_model

    return ensure_random_model(bench_spec(), "bench-wide", cache_dir)


def bench_model_path(python: str = sys.executable) -> Path:
    """Build (if needed) in a child process, so the caller never imports torch itself."""
    out = subprocess.run([python, str(Path(__file__).resolve())], check=True,
                         capture_output=True, text=True).stdout
    return Path(out.strip().splitlines()[-1])


def model_flags(config: Path, model: str | None) -> list[str]:
    """--model as given; else the preset's; else (a preset with `model: null`) the bench model."""
    import yaml

    if model:
        return ["--model", model]
    with open(config) as f:
        preset = yaml.safe_load(f) or {}
    return [] if preset.get("model") else ["--model", str(bench_model_path())]


if __name__ == "__main__":
    print(ensure_bench_model())
