"""One rank of wanserve returns the float frames plain diffusers returns for the same request.

The reference is diffusers' own pipeline on the same tiny weights (`WanImageToVideoPipeline`;
for a TI2V request without an image, `WanPipeline`), in a process of its own that imports no
wanserve module (no xfuser, no wanserve/engine/cpu kernels), so a bug shared by every wanserve layout,
which the multi-rank equivalence tests cannot see, shows here. This file, run as a script, is
that reference. tests/test_ti2v.py compares the TI2V miniature the same way.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import REPO
from test_multirank_equivalence import run_layout

# wanserve.engine.serving.offline fills the rest from configs/tiny.yaml's defaults, spelled out here for diffusers
DEFAULTS = {"prompt": "a lighthouse in a storm", "negative_prompt": "", "num_frames": 9,
            "num_inference_steps": 4, "guidance_scale": 3.5, "boundary_ratio": 0.875,
            "flow_shift": 3.0, "image_seed": 0}
REQUESTS = [
    {"width": 128, "height": 128, "seed": 1},
    {"width": 144, "height": 112, "seed": 2, "image_seed": 3, "guidance_scale": 5.0,
     "guidance_scale_2": 2.0, "boundary_ratio": 0.6, "flow_shift": 5.0, "num_frames": 5},
    {"width": 128, "height": 128, "seed": 1, "last_image_seed": 5},  # first+last frame
]
# measured at most 1.7e-6: our CPU kernels (oneDNN convolutions, attention) sum in another order
TOLERANCE = 1e-5


def diffusers_frames(model_path: Path, specs: list, tmp_path: Path) -> dict:
    """{"frames_<i>": float frames} of plain diffusers for `specs` (complete: every field it
    needs), run in a process of its own."""
    from wanserve.engine.serving.offline import synthetic_image

    for index, spec in enumerate(specs):
        for key in ("image_seed", "last_image_seed"):
            if spec.get(key) is not None:
                np.save(tmp_path / f"{key}_{index}.npy",
                        synthetic_image(spec["width"], spec["height"], spec[key]))
    (tmp_path / "specs.json").write_text(json.dumps(specs))
    proc = subprocess.run(
        [str(REPO / ".venv/bin/python"), __file__, str(model_path), str(tmp_path)],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
        text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp_path / "reference.npz") as reference:
        return {key: reference[key] for key in reference.files}


def assert_frames_match(ours: dict, reference: dict, tolerance: float = TOLERANCE) -> None:
    assert ours.keys() == reference.keys()
    for key, expected in reference.items():
        assert ours[key].shape == expected.shape, key
        assert expected.std() > 0.01
        diff = float(np.abs(ours[key] - expected).max())
        print(f"{key}: max |diff| {diff:.2e}")
        assert diff <= tolerance, f"{key}: max |diff| {diff:.2e} > {tolerance}"


def test_one_rank_matches_plain_diffusers(tmp_path):
    """checked with: the CPU causal-conv kernel ignoring its cached frames
    (wanserve/engine/cpu/vae_kernels.py with_causal_frames); the last frame (request 2) with
    `last_image` not passed (wanserve/engine/serving/generate.py _denoise)."""
    from wanserve.engine.model.tiny_model import ensure_tiny_model

    ours = run_layout(tmp_path, 1, requests=REQUESTS)
    specs = [{**DEFAULTS, **spec} for spec in REQUESTS]
    assert_frames_match(ours, diffusers_frames(ensure_tiny_model(), specs, tmp_path))


def _image(work: Path, key: str, index: int):
    import PIL.Image

    path = work / f"{key}_{index}.npy"
    return PIL.Image.fromarray(np.load(path)) if path.exists() else None


def _reference(model_path: str, work: Path) -> None:
    import torch
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline

    assert not any(name.split(".")[0] in ("wanserve", "xfuser") for name in sys.modules)
    frames = {}
    for index, spec in enumerate(json.loads((work / "specs.json").read_text())):
        image, last_image = _image(work, "image_seed", index), _image(work, "last_image_seed", index)
        two_experts = spec.get("boundary_ratio") is not None
        inputs = {"image": image, "last_image": last_image} if image is not None else {}
        pipe = (WanImageToVideoPipeline if image is not None else WanPipeline).from_pretrained(
            model_path, torch_dtype=torch.float32,
            **({"boundary_ratio": spec["boundary_ratio"]} if two_experts else {}))
        pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config,
                                                             flow_shift=spec["flow_shift"])
        pipe.set_progress_bar_config(disable=True)
        out = pipe(
            **inputs,
            prompt=spec["prompt"], negative_prompt=spec["negative_prompt"],
            height=spec["height"], width=spec["width"], num_frames=spec["num_frames"],
            num_inference_steps=spec["num_inference_steps"],
            guidance_scale=spec["guidance_scale"],
            guidance_scale_2=(spec.get("guidance_scale_2", spec["guidance_scale"])
                              if two_experts else None),
            generator=torch.Generator(device="cpu").manual_seed(spec["seed"]),
            output_type="np")
        frames[f"frames_{index}"] = np.asarray(out.frames[0], dtype=np.float32)
    np.savez(work / "reference.npz", **frames)


if __name__ == "__main__":
    _reference(sys.argv[1], Path(sys.argv[2]))
