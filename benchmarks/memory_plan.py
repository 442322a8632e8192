"""Per-rank memory of Wan2.2-I2V-A14B from the memory plan (a model, not a measurement).

    .venv/bin/python benchmarks/memory_plan.py [--frames 81] [--vae-dtype float32]

The plan (wanserve/engine/model/memory_plan.py) is built from the published configuration
(wanserve/engine/model/model_layouts.py): weights counted on the meta device in bfloat16 with
diffusers' fp32-kept modules, activations from fake-tensor traces. Each rank count runs Ulysses
over all its ranks with the VAE sharded by rows (wanserve's default layout on one replica).
Beside it, the per-GPU peaks Wan2.2 publishes for I2V-A14B, 81 frames on H100 (GB):
1 GPU with offload and the text encoder on the CPU, 4 and 8 GPUs with FSDP + Ulysses.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wanserve.engine.model.memory_plan import MemoryPlan, ModelShapes, Placement  # noqa: E402
from wanserve.engine.model.model_layouts import WAN22_I2V_A14B  # noqa: E402

SIZES = {"480p": (832, 480), "720p": (1280, 720)}
OFFICIAL_GB = {("480p", 1): 41.0, ("480p", 4): 40.8, ("480p", 8): 26.1,
               ("720p", 1): 59.7, ("720p", 4): 51.6, ("720p", 8): 37.0}
RANKS = (1, 2, 4, 8)
GB = 1e9


def placements(ranks: int, dtype: torch.dtype, vae_dtype: torch.dtype):
    """(label, Placement) for each way of holding the weights at this rank count."""
    common = dict(dtype=dtype, vae_dtype=vae_dtype, sequence_parallel=ranks, vae_ranks=ranks)
    yield "both experts", Placement(**common)
    yield "offload, text enc. cpu", Placement(**common, offload_inactive_expert=True,
                                              text_encoder_on_device=False)
    if ranks > 1:
        yield "sharded", Placement(**common, shard_ranks=ranks)
        yield "sharded, text enc. cpu", Placement(**common, shard_ranks=ranks,
                                                  text_encoder_on_device=False)
        yield "sharded, text enc. too", Placement(**common, shard_ranks=ranks,
                                                  text_encoder_shard_ranks=ranks)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--vae-dtype", choices=["float32", "bfloat16"], default="float32")
    args = p.parse_args()
    dtype, vae_dtype = torch.bfloat16, getattr(torch, args.vae_dtype)
    plan = MemoryPlan.build(ModelShapes.of_layout(WAN22_I2V_A14B),
                            Placement(dtype=dtype, vae_dtype=vae_dtype))
    c = plan.components
    print(f"A14B parameters (GB): each expert {c['expert'] / GB:.2f}, text encoder "
          f"{c['text_encoder'] / GB:.2f}, VAE {c['vae'] / GB:.2f} (bf16, VAE {args.vae_dtype})")
    print(f"{'size':<6}{'ranks':>6}  {'weights held':<24}{'weights':>9}{'denoise':>9}"
          f"{'encode':>8}{'decode':>8}{'peak GB':>9}{'Wan2.2 published':>18}")
    for name, (width, height) in SIZES.items():
        for ranks in RANKS:
            for label, placement in placements(ranks, dtype, vae_dtype):
                need = plan.with_placement(placement).request(width, height, args.frames)
                official = OFFICIAL_GB.get((name, ranks))
                print(f"{name:<6}{ranks:>6}  {label:<24}{need['weights'] / GB:>9.1f}"
                      f"{need['denoise'] / GB:>9.1f}{need['vae_encode'] / GB:>8.1f}"
                      f"{need['vae_decode'] / GB:>8.1f}{need['peak'] / GB:>9.1f}"
                      f"{'' if official is None else f'{official:.1f}':>18}")
    print(f"{args.frames} frames; GB = 1e9 bytes; a model of the memory, not a measurement")
    return 0


if __name__ == "__main__":
    sys.exit(main())
