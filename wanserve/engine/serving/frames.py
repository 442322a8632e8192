"""Decoded frames as they are made: the Wan VAE decodes one latent frame per decoder call (one
video frame for the first, four for each after it; a causal cache carries the rest). Each call's
output is post-processed on its own and handed to a `FrameSink` before the next call starts, so
whoever encodes the video can work while the VAE is still decoding.

Post-processing (unpatchify, clamp, [-1, 1] → [0, 1]) is per element and per frame, so the
chunks put together are the frames post-processing the whole video gives, bit for bit.
"""
from __future__ import annotations

from typing import Callable, Protocol

import numpy as np
import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify


class FrameSink(Protocol):
    """Takes a video's frames in order, a chunk at a time: float32 (F, H, W, 3) in [0, 1].
    `put` runs on the thread that decodes: it must return quickly and never raise."""

    def put(self, frames: np.ndarray) -> None: ...


def chunk_frames(pipe, decoded: torch.Tensor) -> np.ndarray:
    """One decoder call's output (B, C, f, H, W) as float32 frames (f, H, W, 3)."""
    patch_size = pipe.vae.config.patch_size
    if patch_size is not None:
        decoded = unpatchify(decoded, patch_size=patch_size)
    return _as_frames(pipe, torch.clamp(decoded, min=-1.0, max=1.0))


def _as_frames(pipe, video: torch.Tensor) -> np.ndarray:
    frames = pipe.video_processor.postprocess_video(video, output_type="np")
    return np.asarray(frames[0], dtype=np.float32)


def whole_video_frames(pipe, video: torch.Tensor, sink: FrameSink | None) -> np.ndarray:
    """`vae.decode`'s whole output (unpatchified and clamped there) as float32 frames, handed
    to `sink` in one chunk."""
    frames = _as_frames(pipe, video)
    if sink is not None:
        sink.put(frames)
    return frames


def frame_collector(pipe, sink: FrameSink | None) -> tuple[Callable, list[np.ndarray]]:
    """A decoder forward hook that post-processes each call's output, keeps it and passes it
    to `sink`; and the list it keeps them in."""
    chunks: list[np.ndarray] = []

    def after_each_frame(_module, _args, decoded) -> None:
        chunk = chunk_frames(pipe, decoded)
        chunks.append(chunk)
        if sink is not None:
            sink.put(chunk)

    return after_each_frame, chunks
