"""Distributed start-up and the channels between ranks.

The job runs `dp` replicas (wanserve/engine/parallel/layout.py); each replica's first rank is its *leader*.
Rank 0 serves HTTP and leads replica 0. Inside each replica:

- the *control* channel (gloo, long timeout) carries one request object from the leader to the
  replica's ranks; idle ranks wait on it for as long as the server is idle;
- the *step* channel (gloo, short timeout) carries one tiny flag per denoising step so every
  rank agrees on cancellation at the same step. Its timeout, like the compute collectives',
  bounds how long a dead or hung peer can stall the others.

Between rank 0 and each other replica's leader, a `ReplicaLink` (wanserve/engine/serving/replicas.py speaks
over it) has the same two kinds of channel.
"""
from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from wanserve.engine.parallel import xfuser_compat
from wanserve.engine.parallel.device import gpu_usable
from wanserve.engine.parallel.group_timeouts import groups_created_with
from wanserve.engine.parallel.layout import ParallelLayout
from wanserve.engine.parallel.rank_processes import this_process


IDLE_TIMEOUT = timedelta(days=30)


@dataclass(frozen=True)
class ReplicaLink:
    """The channels between rank 0 and the leader of one other replica."""

    replica: int
    leader: int  # its global rank
    ranks: tuple[int, ...]
    jobs: object  # gloo, long timeout: the next job (or Shutdown) for the replica
    steps: object  # gloo, short timeout: everything while the replica runs a job


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    layout: ParallelLayout
    control_group: object  # this replica's
    step_group: object  # this replica's
    collective_timeout_s: float
    world_control: object = None  # every rank, long timeout: the ready barrier
    replica_group: object = None  # this replica's, on the compute backend (the sharded VAE)
    links: tuple[ReplicaLink, ...] = ()  # rank 0: one per other replica; their leader: its own
    processes: tuple[tuple[str, int], ...] = ()  # (host, pid) of every rank, from the ready barrier

    @property
    def is_driver(self) -> bool:
        """Rank 0: serves HTTP and leads replica 0."""
        return self.rank == 0

    @property
    def replica(self) -> int:
        return self.rank // self.layout.replica_size

    @property
    def replica_size(self) -> int:
        return self.layout.replica_size

    @property
    def leader(self) -> int:
        """The global rank of this replica's leader."""
        return self.replica * self.layout.replica_size

    @property
    def is_leader(self) -> bool:
        return self.rank == self.leader


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun sets them."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def die_with_launcher() -> None:
    """Under torchrun on Linux: this rank is killed when torchrun dies, whatever killed it.

    torchrun starts the ranks in sessions of their own, so a SIGKILL to the launcher's process
    group leaves them running, still holding the HTTP port a restart needs. The jobs they had
    running are queued again by the next start's recovery (wanserve/api/resume.py).
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
            data_parallel_degree=layout.dp,
            classifier_free_guidance_degree=layout.cfg,
            sequence_parallel_degree=layout.sp,
            ulysses_degree=layout.ulysses,
            ring_degree=layout.ring,
            backend=backend,
        )
    xfuser_compat.bind_yunchang_groups()
    # every rank creates every group, in the same order (torch's rule for new_group)
    world_control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    replica = rank // layout.replica_size
    mine = {}
    for r in range(layout.dp):
        ranks = list(layout.replica_ranks(r))
        groups = (dist.new_group(ranks, backend="gloo", timeout=IDLE_TIMEOUT),
                  dist.new_group(ranks, backend="gloo", timeout=timeout),
                  dist.group.WORLD if layout.dp == 1 else dist.new_group(ranks, timeout=timeout))
        if r == replica:
            mine = dict(zip(("control_group", "step_group", "replica_group"), groups))
    links = []
    for r in range(1, layout.dp):
        ranks = layout.replica_ranks(r)
        pair = [0, ranks[0]]
        link = ReplicaLink(r, ranks[0], tuple(ranks),
                           dist.new_group(pair, backend="gloo", timeout=IDLE_TIMEOUT),
                           dist.new_group(pair, backend="gloo", timeout=timeout))
        if rank in pair:
            links.append(link)
    return DistContext(rank, world_size, local_rank, device, layout,
                       collective_timeout_s=collective_timeout_s, world_control=world_control,
                       links=tuple(links), **mine)


def broadcast_message(ctx: DistContext, message=None):
    """The replica's leader passes the message; every rank of the replica returns it. A no-op
    copy in a replica of one rank."""
    if ctx.replica_size == 1:
        return message
    box = [message if ctx.is_leader else None]
    dist.broadcast_object_list(box, src=ctx.leader, group=ctx.control_group)
    return box[0]


def agree(ctx: DistContext, flag: bool) -> bool:
    """The leader's flag, on every rank of the replica (one 1-element broadcast on the step
    channel)."""
    if ctx.replica_size == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.broadcast(t, src=ctx.leader, group=ctx.step_group)
    return bool(t.item())


def gather_to_all(ctx: DistContext, value) -> list:
    """Every rank's `value`, in rank order, on every rank (every replica's; long timeout)."""
    if ctx.world_size == 1:
        return [value]
    values = [None] * ctx.world_size
    dist.all_gather_object(values, value, group=ctx.world_control)
    return values


def ready_barrier(ctx: DistContext) -> None:
    """All ranks of every replica have loaded the model (long timeout: loading takes long); on
    the way every rank learns where the others run (wanserve/engine/parallel/rank_processes.py)."""
    ctx.processes = tuple(gather_to_all(ctx, this_process()))


def post_note(key: str, text: str) -> None:
    """Leave `text` in the job's rendezvous store (torch 2.13's default store, a private
    accessor), where other ranks can read it after this rank has exited."""
    if dist.is_initialized():
        dist.distributed_c10d._get_default_store().set(f"wanserve/{key}", text)


def read_note(key: str) -> str | None:
    """What a rank left under `key` with `post_note`, or None (without waiting)."""
    if not dist.is_initialized():
        return None
    store = dist.distributed_c10d._get_default_store()
    try:
        return store.get(f"wanserve/{key}").decode() if store.check([f"wanserve/{key}"]) else None
    except RuntimeError:  # the store itself is gone
        return None


def exit_without_teardown(code: int) -> None:
    """End a rank's process now, the log flushed, skipping the interpreter's teardown: freeing
    the modules of torch, diffusers and transformers takes over a second on every rank, and a
    rank that must leave a hung thread or collective behind cannot wait for it."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def shutdown() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a peer may already be gone; nothing left to release
            pass
