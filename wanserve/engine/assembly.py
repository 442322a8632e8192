"""Building the served model on one rank: the same ordered steps on every rank.

    load weights (or build random ones) → place on the device → adapters (LoRA)
    → sharded experts (--shard-weights) and text encoder (memory.text_encoder: shard)
    → step cache (cache-dit) → compiled blocks
    → parallel runtime → CPU tuning (CPU only) → what runs where → warm-up (compiled blocks)

Each step is one function in the module that owns it and returns what it did; `/health` shows
those reports under the step's name.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from wanserve.engine import cpu
from wanserve.engine.adapters.lora import Adapters, load_adapters
from wanserve.engine.config import ServerConfig
from wanserve.engine.parallel.distributed import DistContext, gather_to_all
from wanserve.engine.model.features import ModelFeatures, features_of
from wanserve.engine.model.memory_plan import MemoryPlan, ModelShapes, Placement
from wanserve.engine.model.model_layouts import RandomModel
from wanserve.engine.model.offload import EXPERTS, ExpertOffload, place_on_device
from wanserve.engine.parallel.runtime import shard_vae, start_parallel_runtime
from wanserve.engine.parallel.sharding import (experts_of, param_bytes, replica_mesh,
                                               shard_experts, shard_text_encoder)
from wanserve.engine.model.peak_memory import read_peak, reset_peak
from wanserve.engine.model.pipeline import WanServePipeline, load_pipeline
from wanserve.engine.model.prompt_cache import attach_prompt_cache
from wanserve.engine.model.compiled_blocks import CompiledBlocks
from wanserve.engine.model.compiled_blocks import attach as compile_blocks
from wanserve.engine.model.step_cache import StepCache
from wanserve.engine.model.step_cache import attach as attach_step_cache
from wanserve.engine.model.random_weights import build_random_pipeline
from wanserve.engine.serving.warmup import warm_up
from wanserve.kernels.attention import select_backend

log = logging.getLogger("wanserve.engine")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ServedModel:
    pipe: WanServePipeline
    info: dict  # what each step did, for /health
    vae_sharded: bool  # every rank takes part in the VAE encode and decode
    offload: ExpertOffload | None = None
    after_job: Callable[[], None] | None = None  # every rank, after every job
    adapters: Adapters | None = None  # the per-request LoRA switch
    features: ModelFeatures = ModelFeatures()  # what requests may ask of it
    step_cache: StepCache | None = None  # cache-dit on the experts (None: cache.policy off)
    compiled: CompiledBlocks | None = None  # the compiled blocks (None: compile.policy off)
    memory_plan: MemoryPlan | None = None  # rank 0's: the bytes a request will take per rank


def sharded_components(cfg: ServerConfig, ctx: DistContext) -> tuple[str, ...]:
    """The components split over the replica's ranks: the experts (--shard-weights), the text
    encoder (memory.text_encoder: shard); none with one rank per replica."""
    if ctx.replica_size == 1:
        return ()
    return ((EXPERTS if cfg.shard_weights else ())
            + (("text_encoder",) if cfg.text_encoder == "shard" else ()))


def loaded_sliced(cfg: ServerConfig, ctx: DistContext, model_path: Path | RandomModel
                  ) -> tuple[str, ...]:
    """The sharded components each rank reads only its shards of (wanserve/engine/parallel/
    sliced_loading.py): those of a checkpoint, the experts only without a fused adapter
    (merging one needs the whole weights: those are loaded whole, merged, then sharded)."""
    if isinstance(model_path, RandomModel):
        return ()
    return tuple(name for name in sharded_components(cfg, ctx)
                 if name == "text_encoder" or not cfg.adapters)


def load_weights(cfg: ServerConfig, ctx: DistContext, model_path: Path | RandomModel
                 ) -> tuple[WanServePipeline, dict]:
    """The load step: a checkpoint's weights (for `random:NAME`, random ones built there) on
    the device; with sliced loading the experts stay on `meta` until the shard step. Starts
    the peak-memory window that `peak_while_loading` reads."""
    reset_peak(torch.device("cpu"))
    if ctx.device.type == "cuda":
        reset_peak(ctx.device)
    keep_on_host = ((EXPERTS if cfg.offload_inactive_expert else ())
                    + (("text_encoder",) if cfg.text_encoder == "cpu" else ()))
    if isinstance(model_path, RandomModel):
        return build_random_pipeline(model_path, DTYPES[cfg.dtype], ctx.device, keep_on_host)
    return load_pipeline(model_path, DTYPES[cfg.dtype], ctx.device, keep_on_host,
                         on_meta=loaded_sliced(cfg, ctx, model_path))


def shard_weights(pipe, cfg: ServerConfig, ctx: DistContext, model_path: Path | RandomModel
                  ) -> dict | None:
    """The sharding step (a collective): the experts with --shard-weights, the text encoder
    with `memory.text_encoder: shard`, each read from the checkpoint in slices where it was
    built on `meta`. Returns the /health report, each rank's parameter bytes and bytes read
    included (None: nothing is sharded)."""
    sliced = loaded_sliced(cfg, ctx, model_path)
    mesh = replica_mesh(ctx) if sharded_components(cfg, ctx) else None

    def read_from(name: str) -> Path | None:
        return model_path if name in sliced else None

    reports = []
    if cfg.shard_weights:
        reports.append((shard_experts(pipe, ctx, mesh, checkpoint=read_from(EXPERTS[0])),
                        experts_of(pipe)))
    if cfg.text_encoder == "shard":
        reports.append((shard_text_encoder(pipe, ctx, mesh, checkpoint=read_from("text_encoder")),
                        [pipe.text_encoder]))
    for report, modules in reports:  # every rank's figures, in rank order
        report["param_bytes_per_rank"] = gather_to_all(
            ctx, sum(param_bytes(module) for module in modules))
        if "checkpoint_bytes_read" in report:
            report["checkpoint_bytes_read_per_rank"] = gather_to_all(
                ctx, report.pop("checkpoint_bytes_read"))
    if not reports:
        return None
    sharding = reports[0][0] if cfg.shard_weights else {}
    if cfg.text_encoder == "shard":
        sharding["text_encoder"] = reports[-1][0]
    return sharding


def peak_while_loading(ctx: DistContext) -> dict:
    """This rank's peak memory since `load_weights` started: the host's resident high-water
    mark and, on a GPU, the allocator's peak."""
    peaks = {"host_mib": read_peak(torch.device("cpu"))[0]}
    if ctx.device.type == "cuda":
        peaks["device_mib"] = read_peak(ctx.device)[0]
    return {key: None if value is None else round(value, 1) for key, value in peaks.items()}


