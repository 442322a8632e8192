"""--shard-weights: each expert's parameters split across the ranks of its replica (FSDP2).

Written for torch 2.13's `fully_shard`. Each transformer block is one unit, then the root (the
embedders, the output head): a block's parameters are gathered on every rank of the replica just
before it runs and freed after (`reshard_after_forward`), so a rank holds 1/N of each expert
plus one block at a time. Every rank of a replica runs the same blocks in the same order (same
steps, same expert boundary, same CFG structure), which the all-gathers need.

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


def shard_experts(pipe, ctx, checkpoint: Path | None = None) -> dict:
    """Every rank of every replica calls this at the same point (the mesh is a collective).
    With `checkpoint` the experts are on `meta` and each rank reads its shards from
    `checkpoint`/<expert> (wanserve/engine/parallel/sliced_loading.py). Returns what it did,
    for /health (each rank's parameter bytes are added by the caller)."""
    experts = experts_of(pipe)
    unsharded = sum(param_bytes(e) for e in experts)
    if ctx.replica_size == 1:
        return {"experts": "not sharded (one rank per replica)", "unsharded_bytes": unsharded}
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layout = ctx.layout
    with groups_created_with(timedelta(seconds=ctx.collective_timeout_s)):
        mesh = init_device_mesh(ctx.device.type, (layout.dp, layout.replica_size),
                                mesh_dim_names=("replica", "shard"))["shard"]
    bytes_read = 0
    for name in EXPERTS:
        expert = getattr(pipe, name, None)
        if expert is None:
            continue
        expert.eval().requires_grad_(False)
        for block in expert.blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=True)
        fully_shard(expert, mesh=mesh, reshard_after_forward=True)
        if checkpoint is not None:
            bytes_read += fill_shards(expert, checkpoint / name, ctx.device)
    report = {"experts": f"sharded over the {ctx.replica_size} ranks of each replica (FSDP2, "
                         "one unit per block, then the root)",
              "unsharded_bytes": unsharded,
              "loading": ("each rank read only its own rows" if checkpoint is not None
                          else "whole experts on every rank, then sharded")}
    if checkpoint is not None:
        report["checkpoint_bytes_read"] = bytes_read  # this rank's (the caller gathers them)
    return report
