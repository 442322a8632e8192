"""CPU ranks on one host exchange their largest tensors through shared memory, not gloo.

Written for xfuser 0.7.0 (yunchang's Ulysses group, `GroupCoordinator.all_gather`) and torch
2.13.0's gloo; CPU only, the CUDA path never calls `enable`. The transport itself is
`wanserve/engine/cpu/shm_exchange.py`; this module decides which exchanges use it:

- Ulysses: the all-to-alls before and after each self-attention (xfuser's
  `usp._sdpa_all_to_all_single`);
- ring attention: passing each block of keys and values to the next rank
  (`wanserve/engine/parallel/sp_padding.py` runs its own ring loop over the channel `enable` hands it);
- xfuser's all-gathers (the sequence-parallel output of every forward, CFG parallel's two
  noise predictions): `GroupCoordinator.all_gather`;
- the sharded VAE's halo rows (`wanserve/engine/cpu/sharded_conv.py`) and distvae's all-gathers.

One channel per distinct set of ranks: groups with the same members (at Ulysses 2 the Ulysses,
sequence-parallel and world groups) share it, which is safe because every member issues the
exchanges of all of them from one thread in the same order. Anything larger than a channel's
capacity, or any group without a channel, goes through gloo as before.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from wanserve.engine.parallel import sp_padding, xfuser_compat
from wanserve.engine.cpu import shm_exchange

xfuser_compat.apply()

import xfuser.model_executor.layers.usp as usp  # noqa: E402
from xfuser.core.distributed import get_cfg_group, get_sp_group  # noqa: E402
from xfuser.core.distributed.group_coordinator import GroupCoordinator  # noqa: E402

log = logging.getLogger("wanserve.engine")

CAPACITY = 16 << 20  # bytes per exchange and rank; each rank's file holds two of these

_xfuser_all_to_all = usp._sdpa_all_to_all_single
_xfuser_all_gather = GroupCoordinator.all_gather
_distvae_exchange_halo = None  # set by enable()
MAX_HALO_ROWS = 8


def _all_to_all(x: torch.Tensor) -> torch.Tensor:
    channel = shm_exchange.channel_for(usp.PROCESS_GROUP.ULYSSES_PG, x)
    if channel is None:
        return _xfuser_all_to_all(x)
    return channel.all_to_all(x)


def _all_gather(self: GroupCoordinator, input_: torch.Tensor, dim: int = 0,
                separate_tensors: bool = False):
    channel = (shm_exchange.channel_for(self.device_group, input_) if self.world_size > 1
               else None)
    if channel is None:
        return _xfuser_all_gather(self, input_, dim, separate_tensors)
    stacked = channel.all_gather(input_)
    if separate_tensors:
        return list(stacked.unbind(0))
    dim = dim + input_.dim() if dim < 0 else dim
    shape = list(input_.shape)
    shape[dim] *= self.world_size
    return stacked.movedim(0, dim).reshape(shape)


class _DistvaeDistributed:
    """`torch.distributed` as distvae 0.1.0's `patch_utils` and `conv_mixin` see it: their
    all-gathers (the sharded VAE's attention input, band sizes, the decoded rows) of CPU
    tensors go through the group's channel; everything else is torch's."""

    def __getattr__(self, name):
        return getattr(dist, name)

    @staticmethod
    def all_gather(tensor_list, tensor, group=None, async_op=False):
        channel = None if async_op else shm_exchange.channel_for(
            group if group is not None else dist.group.WORLD, tensor)
        if channel is None:
            return dist.all_gather(tensor_list, tensor, group=group, async_op=async_op)
        for out, part in zip(tensor_list, channel.all_gather(tensor)):
            out.copy_(part)
        return None


def _exchange_halo(input, patch_dim, patch_index, halo_width, prev_bottom_halo_width,
                   next_top_halo_width, parallel_context, halo_buffer=None):
    """distvae 0.1.0's `conv_utils.exchange_halo` (the halos of the convolutions that
    wanserve/engine/cpu/sharded_conv.py leaves to distvae: the encoder's strided ones) through the
    channel.
    Halo widths differ between ranks, so whether the channel serves it is decided on one row's
    size, the same on every rank: room for MAX_HALO_ROWS rows each way (Wan's kernels need 2)."""
    rows = input.shape[patch_dim]
    row_bytes = input.numel() // max(rows, 1) * input.element_size()
    channel = shm_exchange.channel_for(parallel_context.group, input)
    if channel is None or not channel.fits(2 * MAX_HALO_ROWS * row_bytes):
        return _distvae_exchange_halo(input, patch_dim, patch_index, halo_width,
                                      prev_bottom_halo_width, next_top_halo_width,
                                      parallel_context, halo_buffer)

    def received(width: int) -> torch.Tensor | None:
        if width <= 0:
            return None
        shape = list(input.shape)
        shape[patch_dim] = width
        return torch.empty(shape, dtype=input.dtype)

    posted = channel.post_neighbours(
        input.narrow(patch_dim, 0, prev_bottom_halo_width) if prev_bottom_halo_width > 0 else None,
        input.narrow(patch_dim, rows - next_top_halo_width, next_top_halo_width)
        if next_top_halo_width > 0 else None)
    top, bottom = posted.wait(received(halo_width[0]), received(halo_width[1]))
    if halo_width[0] < 0:
        input = input.narrow(patch_dim, -halo_width[0], rows + halo_width[0])
    parts = [part for part in (top, input, bottom) if part is not None]
    return torch.cat(parts, dim=patch_dim) if len(parts) > 1 else input


def ranks_have_own_cores() -> bool:
    """Every rank of the job on this host can have a core to itself; only then does a rank gain
    by busy-waiting for a peer: with more ranks than cores, it would take the core from one."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    local_world_size = int(local) if local else dist.get_world_size()
    return local_world_size <= (os.cpu_count() or 1)


def resync(step_group) -> None:
    """After every job, on every rank: a job that failed on one rank may have left the ranks at
    different exchanges, so all channels go back to their first one together."""
    dist.barrier(group=step_group)  # every rank is past the job's last exchange
    shm_exchange.reset_all()
    dist.barrier(group=step_group)  # and nobody starts the next one before all reset


def xfuser_groups() -> dict:
    """xfuser's groups whose exchanges this module routes (its parallel state must exist)."""
    return {
        "ulysses": usp.PROCESS_GROUP.ULYSSES_PG,
        "ring": usp.PROCESS_GROUP.RING_PG,
        "sequence-parallel": get_sp_group().device_group,
        "cfg": get_cfg_group().device_group,
    }


def enable(timeout_s: float, groups: dict, attention_exchanges: bool = True) -> list[str]:
    """Open a channel for each of `groups` ({name: process group or None}; "vae" is the group
    distvae shards the VAE over) and route the exchanges above through them. A collective:
    every rank calls it at the same point of start-up. Returns the names now served.

    `attention_exchanges` False leaves the all-to-alls and ring blocks inside the transformer
    blocks on gloo: where the blocks are compiled, dynamo traces gloo's collectives into the
    graph (as NCCL's on a GPU) but would trace this module's Python and recompile on its
    counters."""
    spin = ranks_have_own_cores()
    routed = []
    for name, group in groups.items():
        if group is None or dist.get_world_size(group) < 2:
            continue
        if not shm_exchange.has_channel(tuple(dist.get_process_group_ranks(group))):
            channel = shm_exchange.open_channel(group, CAPACITY, timeout_s, spin)
            if channel is None:
                continue
            shm_exchange.register(channel)
        routed.append(name)
    if "vae" in routed:
        from distvae.models.layers import conv_mixin
        from distvae.modules import patch_utils

        global _distvae_exchange_halo
        _distvae_exchange_halo = _distvae_exchange_halo or conv_mixin.exchange_halo
        patch_utils.dist = conv_mixin.dist = _DistvaeDistributed()
        conv_mixin.exchange_halo = _exchange_halo
    if routed:
        GroupCoordinator.all_gather = _all_gather
        if attention_exchanges:
            usp._sdpa_all_to_all_single = _all_to_all
            sp_padding.use_ring_channels(shm_exchange.channel_for)
        log.info("shared-memory exchanges for: %s", ", ".join(routed))
    return routed

