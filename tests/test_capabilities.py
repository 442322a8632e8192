"""The `capabilities` /v1/models offers (the playground's form is built from them): every
preset's size choices and defaults are requests the same preset accepts."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from wanserve.api.capabilities import model_capabilities
from wanserve.api.params import parse_params, resolve_request
from conftest import REPO, png_bytes
from wanserve.engine.config import Defaults, Limits, load_config
from wanserve.engine.model.features import ModelFeatures

BASE = load_config([])
PRESETS = sorted((REPO / "configs").glob("*.yaml"))


def preset(path: Path):
    """The preset's request-facing sections (its LoRA files need not exist here)."""
    tree = yaml.safe_load(path.read_text())
    return dataclasses.replace(BASE, defaults=Defaults(**tree["defaults"]),
                               limits=Limits(**tree["limits"]),
                               sizes=tuple(tree.get("sizes") or ()))


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_each_offered_size_and_default_is_accepted(path):
    """Checked with: 1280x720 added to the 480p presets' `sizes:` (over their max_pixels)."""
    cfg = preset(path)
    features = (ModelFeatures(experts=1, text_to_video=True, last_frame=False)
                if "ti2v" in path.stem else ModelFeatures())
    caps = model_capabilities(cfg, features)
    assert caps.sizes and len(set(caps.sizes)) == len(caps.sizes)
    image = png_bytes(64, 48)
    for size in caps.sizes:
        request = resolve_request("job", parse_params({"prompt": "x", "size": size}), image, cfg,
                                  features)
        assert f"{request.width}x{request.height}" == size
    d = caps.defaults
    request = resolve_request("job", parse_params({
        "prompt": "x", "num_frames": d.num_frames, "fps": d.fps,
        "num_inference_steps": d.num_inference_steps, "guidance_scale": d.guidance_scale}),
        image, cfg, features)
    assert (request.num_frames, request.fps) == (d.num_frames, d.fps)
    assert caps.limits.max_steps == cfg.limits.max_steps and caps.last_frame is features.last_frame


def test_sizes_from_the_command_line():
    """Checked with: `_sizes` not splitting a string (wanserve/engine/config.py), one size per character."""
    cfg = load_config(["--set", "sizes=96x96, 64x48"])
    assert model_capabilities(cfg).sizes == ["96x96", "64x48"]
