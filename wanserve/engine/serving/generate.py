"""One request on one rank: the same function runs on every rank of the job.

Steps: the request's LoRA adapters (exactly those, or none) → per-request pipeline view →
encode + denoise (xfuser's pipeline, latents out) → VAE decode (rank 0, or every rank when the
VAE is sharded), one latent frame at a time → frames, uint8 for the MP4 encoder or float (rank 0
alone). No rank holds the whole decoded video as one tensor, tiled or not. Every
rank calls `on_step` after every denoising step; it reports progress and returns whether the ranks
agreed to cancel. Stage times are taken after the device has finished the stage's work
(`stage_clock`), not when the CPU has queued it.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import PIL.Image
import torch

from wanserve.engine.adapters.lora import Adapters
from wanserve.engine.model.peak_memory import read_peak, reset_peak
from wanserve.engine.model.pipeline import WanServePipeline
from wanserve.engine.model.step_cache import StepCache
from wanserve.engine.serving.frames import FrameSink, frame_collector
from wanserve.engine.serving.tiled_decode import decode_tiled_frames
from wanserve.engine.serving.request import GenerationRequest, GenerationResult, JobCancelled

StepHook = Callable[[int, int], bool]  # (steps done, total) -> cancel?


def stage_clock(device: torch.device) -> Callable[[], float]:
    """`time.perf_counter` once `device` has finished what was queued on it (GPU work is
    asynchronous: without this a stage's tail would be counted in the next one)."""
    if device.type != "cuda":
        return time.perf_counter

    def clock() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return clock


def generate(pipe: WanServePipeline, request: GenerationRequest, on_step: StepHook,
             decode: bool = True, frames: bool = True,
             decode_cancelled: Callable[[], bool] = lambda: False,
             adapters: Adapters | None = None,
             sink: FrameSink | None = None,
             step_cache: StepCache | None = None,
             as_uint8: bool = False) -> GenerationResult | None:
    """`decode`: this rank takes part in the VAE decode; `frames`: it also turns the decoded
    video into frames and returns them (rank 0), uint8 with `as_uint8` (for the MP4 encoder),
    else float32 in [0, 1]. Without either it returns None.
    `decode_cancelled` is asked before each latent frame the VAE decodes; with `frames`, `sink`
    gets each latent frame's video frames as soon as they are decoded."""
    if adapters is not None:
        adapters.apply(request.lora)
    elif request.lora:
        raise ValueError("this server has no LoRA adapters")
    view = pipe.for_request(request.boundary_ratio, request.flow_shift, request.sample_solver)
    if step_cache is not None:  # fresh contexts for this request's steps (every rank)
        step_cache.prepare_request(view, request.cache, request.num_inference_steps,
                                   request.boundary_ratio, request.guidance_scale)
    reset_peak(pipe._execution_device)
    clock = view.clock = stage_clock(pipe._execution_device)
    step_times: list[float] = []
    forwards = [0]  # this step's transformer forwards
    per_step: list[int] = []
    last = [clock()]  # reset after the cancel check so it is not counted

    def step_end(_pipe, i, _t, callback_kwargs):
        now = clock()
        step_times.append(now - last[0])
        per_step.append(forwards[0])
        forwards[0] = 0
        if on_step(i + 1, request.num_inference_steps):
            raise JobCancelled(request.job_id, i + 1, request.num_inference_steps)
        last[0] = time.perf_counter()
        return callback_kwargs

    start = last[0]
    generator = torch.Generator(device="cpu").manual_seed(request.seed)
    hooks = [expert.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
             for expert in (pipe.transformer, pipe.transformer_2) if expert is not None]
    try:
        latents = _denoise(view, request, generator, step_end)
    finally:
        for hook in hooks:
            hook.remove()
    timings = dict(view.stage_times)
    cache_report = step_cache.report() if step_cache is not None else None
    # the first interval also covers the encoders, whose own times were recorded
    timings["denoise"] = sum(step_times) - sum(timings.values())
    timings["step_mean"] = timings["denoise"] / max(1, len(step_times))
    if not decode:
        return None
    decode_start = clock()
    after_each_frame, chunks = (frame_collector(view, sink, as_uint8) if frames
                                else (None, []))
    decode_latents(view, latents, lambda: _stop_if(decode_cancelled, request), after_each_frame)
    if not frames:
        return None
    result = np.concatenate(chunks)
    timings["vae_decode"] = clock() - decode_start
    timings["generate_total"] = clock() - start
    peak_mb, peak_kind = read_peak(pipe._execution_device)
    return GenerationResult(frames=result, timings=timings, forwards=per_step, cache=cache_report,
                            peak_memory_mb=peak_mb, peak_memory_kind=peak_kind)


def _denoise(view: WanServePipeline, request: GenerationRequest, generator, step_end):
    return view(
        image=_pil(request.image),  # None: text-to-video (TI2V)
        last_image=_pil(request.last_frame),
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


def _pil(pixels: np.ndarray | None) -> PIL.Image.Image | None:
    return None if pixels is None else PIL.Image.fromarray(pixels)


def _stop_if(cancelled: Callable[[], bool], request: GenerationRequest) -> None:
    if cancelled():  # in the decode: after the last step
        raise JobCancelled(request.job_id, request.num_inference_steps,
                           request.num_inference_steps)


@torch.no_grad()
def decode_latents(pipe: WanServePipeline, latents: torch.Tensor,
                   before_each_frame: Callable[[], None] = lambda: None,
                   after_each_frame: Callable[[torch.Tensor], None] | None = None) -> None:
    """Decodes one latent frame per decoder call, as diffusers 0.42's `AutoencoderKLWan._decode`
    does (its causal cache carries the rest), but hands each call's output (B, C, f, H, W) to
    `after_each_frame` and keeps none: `_decode` concatenates them into the whole video on every
    rank that decodes, a sharded VAE's other ranks too. `before_each_frame` runs before each
    call, a point where a long decode can stop. Tiled (`vae.use_tiling`, memory.vae_tiling, at
    a size over one tile), each latent frame's tiles are decoded, blended and handed on the
    same way (wanserve/engine/serving/tiled_decode.py)."""
    vae = pipe.vae
    latents = latents.to(vae.dtype)
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents)
    std = torch.tensor(vae.config.latents_std).view(shape).to(latents)
    latents = latents * std + mean
    if getattr(vae, "use_tiling", False) and (
            latents.shape[3] > vae.tile_sample_min_height // vae.spatial_compression_ratio
            or latents.shape[4] > vae.tile_sample_min_width // vae.spatial_compression_ratio):
        decode_tiled_frames(vae, latents, before_each_frame,
                            after_each_frame if after_each_frame is not None else lambda _: None)
        return
    vae.clear_cache()
    try:
        x = vae.post_quant_conv(latents)
        for index in range(x.shape[2]):
            before_each_frame()
            vae._conv_idx = [0]
            decoded = vae.decoder(x[:, :, index:index + 1], feat_cache=vae._feat_map,
                                  feat_idx=vae._conv_idx, first_chunk=index == 0)
            if after_each_frame is not None:
                after_each_frame(decoded)
    finally:
        vae.clear_cache()
