"""Denoising step time with a LoRA: base vs the adapter per request (unfused) vs fused; then
one whole request with the distilled preset's settings against the 40-step CFG one.

    .venv/bin/python benchmarks/lora_overhead.py [--config configs/bench-cpu.yaml]
        [--rank 64] [--repeat 3] [--rounds 2] [--no-distilled] [wanserve.engine.serving.offline flags ...]

A seeded rank-`--rank` LoRA on every attention and FFN projection of both experts (diffusers
format) is written to a temporary folder. Per variant, one single-rank `wanserve.engine.serving.offline` runs
the same request --repeat times (the first is a warm-up); the variants take turns within each
round. Prints the median and the fastest `step_mean` of each and their ratios to base (goal:
unfused <= 1.10x, fused 1.00x; printed, not asserted); on a shared machine the fastest is the
least disturbed.

The distilled part runs the Lightning presets' settings (4 steps, guidance 1 / 1, boundary 0.9,
flow_shift 5, the Euler solver, the LoRA fused into both experts) and the A14B presets' (40
steps, guidance 3.5 / 3.5, UniPC, no LoRA) at the preset's size, once per round after a
2-step warm-up, taking turns; it prints the median whole-request time, the transformer forwards per
video and the ratios. (The LoRA is random: the distilled video is not a good one, only as fast.)
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


def run(tmp: Path, name: str, flags: list[str], requests_: list[dict], repeat: int,
        nproc: int = 1) -> list[dict]:
    """The runs of `requests_` (--repeat times over) in one wanserve.engine.serving.offline on
    `nproc` ranks, less the first."""
    requests = tmp / f"{name}.json"
    requests.write_text(json.dumps(requests_))
    out = tmp / f"{name}.npz"
    cmd = [str(REPO / ".venv/bin/torchrun"), "--standalone", "--nproc-per-node", str(nproc), "-m",
           "wanserve.engine.serving.offline", "--requests", str(requests), "--out", str(out),
           "--repeat", str(repeat), *flags]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads((tmp / f"{name}.npz.json").read_text())["runs"][1:]  # after a warm-up


DISTILLED = {"num_inference_steps": 4, "guidance_scale": 1.0, "guidance_scale_2": 1.0,
             "boundary_ratio": 0.9, "flow_shift": 5.0, "sample_solver": "euler"}
FULL = {"num_inference_steps": 40, "guidance_scale": 3.5, "guidance_scale_2": 3.5,
        "boundary_ratio": 0.9, "flow_shift": 5.0, "sample_solver": "unipc"}


def step_overhead(tmp: Path, flags: list[str], lora: Path, args) -> None:
    variants = {
        "base": ([], {}),
        "unfused": (["--lora", f"x={lora}"], {"lora": "x"}),
        "fused": (["--set", f"loras.x.path={lora}", "--set", "loras.x.fuse=true"], {}),
    }
    steps: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (extra, request) in variants.items():
            steps[name] += [r["step_mean"] for r in run(tmp, name, flags + extra,
                                                          [{"seed": 0, **request}], args.repeat + 1)]
    base, fastest = statistics.median(steps["base"]), min(steps["base"])
    print(f"LoRA rank {args.rank}, {args.config.name}: step time over {len(steps['base'])} "
          "requests each, median and fastest")
    for name, values in steps.items():
        value = statistics.median(values)
        print(f"  {name:8s} {value * 1000:8.1f} ms  {value / base:5.3f}x base   fastest "
              f"{min(values) * 1000:8.1f} ms  {min(values) / fastest:5.3f}x base")


def distilled_vs_full(tmp: Path, flags: list[str], lora: Path, args) -> None:
    variants = {
        "distilled": (["--set", f"loras.x.path={lora}", "--set", "loras.x.fuse=true"], DISTILLED),
        "full": ([], FULL),
    }
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (extra, request) in variants.items():
            # the warm-up: the same request with 2 steps
            warm_up = {"seed": 0, **request, "num_inference_steps": 2}
            runs[name] += run(tmp, name, flags + extra, [warm_up, {"seed": 0, **request}], 1)
    print(f"whole request, {args.config.name} size: median wall time")
    walls = {name: statistics.median(r["wall"] for r in values) for name, values in runs.items()}
    for name, values in runs.items():
        forwards = values[0]["forwards"]
        denoise = statistics.median(r["denoise"] for r in values)
        print(f"  {name:9s} {walls[name]:8.2f} s (denoise {denoise:7.2f} s)  "
              f"{sum(forwards):3d} forwards ({len(forwards)} steps x {max(forwards)})")
    print(f"  full / distilled: {walls['full'] / walls['distilled']:.2f}x the time, "
          f"{sum(runs['full'][0]['forwards']) / sum(runs['distilled'][0]['forwards']):.0f}x "
          "the forwards")


def turns_parser() -> argparse.ArgumentParser:
    """The options of a benchmark whose variants take turns in offline jobs."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "bench-cpu.yaml")
    parser.add_argument("--model")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    return parser


def main() -> int:
    parser = turns_parser()
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--no-distilled", action="store_true",
                        help="only the step times, not the distilled vs 40-step requests")
    args, rest = parser.parse_known_args()
    flags = ["--config", str(args.config), *model_flags(args.config, args.model), *rest]
    model = Path(flags[flags.index("--model") + 1]) if "--model" in flags else None
    if model is None or model.name == "tiny" or not model.is_dir():
        from wanserve.engine.model.tiny_model import ensure_tiny_model

        model = ensure_tiny_model()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        lora = tmp / "lora.safetensors"
        write_lora(model, args.rank, lora)
        step_overhead(tmp, flags, lora, args)
        if not args.no_distilled:
            distilled_vs_full(tmp, flags, lora, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
