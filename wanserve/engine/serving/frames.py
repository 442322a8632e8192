"""Decoded frames as they are made: the Wan VAE decodes one latent frame per decoder call (one
video frame for the first, four for each after it; a causal cache carries the rest). Each call's
output is post-processed on its own and handed to a `FrameSink` before the next call starts, so
whoever encodes the video can work while the VAE is still decoding.

Post-processing (unpatchify, clamp, [-1, 1] → [0, 1], and for the MP4 encoder the rounding to
uint8) is per element and per frame, so the chunks put together are the frames post-processing
the whole video gives, bit for bit. It runs on the device: a chunk leaves it once, as uint8 when
the frames go to the encoder (a quarter of float32's bytes).
"""
from __future__ import annotations

from typing import Callable, Protocol

import numpy as np
import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify


class FrameSink(Protocol):
    """Takes a video's frames in order, a chunk at a time: (F, H, W, 3), uint8, or float32 in
    [0, 1]. `put` runs on the thread that decodes: it must return quickly and never raise."""

    def put(self, frames: np.ndarray) -> None: ...


def chunk_frames(pipe, decoded: torch.Tensor, as_uint8: bool = False) -> np.ndarray:
    """One decoder call's output (B, C, f, H, W) as frames (f, H, W, 3)."""
    patch_size = pipe.vae.config.patch_size
    if patch_size is not None:
        decoded = unpatchify(decoded, patch_size=patch_size)
    return _as_frames(pipe, torch.clamp(decoded, min=-1.0, max=1.0), as_uint8)


def _as_frames(pipe, video: torch.Tensor, as_uint8: bool) -> np.ndarray:
    """(1, C, f, H, W) in [-1, 1] as (f, H, W, 3): float32 in [0, 1] as diffusers'
    `postprocess_video(output_type="np")` gives them, or those rounded to uint8 on the device
    exactly as wanserve/api/video.py `_to_uint8` rounds them (the MP4's bytes do not change)."""
    frames = pipe.video_processor.postprocess_video(video, output_type="pt")[0]
    frames = frames.permute(0, 2, 3, 1).float()
    if as_uint8:
        frames = (frames * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    return frames.contiguous().cpu().numpy()


def frame_collector(pipe, sink: FrameSink | None, as_uint8: bool = False
                    ) -> tuple[Callable[[torch.Tensor], None], list[np.ndarray]]:
    """A callback for each decoder call's output that post-processes it, keeps it and passes
    it to `sink`; and the list it keeps them in."""
    chunks: list[np.ndarray] = []

    def after_each_frame(decoded: torch.Tensor) -> None:
        chunk = chunk_frames(pipe, decoded, as_uint8)
        chunks.append(chunk)
        if sink is not None:
            sink.put(chunk)

    return after_each_frame, chunks
