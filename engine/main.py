"""Entry point of every rank (started by torchrun through launch.sh).

rank 0 serves HTTP and drives the engine; every other rank runs the worker loop.
"""
from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import torch

from engine.config import ServerConfig, load_config
from engine.distributed import (DistContext, die_with_launcher, env_world, init_distributed,
                                ranks_have_own_cores, ready_barrier, shutdown)
from engine.layout import LayoutError

log = logging.getLogger("wanserve")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def setup_logging(level: str, rank: int) -> None:
    logging.basicConfig(
        level=level if rank == 0 else max(logging.getLevelName(level), logging.WARNING),
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("xfuser", "diffusers", "transformers", "sanic.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def resolve_model_path(cfg: ServerConfig) -> Path:
    if cfg.is_tiny:
        from engine.tiny_model import ensure_tiny_model

        return ensure_tiny_model()
    path = Path(cfg.model).expanduser()
    if not (path / "model_index.json").exists():
        raise SystemExit(f"--model {cfg.model}: no diffusers checkpoint there (model_index.json "
                         "missing); wanserve never downloads weights")
    return path


def min_tokens(cfg: ServerConfig) -> int:
    side = cfg.limits.min_side // 16  # VAE /8, patch /2
    return side * side  # one latent frame at the smallest allowed size


def shard_vae(cfg: ServerConfig, ctx: DistContext) -> bool:
    """Whether the VAE is sharded by rows across the ranks: `parallel.vae` true, or auto and
    the preset's smallest frame has at least one latent row per rank."""
    if ctx.world_size == 1 or cfg.parallel_vae == "false":
        return False
    fits = cfg.limits.min_side // 8 >= ctx.world_size
    if cfg.parallel_vae == "auto" and not fits and ctx.is_driver:
        log.info("VAE on rank 0 alone: %d ranks but %d latent rows at the smallest allowed "
                 "size", ctx.world_size, cfg.limits.min_side // 8)
    return cfg.parallel_vae == "true" or fits


def prepare_pipeline(cfg: ServerConfig, ctx: DistContext, model_path: Path):
    """Build the pipeline the same way on every rank and register it with xfuser."""
    from xfuser.config import xFuserArgs
    from xfuser.core.distributed import initialize_runtime_state

    from engine.pipeline import load_pipeline
    from kernels.attention import select_backend

    cpu_allocator = "system default"
    if ctx.device.type == "cpu" and cfg.keep_freed_cpu_memory:
        from engine.cpu_memory import keep_freed_memory

        if keep_freed_memory():
            cpu_allocator = "freed memory kept in the process"
    offload = cfg.offload_inactive_expert
    pipe = load_pipeline(model_path, ctx.device, DTYPES[cfg.dtype],
                         keep_on_cpu=("transformer_2",) if offload else ())
    cross_attention_kv = "recomputed each step"
    if ctx.device.type == "cpu":
        from engine.cross_attention_cache import cache_cross_attention
        from kernels.cpu_kernels import use_fast_cpu_kernels

        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                use_fast_cpu_kernels(component)
        for expert in (pipe.transformer, pipe.transformer_2):
            if expert is not None and cache_cross_attention(expert):
                cross_attention_kv = "computed once per prompt"
    if offload:
        from engine.offload import ExpertOffload

        pipe.expert_offload = ExpertOffload(pipe, ctx.device)
    backend = select_backend(ctx.device, cfg.layout.ring)
    engine_config, _ = xFuserArgs(
        model=str(model_path),
        ulysses_degree=cfg.layout.ulysses,
        ring_degree=cfg.layout.ring,
        use_cfg_parallel=cfg.layout.cfg == 2,
        attention_backend=backend.xfuser_backend,
    ).create_config()
    initialize_runtime_state(pipe, engine_config)
    pipe.parallel_vae = shard_vae(cfg, ctx)
    if pipe.parallel_vae:
        # distvae shards the VAE's rows across every rank (halo exchange per convolution,
        # exact); it replaces the encoder and decoder modules in place, once at start-up.
        import torch.distributed as dist
        from distvae.vae import parallel as distvae_parallel

        distvae_parallel.parallelize_decoder(pipe.vae, dist.group.WORLD)
        distvae_parallel.parallelize_encoder(pipe.vae, dist.group.WORLD)
        if ctx.device.type == "cpu":
            from kernels.cpu_kernels import use_onednn_in_distvae
            from kernels.cpu_sharded_conv import use_overlapped_halos
            from kernels.sharded_vae_attention import shard_vae_attention

            use_onednn_in_distvae()
            use_overlapped_halos(pipe.vae)
            shard_vae_attention(pipe.vae)
        vae_parts = vae_encode = f"sharded over {ctx.world_size} ranks"
    else:
        vae_parts, vae_encode = "rank 0", "replicated"
    exchanges = "nccl" if ctx.device.type == "cuda" else "gloo"
    if ctx.world_size == 1:
        exchanges = "none (one rank)"
    if ctx.device.type == "cpu" and ctx.world_size > 1 and cfg.cpu_shared_memory:
        import torch.distributed as dist

        from engine import shm_transport

        vae_group = dist.group.WORLD if pipe.parallel_vae else None
        routed = shm_transport.enable(cfg.collective_timeout_s,
                                      {**shm_transport.xfuser_groups(), "vae": vae_group})
        if routed:
            exchanges = f"shared memory ({', '.join(routed)}), gloo for the rest"
        if routed and ranks_have_own_cores():
            from engine.gloo_threads import set_gloo_loop_policy

            log.info("rank %d: %d gloo event-loop threads at idle priority", ctx.rank,
                     set_gloo_loop_policy())
    pipe.wanserve_info = {
        "attention_backend": backend.name,
        "parallel": {
            "layout": cfg.layout.describe(),
            "world_size": ctx.world_size,
            "transformer": "sequence-parallel" if cfg.layout.sp > 1 else "single",
            "cfg_branches": "parallel" if cfg.layout.cfg == 2 else "sequential",
            "text_encoder": "replicated",
            "vae_encode": vae_encode,
            "vae_decode": vae_parts,
            "exchanges": exchanges,
        },
        "device": str(ctx.device),
        "dtype": cfg.dtype,
        "experts": "one resident, the other in CPU memory" if offload else "both resident",
        "cross_attention_kv": cross_attention_kv,
        "cpu_allocator": cpu_allocator,
    }
    if ctx.is_driver:
        log.info("attention backend: %s; parallel parts: %s", backend.name,
                 pipe.wanserve_info["parallel"])
    return pipe


def main(argv: list[str] | None = None) -> int:
    die_with_launcher()
    cfg = load_config(argv)
    rank, world_size, _ = env_world()
    setup_logging(cfg.log_level, rank)
    model_path = resolve_model_path(cfg)
    try:
        from engine.pipeline import num_attention_heads

        cfg.layout.validate(world_size, num_attention_heads(model_path), min_tokens(cfg))
    except LayoutError as exc:
        if rank == 0:
            log.error("invalid parallel layout: %s", exc)
        return 2
    ctx = init_distributed(cfg.layout, cfg.collective_timeout_s, cfg.pin_cpu_cores)
    try:
        if ctx.is_driver:
            from api.server import serve

            return serve(cfg, ctx, lambda: prepare_pipeline(cfg, ctx, model_path))
        from engine.worker import worker_loop

        # Stopping is rank 0's call: it finishes or fails the running job and broadcasts
        # Shutdown, which ends this loop. (torchrun kills a rank that outlives that.)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: log.info("rank %d: waiting for rank 0 to stop", rank))
        pipe = prepare_pipeline(cfg, ctx, model_path)
        ready_barrier(ctx)
        worker_loop(ctx, pipe)
        return 0
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
