"""The warm-up: short generations on every rank before the ready barrier, so that what is
built on the first forward (the compiled blocks' graphs) is built before any client waits for
it. Under sequence parallelism a token count the SP degree does not divide takes other graphs
(xfuser pads the sequence and wanserve/engine/parallel/sp_padding.py masks the padding, with a
graph break at ring attention's masked loop), so a second request at such a size builds them
too; any later padded size reuses them (dynamic shapes). Every adapter registered at start-up
and not fused is another module state the blocks' graphs guard on (peft's active adapter), so
each runs through the same sizes; a --lora-dir adapter, or several adapters in one request,
compiles at its first use (counted in /health as recompiles)."""
from __future__ import annotations

import math

import numpy as np

from wanserve.engine.adapters.choice import resolve_lora
from wanserve.engine.adapters.lora import AdapterError, AdapterUse
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


def padded_size(pipe, width: int, height: int, num_frames: int, multiple: int,
                sp_degree: int) -> tuple[int, int] | None:
    """The size nearest below (width, height) whose token count `sp_degree` does not divide,
    stepping each side by `multiple`; None where every candidate divides."""
    patch_t, patch_h, patch_w = pipe.transformer.config.patch_size
    latent_frames = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
    spatial = pipe.vae_scale_factor_spatial
    candidates = sorted(((w, h) for w in range(multiple, width + 1, multiple)
                         for h in range(multiple, height + 1, multiple)),
                        key=lambda size: (width - size[0]) + (height - size[1]))
    for w, h in candidates:
        tokens = (latent_frames // patch_t) * (h // spatial // patch_h) * (w // spatial // patch_w)
        if tokens and tokens % sp_degree:
            return w, h
    return None


def adapter_sets(model, cfg) -> list[tuple[AdapterUse, ...]]:
    """The server's default adapters (its fused ones, else none), then each adapter a request
    may name alone, when requests may name one."""
    default = resolve_lora(None, cfg)
    sets = [default]
    if model.adapters is None:
        return sets
    registered = set().union(*model.adapters.on_expert.values()) - set(model.adapters.dynamic)
    for name in sorted(registered - {use.name for use in default}):
        try:
            sets.append(resolve_lora(name, cfg))
        except AdapterError:  # a fused default that cannot be changed
            break
    return sets


def warm_up(model, cfg, sp_degree: int = 1) -> dict:
    """Every rank of the replica: the preset's defaults at its default size (and under
    sequence parallelism at a padded size too), with each adapter set, the denoising only (no
    VAE decode), a synthetic first frame where the model needs one. What it ran."""
    d = cfg.defaults
    sizes = [warmup_size(d, cfg.limits.size_multiple)]
    if sp_degree > 1:
        padded = padded_size(model.pipe, *sizes[0], d.num_frames, cfg.limits.size_multiple,
                             sp_degree)
        sizes += [padded] if padded is not None else []
    sets = adapter_sets(model, cfg)
    for lora in sets:
        for width, height in sizes:
            _warm_up_at(model, cfg, width, height, lora)
    return {"sizes": [f"{w}x{h}" for w, h in sizes],
            "adapters": [",".join(use.name for use in lora) or "none" for lora in sets]}


def _warm_up_at(model, cfg, width: int, height: int, lora: tuple[AdapterUse, ...]) -> None:
    d = cfg.defaults
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
        sample_solver=d.sample_solver, lora=lora)
    generate(model.pipe, request, lambda done, total: False, decode=False, frames=False,
             adapters=model.adapters, step_cache=model.step_cache)
