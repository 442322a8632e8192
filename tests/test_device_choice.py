"""A CUDA build of torch with no usable GPU (no driver, `CUDA_VISIBLE_DEVICES=""`, a container
without GPUs) runs on the CPU with the CPU workarounds, like a CPU build: the device and the
workarounds are decided from the same test (wanserve/engine/parallel/device.py).

Here a CPU build is made to look like such a CUDA build (`torch.version.cuda` set at start-up
through a sitecustomize), and a 2-rank Ulysses job must still run.

Checked with: `xfuser_compat.needed()` keyed on the build again (`torch.version.cuda is None`):
the job fails (xfuser refuses sequence parallelism without its long-context attention).
"""
from __future__ import annotations

from conftest import run_offline

FAKE_CUDA_BUILD = 'import torch\ntorch.version.cuda = "12.8"\n'


def test_a_cuda_build_without_a_gpu_serves_on_the_cpu(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(FAKE_CUDA_BUILD)
    frames, report = run_offline(tmp_path, 2, [{"width": 64, "height": 64, "num_frames": 5,
                                               "num_inference_steps": 2}],
                                 "--ulysses", "2", pythonpath=str(tmp_path))
    assert frames["frames_0"].shape == (5, 64, 64, 3)
    assert report["world_size"] == 2
