"""`vae_dtype`: the VAE in bfloat16 makes the same video as in float32, within bfloat16's
rounding, through the engine's own code (the offline runner)."""
from __future__ import annotations

import numpy as np

from conftest import run_offline


def test_a_bfloat16_vae_makes_the_float32_video_within_its_rounding(tmp_path):
    """checked with: the cast in wanserve/engine/assembly.py (`pipe.vae.to(...)`) removed."""
    spec = [{"width": 64, "height": 48, "num_frames": 9, "num_inference_steps": 2, "seed": 3}]
    full = run_offline(tmp_path, 1, spec)[0]["frames_0"]
    half = run_offline(tmp_path, 1, spec, "--vae-dtype", "bfloat16")[0]["frames_0"]
    assert full.shape == half.shape == (9, 48, 64, 3) and full.dtype == half.dtype == np.float32
    error = float(np.mean((full.astype(np.float64) - half) ** 2))
    assert error > 0, "the bfloat16 VAE made the float32 frames bit for bit: it was not used"
    assert 10 * np.log10(1 / error) > 25, error
