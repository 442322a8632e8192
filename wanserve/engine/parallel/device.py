"""The one test every device decision is made from."""
from __future__ import annotations

import torch


def gpu_usable() -> bool:
    """A CUDA (or ROCm) device can be used now. A CUDA build of torch is not enough: with no
    driver, `CUDA_VISIBLE_DEVICES=""` or a container without GPUs it runs on the CPU, and then
    needs the CPU workarounds (wanserve/engine/parallel/xfuser_compat.py) like a CPU build does."""
    return torch.cuda.is_available()
