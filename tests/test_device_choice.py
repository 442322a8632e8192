"""A CUDA build of torch with no usable GPU (no driver, `CUDA_VISIBLE_DEVICES=""`, a container
without GPUs) runs on the CPU with the CPU workarounds, like a CPU build: the device and the
workarounds are decided from the same test (engine/device.py).

Here a CPU build is made to look like such a CUDA build (`torch.version.cuda` set at start-up
through a sitecustomize), and a 2-rank Ulysses job must still run.

Checked with: `xfuser_compat.needed()` keyed on the build again (`torch.version.cuda is None`):
the job fails (xfuser refuses sequence parallelism without its long-context attention).
"""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np

from conftest import REPO

FAKE_CUDA_BUILD = 'import torch\ntorch.version.cuda = "12.8"\n'


def test_a_cuda_build_without_a_gpu_serves_on_the_cpu(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(FAKE_CUDA_BUILD)
    requests_file = tmp_path / "requests.json"
    requests_file.write_text(json.dumps([{"width": 64, "height": 64, "num_frames": 5,
                                          "num_inference_steps": 2}]))
    out = tmp_path / "frames.npz"
    cmd = [str(REPO / ".venv/bin/torchrun"), "--standalone", "--nproc-per-node", "2",
           "-m", "engine.offline", "--requests", str(requests_file), "--out", str(out),
           "--ulysses", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{tmp_path}:{REPO}"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as data:
        assert data["frames_0"].shape == (5, 64, 64, 3)
    report = json.loads((tmp_path / "frames.npz.json").read_text())
    assert report["world_size"] == 2
