"""Seeded LoRA files for the tiny model in each key format diffusers' Wan loader converts, and
the same LoRA merged into a copy of the weights by hand (no PEFT involved)."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

RANK = 4
# diffusers module name → original Wan name, for each block
MODULES = {
    **{f"attn1.{c}": f"self_attn.{o}" for o, c in zip("qkvo", ["to_q", "to_k", "to_v", "to_out.0"])},
    **{f"attn2.{c}": f"cross_attn.{o}" for o, c in zip("qkvo", ["to_q", "to_k", "to_v", "to_out.0"])},
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}


def tiny_shapes(model: Path) -> dict[str, tuple[int, int]]:
    weights = load_file(str(model / "transformer" / "diffusion_pytorch_model.safetensors"))
    return {key[:-len(".weight")]: tuple(value.shape) for key, value in weights.items()
            if key.startswith("blocks.") and key[:-len(".weight")].split(".", 2)[2] in MODULES
            and key.endswith(".weight")}


def make_lora(model: Path, seed: int, std: float = 0.2) -> dict[str, tuple[torch.Tensor, ...]]:
    """{module: (A [r, in], B [out, r])}; the delta is B @ A."""
    g = torch.Generator().manual_seed(seed)
    return {m: (torch.randn(RANK, i, generator=g) * std, torch.randn(o, RANK, generator=g) * std)
            for m, (o, i) in sorted(tiny_shapes(model).items())}


def write_diffusers(lora: dict, path: Path, prefix: str = "transformer") -> Path:
    save_file({f"{prefix}.{m}.lora_{ab}.weight": t.contiguous()
               for m, (a, b) in lora.items() for ab, t in (("A", a), ("B", b))}, str(path))
    return path


def _wan_name(module: str) -> str:
    block, index, rest = module.split(".", 2)
    return f"blocks.{index}.{MODULES[rest]}"


def write_original_wan(lora: dict, path: Path) -> Path:
    """`diffusion_model.*` with lora_down/lora_up and alpha = 2 * rank (up halved to match)."""
    out = {}
    for m, (a, b) in lora.items():
        name = "diffusion_model." + _wan_name(m)
        out[f"{name}.lora_down.weight"] = a.contiguous()
        out[f"{name}.lora_up.weight"] = (b / 2).contiguous()
        out[f"{name}.alpha"] = torch.tensor(2.0 * RANK)
    save_file(out, str(path))
    return path


def write_musubi(lora: dict, path: Path) -> Path:
    """kohya/musubi `lora_unet_blocks_0_self_attn_q.*` with alpha = rank / 2 (up doubled)."""
    out = {}
    for m, (a, b) in lora.items():
        name = "lora_unet_" + _wan_name(m).replace(".", "_")
        out[f"{name}.lora_down.weight"] = a.contiguous()
        out[f"{name}.lora_up.weight"] = (b * 2).contiguous()
        out[f"{name}.alpha"] = torch.tensor(RANK / 2)
    save_file(out, str(path))
    return path


def merged_model(model: Path, target: Path, merges: dict[str, list[tuple[dict, float]]]) -> Path:
    """A copy of `model` with W += scale * B @ A for each (lora, scale) of each expert."""
    shutil.copytree(model, target)
    for expert, items in merges.items():
        file = target / expert / "diffusion_pytorch_model.safetensors"
        weights = load_file(str(file))
        for lora, scale in items:
            for m, (a, b) in lora.items():
                key = m + ".weight"
                weights[key] = (weights[key].double() + scale * (b.double() @ a.double())).to(
                    weights[key].dtype)
        save_file(weights, str(file), metadata={"format": "pt"})
    return target
