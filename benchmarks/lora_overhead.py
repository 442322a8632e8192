"""Denoising step time with a LoRA: base vs the adapter per request (unfused) vs fused.

    .venv/bin/python benchmarks/lora_overhead.py [--config configs/bench-cpu.yaml]
        [--rank 64] [--repeat 3] [--rounds 2] [engine.offline flags ...]

A seeded rank-`--rank` LoRA on every attention and FFN projection of both experts (diffusers
format) is written to a temporary folder. Per variant, one single-rank `engine.offline` runs
the same request --repeat times (the first is a warm-up); the variants take turns within each
round. Prints the median `step_mean` of each and the ratios to base (goal: unfused <= 1.10x,
fused 1.00x; printed, not asserted).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_bench_model import model_flags  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROJECTIONS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
               "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")


def write_lora(model: Path, rank: int, path: Path) -> None:
    weights = load_file(str(model / "transformer" / "diffusion_pytorch_model.safetensors"))
    g = torch.Generator().manual_seed(0)
    out = {}
    for key, value in weights.items():
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and module.split(".", 2)[-1] in PROJECTIONS:
            out_dim, in_dim = value.shape
            out[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, in_dim, generator=g) * .01
            out[f"transformer.{module}.lora_B.weight"] = torch.randn(out_dim, rank, generator=g) * .01
    save_file(out, str(path))


def run(tmp: Path, name: str, flags: list[str], request: dict, repeat: int) -> list[float]:
    requests = tmp / f"{name}.json"
    requests.write_text(json.dumps([request]))
    out = tmp / f"{name}.npz"
    cmd = [str(REPO / ".venv/bin/torchrun"), "--standalone", "--nproc-per-node", "1", "-m",
           "engine.offline", "--requests", str(requests), "--out", str(out),
           "--repeat", str(repeat), *flags]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    runs = json.loads((tmp / f"{name}.npz.json").read_text())["runs"]
    return [r["step_mean"] for r in runs[1:]]  # the first is a warm-up


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "bench-cpu.yaml")
    parser.add_argument("--model")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args, rest = parser.parse_known_args()
    flags = ["--config", str(args.config), *model_flags(args.config, args.model), *rest]
    model = Path(flags[flags.index("--model") + 1]) if "--model" in flags else None
    if model is None or model.name == "tiny" or not model.is_dir():
        from engine.tiny_model import ensure_tiny_model

        model = ensure_tiny_model()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        lora = tmp / "lora.safetensors"
        write_lora(model, args.rank, lora)
        variants = {
            "base": ([], {}),
            "unfused": (["--lora", f"x={lora}"], {"lora": "x"}),
            "fused": (["--set", f"loras.x.path={lora}", "--set", "loras.x.fuse=true"], {}),
        }
        steps: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, (extra, request) in variants.items():
                steps[name] += run(tmp, name, flags + extra, {"seed": 0, **request},
                                   args.repeat + 1)
    base = statistics.median(steps["base"])
    print(f"LoRA rank {args.rank}, {args.config.name}: median step time")
    for name, values in steps.items():
        value = statistics.median(values)
        print(f"  {name:8s} {value * 1000:8.1f} ms  {value / base:5.3f}x base")
    return 0


if __name__ == "__main__":
    sys.exit(main())
