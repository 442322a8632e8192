"""The warm-up request: one short generation on every rank before the ready barrier, so that
what is built on the first forward (the compiled blocks' graphs) is built before any client
waits for it."""
from __future__ import annotations

import math

import numpy as np

from wanserve.engine.model.step_cache import split_steps
from wanserve.engine.serving.generate import generate
from wanserve.engine.serving.request import GenerationRequest

MAX_WARMUP_STEPS = 20


def warmup_size(defaults, multiple: int) -> tuple[int, int]:
    """The preset's default size: `defaults.size`, else a square of `defaults.pixel_area`."""
    if defaults.size:
        width, height = (int(side) for side in defaults.size.lower().split("x"))
        return width, height
    side = max(multiple, round(math.sqrt(defaults.pixel_area) / multiple) * multiple)
    return side, side


def warmup_steps(scheduler, boundary_ratio: float | None) -> int:
    """The fewest steps that give every expert at least one (the boundary split)."""
    if boundary_ratio is None:
        return 1
    for steps in range(2, MAX_WARMUP_STEPS + 1):
        if min(split_steps(scheduler, steps, boundary_ratio)) > 0:
            return steps
    return MAX_WARMUP_STEPS


def warm_up(model, cfg) -> None:
    """Every rank of the replica: the preset's defaults at its default size, the denoising
    only (no VAE decode), a synthetic first frame where the model needs one."""
    d = cfg.defaults
    width, height = warmup_size(d, cfg.limits.size_multiple)
    experts = model.features.experts
    boundary = d.boundary_ratio if experts == 2 else None
    scheduler = model.pipe.for_request(boundary, d.flow_shift, d.sample_solver).scheduler
    image = np.full((height, width, 3), 127, dtype=np.uint8)
    request = GenerationRequest(
        job_id="warmup", prompt="warm-up", image=image if cfg.limits.require_image else None,
        width=width, height=height, num_frames=d.num_frames, fps=d.fps,
        num_inference_steps=warmup_steps(scheduler, boundary),
        guidance_scale=d.guidance_scale,
        guidance_scale_2=d.guidance_scale_2 if experts == 2 else None,
        boundary_ratio=boundary,
        flow_shift=d.flow_shift, seed=0, negative_prompt=d.negative_prompt,
        sample_solver=d.sample_solver)
    generate(model.pipe, request, lambda done, total: False, decode=False, frames=False,
             adapters=model.adapters, step_cache=model.step_cache)
