"""A replica leader's frames to rank 0 in chunks of at most `chunk_bytes` bytes, not as one
tensor: a 1280x720x121 video is 335 MB in uint8 (1.3 GB in float32), and one gloo message that
size is the kind a peer has been seen to lose without an error (vLLM-Omni PR #4845).

The header (shape, dtype, chunk size) travels in the job's outcome; each chunk is then a send of
its own on the link's short-timeout group, so a leader that dies or hangs mid-transfer is noticed
within the collective timeout. Rank 0 receives into one preallocated array and hands each run of
frames that has arrived whole to the job's sink at once, so its MP4 encoder starts before the
last chunk.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

if TYPE_CHECKING:  # a type only: frames.py imports diffusers
    from wanserve.engine.serving.frames import FrameSink

# Test-only: WANSERVE_TEST_FRAME_CHUNK_BYTES forces small chunks (tests/test_frame_transfer.py,
# tests/test_replicas.py), so a test video crosses in many of them, split inside frames.
CHUNK_BYTES = int(os.environ.get("WANSERVE_TEST_FRAME_CHUNK_BYTES", 64 << 20))


@dataclass(frozen=True)
class FramesHeader:
    """What rank 0 needs to receive the frames that follow: (F, H, W, 3), their dtype's name,
    and the most bytes one chunk carries."""

    shape: tuple[int, ...]
    dtype: str
    chunk_bytes: int

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    @property
    def chunks(self) -> int:
        return -(-self.nbytes // self.chunk_bytes)


def frames_header(frames: np.ndarray, chunk_bytes: int = CHUNK_BYTES) -> FramesHeader:
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    return FramesHeader(tuple(frames.shape), frames.dtype.name, chunk_bytes)


def _as_bytes(frames: np.ndarray) -> torch.Tensor:
    """The array's memory as a flat uint8 tensor (shared, not copied)."""
    return torch.from_numpy(frames.reshape(-1).view(np.uint8))


def send_frames(frames: np.ndarray, header: FramesHeader, dst: int, group) -> None:
    """The leader's side: `frames` (described by `header`) to global rank `dst`."""
    flat = _as_bytes(np.ascontiguousarray(frames))
    for start in range(0, header.nbytes, header.chunk_bytes):
        dist.send(flat[start:start + header.chunk_bytes], dst=dst, group=group)


def receive_frames(header: FramesHeader, src: int, group,
                   sink: FrameSink | None = None) -> np.ndarray:
    """Rank 0's side: the frames global rank `src` sends, whole; `sink` gets them as they
    arrive, in order, a run of whole frames at a time."""
    frames = np.empty(header.shape, np.dtype(header.dtype))
    flat = _as_bytes(frames)
    frame_bytes = header.nbytes // max(1, len(frames))
    handed = 0  # frames given to the sink
    for start in range(0, header.nbytes, header.chunk_bytes):
        end = min(start + header.chunk_bytes, header.nbytes)
        dist.recv(flat[start:end], src=src, group=group)
        whole = end // frame_bytes
        if sink is not None and whole > handed:
            sink.put(frames[handed:whole])
            handed = whole
    return frames
