"""Distributed start-up and the two channels between ranks.

- The *control* channel (gloo, long timeout) carries one request object from rank 0 to all
  ranks; idle ranks wait on it for as long as the server is idle.
- The *step* channel (gloo, short timeout) carries one tiny flag per denoising step so every
  rank agrees on cancellation at the same step. Its timeout, like the compute collectives',
  bounds how long a dead or hung peer can stall the others.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from engine import xfuser_compat
from engine.layout import ParallelLayout

log = logging.getLogger("wanserve.engine")

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


def ranks_have_own_cores() -> bool:
    """Every rank of the job on this host can have a core to itself; only then does a rank gain
    by busy-waiting for a peer or by idling its helper threads (engine/shm_transport.py,
    engine/gloo_threads.py): with more ranks than cores, it would take the core from a peer."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    local_world_size = int(local) if local else dist.get_world_size()
    return local_world_size <= (os.cpu_count() or 1)


def pin_to_core_share(local_rank: int, local_world_size: int) -> list[int] | None:
    """Keep this rank on its own share of the cores it may use: local rank r of n gets the
    r-th of n equal, disjoint slices of its affinity mask (so taskset or a cgroup still decide
    which cores the job has). None, and nothing changed, with fewer cores than ranks.

    Without it, a rank waking from a collective may be placed on the core its peer is
    computing on until the scheduler moves one of them. On the 2-core CPU machine the measured
    effect on a whole forward is within that machine's noise (BENCHMARKS.md "Component by
    component"). Applied to every thread the process already has (an OpenMP pool may exist by
    now); threads started later inherit it.
    """
    if local_world_size < 2 or not hasattr(os, "sched_setaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    share = len(cores) // local_world_size
    if share == 0:
        return None
    mine = cores[local_rank * share:(local_rank + 1) * share]
    threads = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]
    for tid in threads:
        try:
            os.sched_setaffinity(int(tid), mine)
        except ProcessLookupError:  # the thread ended meanwhile
            pass
    return mine


def init_distributed(layout: ParallelLayout, collective_timeout_s: float,
                     pin_cpu_cores: bool = False) -> DistContext:
    xfuser_compat.apply()
    from xfuser.core.distributed import init_distributed_environment, initialize_model_parallel

    rank, world_size, local_rank = env_world()
    use_cuda = torch.cuda.is_available()
    if pin_cpu_cores and not use_cuda:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        cores = pin_to_core_share(local_rank, local_world_size)
        if cores is not None:
            log.info("rank %d pinned to cores %s", rank, ",".join(map(str, cores)))
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    timeout = timedelta(seconds=collective_timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout)
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
    return DistContext(rank, world_size, local_rank, device, layout, control_group, step_group)


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
