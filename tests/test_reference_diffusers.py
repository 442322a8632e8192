"""One rank of wanserve returns the float frames plain diffusers returns for the same request.

The reference is diffusers' own `WanImageToVideoPipeline` on the same tiny weights, in a
process of its own that imports no wanserve module (no xfuser, no engine/cpu kernels), so a
bug shared by every wanserve layout, which the multi-rank equivalence tests cannot see, shows
here. This file, run as a script, is that reference.
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

# engine.offline fills the rest from configs/tiny.yaml's defaults, spelled out here for diffusers
DEFAULTS = {"prompt": "a lighthouse in a storm", "negative_prompt": "", "num_frames": 9,
            "num_inference_steps": 4, "guidance_scale": 3.5, "boundary_ratio": 0.875,
            "flow_shift": 3.0, "image_seed": 0}
REQUESTS = [
    {"width": 128, "height": 128, "seed": 1},
    {"width": 144, "height": 112, "seed": 2, "image_seed": 3, "guidance_scale": 5.0,
     "guidance_scale_2": 2.0, "boundary_ratio": 0.6, "flow_shift": 5.0, "num_frames": 5},
]
# measured at most 1.7e-6: our CPU kernels (oneDNN convolutions, attention) sum in another order
TOLERANCE = 1e-5


def test_one_rank_matches_plain_diffusers(tmp_path):
    """checked with: the CPU causal-conv kernel ignoring its cached frames
    (engine/cpu/vae_kernels.py with_causal_frames)."""
    ours = run_layout(tmp_path, 1, requests=REQUESTS)
    from engine.offline import synthetic_image
    from engine.tiny_model import ensure_tiny_model

    specs = [{**DEFAULTS, **spec} for spec in REQUESTS]
    for index, spec in enumerate(specs):
        np.save(tmp_path / f"image_{index}.npy",
                synthetic_image(spec["width"], spec["height"], spec["image_seed"]))
    (tmp_path / "specs.json").write_text(json.dumps(specs))
    proc = subprocess.run(
        [str(REPO / ".venv/bin/python"), __file__, str(ensure_tiny_model()), str(tmp_path)],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
        text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp_path / "reference.npz") as reference:
        for index in range(len(REQUESTS)):
            expected = reference[f"frames_{index}"]
            got = ours[f"frames_{index}"]
            assert got.shape == expected.shape
            assert expected.std() > 0.01
            diff = float(np.abs(got - expected).max())
            print(f"request {index}: max |diff| {diff:.2e}")
            assert diff <= TOLERANCE, f"request {index}: max |diff| {diff:.2e} > {TOLERANCE}"


def _reference(model_path: str, work: Path) -> None:
    import PIL.Image
    import torch
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline

    assert not any(name.split(".")[0] in ("engine", "api", "kernels", "xfuser")
                   for name in sys.modules)
    frames = {}
    for index, spec in enumerate(json.loads((work / "specs.json").read_text())):
        pipe = WanImageToVideoPipeline.from_pretrained(
            model_path, torch_dtype=torch.float32, boundary_ratio=spec["boundary_ratio"])
        pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config,
                                                             flow_shift=spec["flow_shift"])
        pipe.set_progress_bar_config(disable=True)
        out = pipe(
            image=PIL.Image.fromarray(np.load(work / f"image_{index}.npy")),
            prompt=spec["prompt"], negative_prompt=spec["negative_prompt"],
            height=spec["height"], width=spec["width"], num_frames=spec["num_frames"],
            num_inference_steps=spec["num_inference_steps"],
            guidance_scale=spec["guidance_scale"],
            guidance_scale_2=spec.get("guidance_scale_2", spec["guidance_scale"]),
            generator=torch.Generator(device="cpu").manual_seed(spec["seed"]),
            output_type="np")
        frames[f"frames_{index}"] = np.asarray(out.frames[0], dtype=np.float32)
    np.savez(work / "reference.npz", **frames)


if __name__ == "__main__":
    _reference(sys.argv[1], Path(sys.argv[2]))
