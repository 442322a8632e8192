"""One request on one rank: the same function runs on every rank of the job.

Steps: per-request pipeline view → encode + denoise (xfuser's pipeline, latents out) →
VAE decode (rank 0, or every rank when the VAE is sharded) → float frames. Every rank calls
`on_step` after every denoising step; it reports progress and returns whether the ranks agreed
to cancel.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import PIL.Image
import torch

from engine.pipeline import WanServePipeline
from engine.request import GenerationRequest, GenerationResult, JobCancelled

StepHook = Callable[[int, int], bool]  # (steps done, total) -> cancel?


def generate(pipe: WanServePipeline, request: GenerationRequest, on_step: StepHook,
             decode: bool = True) -> GenerationResult | None:
    view = pipe.for_request(request.boundary_ratio, request.flow_shift)
    step_times: list[float] = []
    last = [time.perf_counter()]  # reset after the cancel check so it is not counted

    def step_end(_pipe, i, _t, callback_kwargs):
        now = time.perf_counter()
        step_times.append(now - last[0])
        if on_step(i + 1, request.num_inference_steps):
            raise JobCancelled(request.job_id, i + 1, request.num_inference_steps)
        last[0] = time.perf_counter()
        return callback_kwargs

    start = time.perf_counter()
    generator = torch.Generator(device="cpu").manual_seed(request.seed)
    latents = view(
        image=PIL.Image.fromarray(request.image),
        prompt=request.prompt,
        negative_prompt=request.negative_prompt or None,
        height=request.height,
        width=request.width,
        num_frames=request.num_frames,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        guidance_scale_2=request.guidance_scale_2,
        generator=generator,
        output_type="latent",
        callback_on_step_end=step_end,
    ).frames
    timings = dict(view.stage_times)
    # the first interval also covers the encoders, whose own times were recorded
    timings["denoise"] = sum(step_times) - sum(timings.values())
    timings["step_mean"] = timings["denoise"] / max(1, len(step_times))
    if not decode:
        return None
    decode_start = time.perf_counter()
    frames = decode_latents(view, latents)
    timings["vae_decode"] = time.perf_counter() - decode_start
    timings["generate_total"] = time.perf_counter() - start
    return GenerationResult(frames=frames, timings=timings)


@torch.no_grad()
def decode_latents(pipe: WanServePipeline, latents: torch.Tensor) -> np.ndarray:
    vae = pipe.vae
    latents = latents.to(vae.dtype)
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents)
    std = torch.tensor(vae.config.latents_std).view(shape).to(latents)
    video = vae.decode(latents * std + mean, return_dict=False)[0]
    frames = pipe.video_processor.postprocess_video(video, output_type="np")
    return np.asarray(frames[0], dtype=np.float32)
