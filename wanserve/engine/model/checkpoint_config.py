"""What a diffusers checkpoint's config files say, read without importing any model code: the
start-up checks run on it before the seconds of importing diffusers and xfuser."""
from __future__ import annotations

import json
from pathlib import Path


def component_config(model_path: Path, component: str) -> dict:
    with open(Path(model_path) / component / "config.json") as f:
        return json.load(f)


def num_attention_heads(model_path: Path) -> int:
    return int(component_config(model_path, "transformer")["num_attention_heads"])


def size_multiple(model_path: Path) -> int:
    """Pixels per token side: the VAE's spatial factor times the transformer's patch (16 for
    A14B, 32 for TI2V-5B). Widths and heights must be multiples of it."""
    vae = component_config(model_path, "vae").get("scale_factor_spatial") or 8
    return int(vae) * int(component_config(model_path, "transformer")["patch_size"][1])
