"""This process's peak memory during one job: CUDA's allocator peak on a GPU, the resident
set's high-water mark (VmHWM) on the CPU. Each rank measures its own; rank 0 reports it."""
from __future__ import annotations

from pathlib import Path

import torch


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then the peak is the process's since it started


def read_peak(device: torch.device) -> tuple[float | None, str | None]:
    """(megabytes, kind), or (None, None) where the platform does not say."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, "cpu_rss_high_water"
    except (OSError, ValueError, IndexError):
        pass
    return None, None
