"""Distributed start-up and the two channels between ranks.

- The *control* channel (gloo, long timeout) carries one request object from rank 0 to all
  ranks; idle ranks wait on it for as long as the server is idle.
- The *step* channel (gloo, short timeout) carries one tiny flag per denoising step so every
  rank agrees on cancellation at the same step. Its timeout, like the compute collectives',
  bounds how long a dead or hung peer can stall the others.
"""
from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from engine import xfuser_compat
from engine.device import gpu_usable
from engine.group_timeouts import groups_created_with
from engine.layout import ParallelLayout


IDLE_TIMEOUT = timedelta(days=30)


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    layout: ParallelLayout
    control_group: object
    step_group: object
    collective_timeout_s: float

    @property
    def is_driver(self) -> bool:
        return self.rank == 0


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun sets them."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def die_with_launcher() -> None:
    """Under torchrun on Linux: this rank is killed when torchrun dies, whatever killed it.

    torchrun starts the ranks in sessions of their own, so a SIGKILL to the launcher's process
    group leaves them running, still holding the HTTP port a restart needs. The jobs they had
    running are then failed as `server_restarted` by the next start's recovery.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher died before the line above
        os._exit(1)


def init_distributed(layout: ParallelLayout, collective_timeout_s: float) -> DistContext:
    xfuser_compat.apply()
    from xfuser.core.distributed import init_distributed_environment, initialize_model_parallel

    rank, world_size, local_rank = env_world()
    use_cuda = gpu_usable()
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    timeout = timedelta(seconds=collective_timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout)
    with groups_created_with(timeout):
        init_distributed_environment(rank=rank, world_size=world_size, local_rank=local_rank,
                                     backend=backend)
        initialize_model_parallel(
            classifier_free_guidance_degree=layout.cfg,
            sequence_parallel_degree=layout.sp,
            ulysses_degree=layout.ulysses,
            ring_degree=layout.ring,
            backend=backend,
        )
    xfuser_compat.bind_yunchang_groups()
    control_group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    step_group = dist.new_group(backend="gloo", timeout=timeout)
    return DistContext(rank, world_size, local_rank, device, layout, control_group, step_group,
                       collective_timeout_s)


def broadcast_message(ctx: DistContext, message=None):
    """Rank 0 passes the message; every rank returns it. A no-op copy at world size 1."""
    if ctx.world_size == 1:
        return message
    box = [message if ctx.is_driver else None]
    dist.broadcast_object_list(box, src=0, group=ctx.control_group)
    return box[0]


def agree(ctx: DistContext, flag: bool) -> bool:
    """Rank 0's flag, on every rank (one 1-element broadcast on the step channel)."""
    if ctx.world_size == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.broadcast(t, src=0, group=ctx.step_group)
    return bool(t.item())


def gather_to_all(ctx: DistContext, value) -> list:
    """Every rank's `value`, in rank order, on every rank (the control channel)."""
    if ctx.world_size == 1:
        return [value]
    values = [None] * ctx.world_size
    dist.all_gather_object(values, value, group=ctx.control_group)
    return values


def ready_barrier(ctx: DistContext) -> None:
    """All ranks have loaded the model (on the control channel: loading takes long)."""
    if ctx.world_size > 1:
        dist.barrier(group=ctx.control_group)


def shutdown() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a peer may already be gone; nothing left to release
            pass