def plan_memory(cfg: ServerConfig, ctx: DistContext, pipe, vae_sharded: bool) -> MemoryPlan:
    """The memory plan of this model as this server places it (wanserve/engine/model/memory_plan.py)."""
    layout = cfg.layout
    placement = Placement(
        dtype=DTYPES[cfg.dtype], vae_dtype=DTYPES[cfg.vae_dtype],
        shard_ranks=ctx.replica_size if cfg.shard_weights else 1,
        offload_inactive_expert=cfg.offload_inactive_expert,
        text_encoder_on_device=cfg.text_encoder != "cpu",
        text_encoder_shard_ranks=ctx.replica_size if cfg.text_encoder == "shard" else 1,
        sequence_parallel=layout.ulysses * layout.ring,
        vae_ranks=ctx.replica_size if vae_sharded else 1, vae_tiling=cfg.vae_tiling)
    return MemoryPlan.build(ModelShapes.of_pipeline(pipe), placement)


def assemble(cfg: ServerConfig, ctx: DistContext, model_path: Path | RandomModel) -> ServedModel:
    """Build the pipeline the same way on every rank (a collective: every rank calls it)."""
    backend = select_backend(ctx.device, DTYPES[cfg.dtype], cfg.layout.ring,
                             require=cfg.attention_backend)
    pipe, loaded = load_weights(cfg, ctx, model_path)
    sliced = loaded_sliced(cfg, ctx, model_path)
    pipe.vae.to(DTYPES[cfg.vae_dtype])  # loaded in float32, as the checkpoints ship it
    if cfg.vae_tiling:
        pipe.vae.enable_tiling()  # diffusers' tiles: 256x256 pixels, 192 apart
    placed, offload = place_on_device(pipe, ctx.device, cfg.offload_inactive_expert,
                                      text_encoder_on_host=cfg.text_encoder == "cpu",
                                      filled_later=sliced)
    adapters, adapters_report = load_adapters(pipe, cfg, offload)
    sharding = shard_weights(pipe, cfg, ctx, model_path)
    # every rank's peak while loading (sharded weights filled), in rank order: rank 0 reports
    loaded["peak_memory_per_rank"] = gather_to_all(ctx, peak_while_loading(ctx))
    step_cache, cache_report = attach_step_cache(pipe, cfg.cache)
    compiled, compile_report = compile_blocks(pipe, cfg.compile)
    parallel, vae_group = start_parallel_runtime(
        pipe, cfg.layout, ctx, model_path, backend.xfuser_backend,
        shard_vae(cfg.parallel_vae, cfg.limits.min_side, ctx, pipe.vae_scale_factor_spatial))
    if "text_encoder" in sharded_components(cfg, ctx):
        parallel["text_encoder"] = f"sharded over {ctx.replica_size} ranks"
    info = {"device": str(ctx.device), "dtype": cfg.dtype, "attention_backend": backend.name,
            "attention_reason": backend.reason, "load": loaded, "placement": placed,
            "adapters": adapters_report, "step_cache": cache_report,
            "compile": compile_report, "parallel": parallel}
    if sharding is not None:
        info["sharding"] = sharding
    info["prompt_cache"] = attach_prompt_cache(pipe, cfg.defaults.negative_prompt,
                                               cfg.defaults.guidance_scale)
    memory_plan = plan_memory(cfg, ctx, pipe, vae_group is not None) if ctx.is_driver else None
    if memory_plan is not None:
        log.info("memory plan per rank: %s", memory_plan.report())
    after_job = None
    if ctx.device.type == "cpu":
        info["cpu_tuning"], after_job = cpu.tune(pipe, cfg.cpu, ctx, vae_group,
                                                 blocks_compiled=compiled is not None)
    if ctx.is_driver:
        log.info("attention backend: %s (%s); parallel parts: %s", backend.name, backend.reason,
                 parallel)
    model = ServedModel(pipe, info, vae_group is not None, offload, after_job, adapters,
                        features_of(pipe), step_cache, compiled, memory_plan)
    if compiled is not None:  # the graphs built before the ready barrier, not by a client
        start = time.perf_counter()
        ran = warm_up(model, cfg, cfg.layout.sp)
        compiled.warmed_up(time.perf_counter() - start, ran)
    return model
