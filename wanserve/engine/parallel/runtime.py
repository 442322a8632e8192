"""The parallel runtime on one rank: xfuser's runtime state for the pipeline and the sharded VAE.

The process groups themselves exist already (wanserve/engine/parallel/distributed.py); this registers the
pipeline with xfuser for the layout and, where it pays, shards the VAE's rows over every rank.
"""
from __future__ import annotations

import logging
from pathlib import Path

from wanserve.engine.parallel.distributed import DistContext
from wanserve.engine.parallel.layout import ParallelLayout

log = logging.getLogger("wanserve.engine")


def shard_vae(parallel_vae: str, min_side: int, ctx: DistContext, vae_scale: int) -> bool:
    """Whether the VAE is sharded by rows across the replica's ranks: `parallel.vae`
    (`parallel_vae`) true, or auto and the preset's smallest frame side (`min_side`) has at
    least one latent row per rank (`vae_scale` pixels per latent row: 8 for the Wan2.1 VAE, 16
    for Wan2.2's)."""
    if ctx.replica_size == 1 or parallel_vae == "false":
        return False
    rows = min_side // vae_scale
    fits = rows >= ctx.replica_size
    if parallel_vae == "auto" and not fits and ctx.is_driver:
        log.info("VAE on each replica's leader alone: %d ranks but %d latent rows at the "
                 "smallest allowed size", ctx.replica_size, rows)
    return parallel_vae == "true" or fits


def start_parallel_runtime(pipe, layout: ParallelLayout, ctx: DistContext, model_path: Path,
                           attention_backend: str, shard_the_vae: bool) -> tuple[dict, object | None]:
    """Register `pipe` with xfuser (Ulysses/ring/CFG as `layout` says, attention through
    `attention_backend`, an xfuser AttentionBackendType name) and shard the VAE if asked
    (`shard_vae` decides).
    Returns what runs where (for /health) and the group the VAE is sharded over (None: rank 0
    decodes alone)."""
    from xfuser.config import xFuserArgs
    from xfuser.core.distributed import initialize_runtime_state

    engine_config, _ = xFuserArgs(
        model=str(model_path),
        ulysses_degree=layout.ulysses,
        ring_degree=layout.ring,
        data_parallel_degree=layout.dp,
        use_cfg_parallel=layout.cfg == 2,
        attention_backend=attention_backend,
    ).create_config()
    initialize_runtime_state(pipe, engine_config)
    vae_group = None
    if shard_the_vae:
        # distvae shards the VAE's rows across the replica's ranks (halo exchange per
        # convolution, exact); it replaces the encoder and decoder modules in place, once.
        from distvae.vae import parallel as distvae_parallel

        vae_group = ctx.replica_group
        distvae_parallel.parallelize_decoder(pipe.vae, vae_group)
        distvae_parallel.parallelize_encoder(pipe.vae, vae_group)
    vae = f"sharded over {ctx.replica_size} ranks" if vae_group is not None else None
    exchanges = "nccl" if ctx.device.type == "cuda" else "gloo"
    return {
        "layout": layout.describe(),
        "world_size": ctx.world_size,
        "replicas": layout.dp,
        "transformer": "sequence-parallel" if layout.sp > 1 else "single",
        "cfg_branches": "parallel" if layout.cfg == 2 else "sequential",
        "text_encoder": "replicated",
        "vae_encode": vae or "replicated",
        "vae_decode": vae or ("rank 0" if layout.dp == 1 else "each replica's leader"),
        "exchanges": exchanges if ctx.replica_size > 1 else "none (one rank)",
    }, vae_group
