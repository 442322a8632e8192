"""Every parallel layout returns the video one rank returns (real torchrun, CPU; exchanges
through shared memory, and in one case through gloo only).

Float frames are compared, before MP4 encoding. Tokens = latent frames ((frames - 1) / 4 + 1)
x (height / 16) x (width / 16). The request set has a size whose token count divides by every
SP degree (128x128x9: 3 x 8 x 8 = 192 tokens), one that divides by none (144 wide, 112 high,
9 frames: 3 x 7 x 9 = 189 tokens, padded by 1 at SP 2 and by 3 at SP 4, so under U2R2 the
second ring block holds 93 valid keys of 96), a request with guidance_scale 1 (no negative
branch under CFG parallel), and the second request again with a last frame (first+last frame:
diffusers' `last_image`). tests/test_ti2v.py runs the TI2V miniature through the same machinery.
"""
from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

from conftest import REPO, run_offline

REQUESTS = [
    {"width": 128, "height": 128, "seed": 1},
    {"width": 144, "height": 112, "seed": 2, "image_seed": 3},
    {"width": 128, "height": 128, "seed": 3, "guidance_scale": 1.0},
    {"width": 144, "height": 112, "seed": 2, "image_seed": 3, "last_image_seed": 4},
]
# measured at most 1.8e-6 over every layout below (0 with the VAE on rank 0: the VAE's row
# bands sum in another order); attending to the padded tokens costs 4.6e-4 and more
TOLERANCE = 1e-5


def run_layout(tmp_path, nproc: int, *flags: str, requests: list = REQUESTS) -> dict:
    """{"frames_<i>": rank 0's float frames of request i} for this layout."""
    return run_offline(tmp_path, nproc, requests, *flags)[0]


@pytest.fixture(scope="module")
def single_rank(tmp_path_factory):
    return run_layout(tmp_path_factory.mktemp("single"), 1)


# The VAE is sharded by rows across all ranks by default (distvae, oneDNN convolutions on CPU);
# one case keeps it on rank 0 alone.
VAE_ON_RANK_0 = ("--set", "parallel.vae=false")
# CPU ranks exchange through shared memory by default (wanserve/engine/cpu/shm_transport.py); one case
# passes the ring and Ulysses exchanges over gloo (tests/test_shm_exchange.py compares the two
# transports directly).
GLOO_ONLY = ("--set", "cpu.shared_memory=false")
# Without the CPU test vehicle (wanserve/engine/cpu/) a CPU server is still exact, only slower.
NO_CPU_TUNING = ("--set", "cpu.tuning=false")


@pytest.mark.parametrize("nproc,flags", [
    (2, ("--ulysses", "2")),
    (2, ("--ring", "2")),
    (2, ("--cfg", "2")),
    (4, ("--ulysses", "2", "--cfg", "2")),
    (4, ("--ulysses", "2", "--ring", "2", *GLOO_ONLY)),  # the ring blocks over gloo
    # no shared memory either (Ulysses over gloo), and the VAE on rank 0
    (2, ("--ulysses", "2", *NO_CPU_TUNING, *VAE_ON_RANK_0)),
], ids=["U2", "R2", "C2", "U2C2", "U2R2-gloo", "U2-no-cpu-tuning-vae-rank0"])
def test_layout_matches_single_rank(tmp_path, single_rank, nproc, flags):
    """checked with: the SP padding mask removed (wanserve/engine/parallel/sp_padding.py
    WanServeTransformer.forward setting neither valid_kv_len nor the ring's valid lengths)."""
    parallel = run_layout(tmp_path, nproc, *flags)
    assert parallel.keys() == single_rank.keys()
    for key, reference in single_rank.items():
        assert parallel[key].shape == reference.shape
        diff = float(np.abs(parallel[key] - reference).max())
        print(f"{key}: max |diff| {diff:.2e}")
        assert diff <= TOLERANCE, f"{key}: max |diff| {diff:.2e} > {TOLERANCE}"


def test_outputs_are_not_trivial(single_rank):
    """The comparison above means something only if the videos differ from each other, the
    last frame included. checked with: `last_image` not passed (wanserve/engine/serving/generate.py _denoise):
    request 3 equals request 1."""
    a, b, c, b_last = (single_rank[f"frames_{i}"] for i in range(4))
    assert a.std() > 0.01 and np.abs(a - c).max() > 0.01
    assert b.shape == b_last.shape == (9, 112, 144, 3)
    last_frame_effect = float(np.abs(b_last - b).max())
    print(f"the last frame changes request 1 by {last_frame_effect:.2e}")
    assert last_frame_effect > 100 * TOLERANCE  # dropping the last frame gives 0


@pytest.mark.parametrize("flags,world_size,message", [
    (("--ulysses", "2"), "1", "processes were started"),
    (("--ulysses", "3"), "3", "must divide the model's 4 attention heads"),
    (("--cfg", "3"), "3", "--cfg must be 1 or 2"),
])
def test_invalid_layout_is_refused_before_loading(flags, world_size, message):
    env = {**os.environ, "PYTHONPATH": str(REPO), "WORLD_SIZE": world_size, "RANK": "0"}
    proc = subprocess.run([str(REPO / ".venv/bin/python"), "-m", "wanserve.api.main", *flags],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
