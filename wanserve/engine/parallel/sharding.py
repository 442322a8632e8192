"""--shard-weights: each expert's parameters split across the ranks of its replica (FSDP2), and
`memory.text_encoder: shard`: UMT5's the same way.

Written for torch 2.13's `fully_shard`. Each transformer block (each UMT5 layer) is one unit,
then the root (the embedders, the output head; UMT5's token embedding): a block's parameters
are gathered on every rank of the replica just before it runs and freed after
(`reshard_after_forward`), so a rank holds 1/N of each module plus one block at a time. Every
rank of a replica runs the same blocks in the same order (same steps, same expert boundary,
same CFG structure, the same prompts encoded or found in its prompt cache), which the
all-gathers need.

The weights keep the dtypes they were loaded in (no mixed-precision policy: diffusers' fp32-kept
modules stay fp32), so the sharded model computes what the unsharded one does, bit for bit.
Mixed dtypes in one unit are accepted only for parameters without gradients, hence
`requires_grad_(False)` first. The mesh is built for the device type explicitly: without one,
`fully_shard` picks the accelerator even for a CPU (gloo) job.
"""
from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import torch

from wanserve.engine.parallel.group_timeouts import groups_created_with
from wanserve.engine.parallel.sliced_loading import fill_shards

log = logging.getLogger("wanserve.engine")

EXPERTS = ("transformer", "transformer_2")


def param_bytes(module: torch.nn.Module) -> int:
    """The bytes of `module`'s parameters this rank holds (its shards, when sharded)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in module.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        total += local.numel() * local.element_size()
    return total


def experts_of(pipe) -> list[torch.nn.Module]:
    return [e for e in (getattr(pipe, name, None) for name in EXPERTS) if e is not None]


def replica_mesh(ctx):
    """The mesh of this rank's replica (a collective: every rank calls it at the same point)."""
    from torch.distributed.device_mesh import init_device_mesh

    with groups_created_with(timedelta(seconds=ctx.collective_timeout_s)):
        return init_device_mesh(ctx.device.type, (ctx.layout.dp, ctx.layout.replica_size),
                                mesh_dim_names=("replica", "shard"))["shard"]


def shard_module(module: torch.nn.Module, blocks, mesh) -> None:
    """`fully_shard` on each of `blocks`, then on `module` (what no block holds)."""
    from torch.distributed.fsdp import fully_shard

    module.eval().requires_grad_(False)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(module, mesh=mesh, reshard_after_forward=True)


def shard_experts(pipe, ctx, mesh, checkpoint: Path | None = None) -> dict:
    """With `checkpoint` the experts are on `meta` and each rank reads its shards from
    `checkpoint`/<expert> (wanserve/engine/parallel/sliced_loading.py). Returns what it did,
    for /health (each rank's parameter bytes are added by the caller)."""
    experts = [(name, getattr(pipe, name)) for name in EXPERTS
               if getattr(pipe, name, None) is not None]
    return _shard("experts", [(name, e, e.blocks) for name, e in experts], "block",
                  "whole experts on every rank, then sharded", ctx, mesh, checkpoint)


def shard_text_encoder(pipe, ctx, mesh, checkpoint: Path | None = None) -> dict:
    """UMT5 sharded over the replica's ranks, one unit per encoder layer, then the root (the
    token embedding, tied to `shared`, and the final norm). With `checkpoint` it is on `meta`
    and each rank reads its rows of `checkpoint`/text_encoder. Returns what it did, for
    /health (each rank's parameter bytes are added by the caller)."""
    encoder = pipe.text_encoder
    return _shard("text_encoder", [("text_encoder", encoder, encoder.encoder.block)], "layer",
                  "whole on every rank, then sharded", ctx, mesh, checkpoint)


def _shard(what: str, modules: list, unit: str, loaded_whole: str, ctx, mesh,
           checkpoint: Path | None) -> dict:
    """Each of `modules` ((checkpoint folder, module, its blocks)) sharded; the report."""
    unsharded = sum(param_bytes(module) for _, module, _ in modules)
    if ctx.replica_size == 1:
        return {what: "not sharded (one rank per replica)", "unsharded_bytes": unsharded}
    bytes_read = 0
    for folder, module, blocks in modules:
        shard_module(module, blocks, mesh)
        if checkpoint is not None:
            bytes_read += fill_shards(module, checkpoint / folder, ctx.device)
    report = {what: f"sharded over the {ctx.replica_size} ranks of each replica (FSDP2, one "
                    f"unit per {unit}, then the root)",
              "unsharded_bytes": unsharded,
              "loading": ("each rank read only its own rows" if checkpoint is not None
                          else loaded_whole)}
    if checkpoint is not None:
        report["checkpoint_bytes_read"] = bytes_read  # this rank's (the caller gathers them)
    return report
