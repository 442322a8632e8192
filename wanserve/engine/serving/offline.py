"""Run requests through the engine without HTTP, on every rank, and save rank 0's float frames.

    torchrun --nproc-per-node 2 -m wanserve.engine.serving.offline --ulysses 2 --requests reqs.json --out out.npz

`reqs.json` is a list of dicts of GenerationRequest fields (`width`, `height`, `seed`,
`guidance_scale`, `lora` and `cache` (as the API takes them), `sample_solver`, ...; the preset's defaults fill
the rest) plus `image_seed` for the seeded synthetic first frame (`null`: none, text-to-video)
and `last_image_seed` for a last frame, and `"eager": true` to run that request with the
compiled blocks uncompiled (`torch.compiler.set_stance("force_eager")`). Used by the multi-rank
equivalence tests and the benchmarks: the same code path as the server's ranks, without HTTP.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time

import numpy as np
import torch

from wanserve.engine.adapters.choice import resolve_lora
from wanserve.engine.assembly import assemble
from wanserve.engine.config import ServerConfig, load_config
from wanserve.engine.parallel.distributed import (broadcast_message, exit_without_teardown, init_distributed,
                                ready_barrier, shutdown)
from wanserve.engine.model.features import ModelFeatures
from wanserve.engine.model.step_cache import resolve_choice
from wanserve.engine.serving.request import GenerationRequest
from wanserve.engine.startup import resolve_model_path, setup_logging


def synthetic_image(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth, seeded test image (gradients and a disc), HxWx3 uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    centre = rng.random(2)
    disc = ((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) < 0.05
    rgb = np.stack([xx, yy, disc.astype(float)], axis=-1) * rng.uniform(0.5, 1.0, 3)
    return (rgb * 255).astype(np.uint8)


def request_from_spec(job_id: str, spec: dict, cfg: ServerConfig,
                      features: ModelFeatures = ModelFeatures()) -> GenerationRequest:
    d = cfg.defaults
    width, height = spec.get("width", 128), spec.get("height", 128)
    guidance = spec.get("guidance_scale", d.guidance_scale)
    two_experts = features.experts == 2

    def image(seed_key: str, default):
        seed = spec.get(seed_key, default)
        return None if seed is None else synthetic_image(width, height, seed)

    return GenerationRequest(
        job_id=job_id, prompt=spec.get("prompt", "a lighthouse in a storm"),
        negative_prompt=spec.get("negative_prompt", d.negative_prompt),
        image=image("image_seed", 0), last_frame=image("last_image_seed", None),
        width=width, height=height, num_frames=spec.get("num_frames", d.num_frames), fps=d.fps,
        num_inference_steps=spec.get("num_inference_steps", d.num_inference_steps),
        guidance_scale=guidance,
        guidance_scale_2=spec.get("guidance_scale_2", guidance) if two_experts else None,
        boundary_ratio=spec.get("boundary_ratio", d.boundary_ratio) if two_experts else None,
        flow_shift=spec.get("flow_shift", d.flow_shift), seed=spec.get("seed", 0),
        sample_solver=spec.get("sample_solver", d.sample_solver),
        lora=resolve_lora(spec.get("lora"), cfg), cache=resolve_choice(spec.get("cache"), cfg.cache))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--requests", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeat", type=int, default=1, help="run the list this many times")
    ours, rest = parser.parse_known_args(argv)
    cfg = load_config(rest)
    if cfg.layout.dp > 1:
        raise SystemExit("the offline runner drives one replica: run it without --dp")
    ctx = init_distributed(cfg.layout, cfg.collective_timeout_s)
    setup_logging(cfg.log_level, ctx.rank)
    try:
        from wanserve.engine.serving.worker import end_of_job, run_request

        start = time.perf_counter()
        model = assemble(cfg, ctx, resolve_model_path(cfg))
        ready_barrier(ctx)
        load_s = time.perf_counter() - start
        with open(ours.requests) as f:
            specs = json.load(f)
        results, timings = {}, []
        for round_ in range(ours.repeat):
            for index, spec in enumerate(specs):
                request = None
                if ctx.is_driver:
                    request = request_from_spec(f"offline-{round_}-{index}", spec, cfg,
                                                model.features)
                request = broadcast_message(ctx, request)
                t0 = time.perf_counter()
                # "eager": true runs the compiled blocks uncompiled (the same modules)
                with (torch.compiler.set_stance("force_eager") if spec.get("eager")
                      else contextlib.nullcontext()):
                    result = run_request(ctx, model, request)
                end_of_job(ctx, model)
                if ctx.is_driver:
                    results[f"frames_{index}"] = result.frames
                    timings.append({"index": index, "round": round_,
                                    "wall": time.perf_counter() - t0, **result.timings,
                                    "forwards": result.forwards, "cache": result.cache,
                                    "recompiles": (model.compiled.report["recompiles"]
                                                   if model.compiled else None)})
        if ctx.is_driver:
            np.savez(ours.out, **results)
            with open(ours.out + ".json", "w") as f:
                json.dump({"layout": cfg.layout.describe(), "world_size": ctx.world_size,
                           "load_s": load_s, "adapters": model.info["adapters"],
                           "sharding": model.info.get("sharding"),
                           "compile": model.info["compile"],
                           "runs": timings}, f, indent=1)
        return 0
    finally:
        shutdown()


if __name__ == "__main__":
    exit_without_teardown(main())
