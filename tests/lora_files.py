"""Seeded LoRA files for the tiny model in each key format diffusers' Wan loader converts, and
the same LoRA merged into a copy of the weights by hand (no PEFT involved).

A LoRA here is {module: (A [r, in], B [out, r])} or, with a bias delta, (A, B, bias [out]);
its delta is W += B @ A (and b += bias)."""
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


def with_bias_and_head(model: Path, lora: dict, seed: int, std: float = 0.2) -> dict:
    """`lora` with a bias delta on every projection, plus a full-rank delta (and bias delta) on
    the output head `proj_out`, as the original Wan format's `diff_b` and `head.head.diff`
    keys carry them (lightx2v's distilled LoRAs have both)."""
    g = torch.Generator().manual_seed(seed)
    out = {m: (a, b, torch.randn(b.shape[0], generator=g) * std) for m, (a, b) in lora.items()}
    head = load_file(str(model / "transformer" / "diffusion_pytorch_model.safetensors"))
    rows, cols = head["proj_out.weight"].shape
    out["proj_out"] = (torch.randn(rows, cols, generator=g) * std / 4, torch.eye(rows),
                       torch.randn(rows, generator=g) * std)
    return out


def write_diffusers(lora: dict, path: Path, prefix: str = "transformer") -> Path:
    save_file({f"{prefix}.{m}.lora_{ab}.weight": t.contiguous()
               for m, (a, b) in lora.items() for ab, t in (("A", a), ("B", b))}, str(path))
    return path


def _wan_name(module: str) -> str:
    block, index, rest = module.split(".", 2)
    return f"blocks.{index}.{MODULES[rest]}"


def _original_wan_keys(lora: dict) -> dict:
    """`diffusion_model.*` with lora_down/lora_up and alpha = 2 * rank (up halved to match);
    a bias delta as `diff_b`; `proj_out` as `head.head.diff` and `head.head.diff_b`."""
    out = {}
    for m, (a, b, *bias) in lora.items():
        if m == "proj_out":  # a full delta: diffusers takes it as A with an identity B
            out["diffusion_model.head.head.diff"] = (b @ a).contiguous()
            out["diffusion_model.head.head.diff_b"] = bias[0].contiguous()
            continue
        name = "diffusion_model." + _wan_name(m)
        out[f"{name}.lora_down.weight"] = a.contiguous()
        out[f"{name}.lora_up.weight"] = (b / 2).contiguous()
        out[f"{name}.alpha"] = torch.tensor(2.0 * RANK)
        if bias:
            out[f"{name}.diff_b"] = bias[0].contiguous()
    return out


def write_original_wan(lora: dict, path: Path) -> Path:
    save_file(_original_wan_keys(lora), str(path))
    return path


def write_wan21_i2v(lora: dict, path: Path, seed: int, image_dim: int = 32) -> Path:
    """A Wan2.1 I2V LoRA in the original format: `lora` plus the image-attention projections
    (`cross_attn.k_img` / `v_img`) of every block and the image embedder (`img_emb.proj.1` /
    `.3`), none of which Wan2.2-I2V has: its loader must drop them and say so."""
    g = torch.Generator().manual_seed(seed)
    out = _original_wan_keys(lora)
    blocks = sorted({m.split(".")[1] for m in lora if m.startswith("blocks.")})
    dim = lora[f"blocks.{blocks[0]}.attn2.to_k"][1].shape[0]
    shapes = {f"blocks.{i}.cross_attn.{o}": (dim, dim) for i in blocks for o in ("k_img", "v_img")}
    shapes.update({"img_emb.proj.1": (image_dim, image_dim), "img_emb.proj.3": (dim, image_dim)})
    for name, (rows, cols) in shapes.items():
        out[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(RANK, cols, generator=g)
        out[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(rows, RANK, generator=g)
        if not name.startswith("img_emb"):  # diffusers 0.42.1 refuses an img_emb alpha
            out[f"diffusion_model.{name}.alpha"] = torch.tensor(float(RANK))
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
            for m, (a, b, *bias) in lora.items():
                for key, delta in ((m + ".weight", b.double() @ a.double()),
                                   *((m + ".bias", bias[0].double()) for _ in bias)):
                    weights[key] = (weights[key].double() + scale * delta).to(weights[key].dtype)
        save_file(weights, str(file), metadata={"format": "pt"})
    return target
