"""Moving tensors between CPU ranks on one host through shared memory instead of gloo's sockets.

Written for torch 2.13.0's gloo on Linux x86-64. gloo sends every tensor through a TCP loopback
socket and its transport threads, which costs several times what copying the bytes does, most
of all for the small halo rows the sharded VAE swaps at every convolution
(benchmarks/cpu_exchange.py, BENCHMARKS.md). Here every rank of a group maps one file in
/dev/shm per rank; an exchange is: write what the peers need into my file, publish the
exchange's sequence number, wait until every peer has published it, copy what I need out of
theirs.

Why it is exact and safe without locks:
- Every rank runs the same exchanges of a channel in the same order (they are collectives), so
  the n-th exchange has sequence number n on every rank.
- Each rank's file has two halves used alternately (n odd, n even). A rank writes half n % 2
  again only at exchange n + 2, and it can only have finished n + 1 once every peer published
  n + 1, which each peer does after it finished reading exchange n. So nobody overwrites data a
  peer may still be reading.
- x86-64 keeps a core's stores in program order and its loads in program order, so a peer that
  sees the new sequence number also sees the data written before it. Other architectures fall
  back to gloo (`supported()`).
- A wait is bounded: it fails after the channel's timeout, and as soon as a peer process has
  died, with an error naming the peer, like a gloo collective would.
"""
from __future__ import annotations

import os
import platform
import sys
import time
import uuid
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from wanserve.engine.parallel.rank_processes import process_dead

SHM_DIR = "/dev/shm"
SEQ_BYTES = 64  # the sequence number, alone on its cache line
MARK_AT = 8  # where, after the sequence number, each rank marks its file (`_sees_peers`)
SPIN_READS = 20000  # ~1 ms of reading the peer's number before yielding the core
LIVENESS_EVERY_S = 0.05
MIN_CAPACITY = 256 << 10  # below this a channel would send almost everything through gloo


class ShmExchangeError(RuntimeError):
    """A peer did not take part in an exchange in time, or died."""


def supported() -> bool:
    return (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")
            and os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK))


class ShmChannel:
    """The shared-memory exchanges of one process group whose ranks all run on this host.

    Build it with `open_channel` (a collective over the group). `capacity` bytes per exchange
    and rank; callers use gloo for anything larger (`fits`), a decision every rank makes alike
    because the sizes of a collective's inputs are the same on every rank.
    """

    def __init__(self, group, index: int, world: int, pids: list[int], paths: list[str],
                 capacity: int, timeout_s: float, spin: bool = True):
        self.group = group
        self.spin_reads = SPIN_READS if spin else 0
        self.index = index  # this rank's position in the group
        self.world = world
        self.pids = pids
        self.capacity = capacity
        self.timeout_s = timeout_s
        nbytes = SEQ_BYTES + 2 * capacity
        self._files = [torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
                       for path in paths]
        self._seqs = [f[:8].numpy().view(np.int64) for f in self._files]
        self._seq = 0

    # -- the protocol -------------------------------------------------------------------------
    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.capacity

    def _half(self, k: int, seq: int) -> torch.Tensor:
        start = SEQ_BYTES + (seq & 1) * self.capacity
        return self._files[k][start:start + self.capacity]

    def _publish(self, seq: int) -> None:
        self._seqs[self.index][0] = seq

    def _wait_all(self, seq: int) -> None:
        for k in range(self.world):
            if k != self.index and self._seqs[k][0] < seq:
                self._wait(k, seq)

    def _wait(self, k: int, seq: int) -> None:
        number = self._seqs[k]
        for _ in range(self.spin_reads):
            if number[0] >= seq:
                return
        start = last_check = time.monotonic()
        pause = 0.0
        while number[0] < seq:
            if pause:
                time.sleep(pause)
            else:
                os.sched_yield()
            now = time.monotonic()
            if now - start > 0.01:  # past a normal skew between ranks: give the core back
                pause = min(max(pause * 2, 20e-6), 1e-3)
            if now - last_check > LIVENESS_EVERY_S:
                last_check = now
                if process_dead(self.pids[k]):
                    raise ShmExchangeError(f"shared-memory exchange: peer rank (pid "
                                           f"{self.pids[k]}) died")
                if now - start > self.timeout_s:
                    raise ShmExchangeError(f"shared-memory exchange: no answer from peer "
                                           f"(pid {self.pids[k]}) in {self.timeout_s:g}s")

    def _begin(self, payloads: list[tuple[torch.Tensor | None, int]]) -> int:
        """Write each (tensor, its slot's size in bytes) back to back into my half for the next
        exchange (a None leaves its slot unwritten) and publish the exchange."""
        self._seq += 1
        seq = self._seq
        half = self._half(self.index, seq)
        offset = 0
        for payload, size in payloads:
            if payload is not None:
                nbytes = payload.numel() * payload.element_size()
                if nbytes > size:
                    raise ValueError(f"shared-memory exchange: {nbytes} bytes for a slot "
                                     f"of {size}")
                _typed(half[offset:offset + nbytes], payload).copy_(payload)
            offset += size
        self._publish(seq)
        return seq

    def _read(self, k: int, seq: int, offset: int, like: torch.Tensor,
              out: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.empty_like(like, memory_format=torch.contiguous_format) if out is None else out
        nbytes = out.numel() * out.element_size()
        out.copy_(_typed(self._half(k, seq)[offset:offset + nbytes], out))
        return out

    # -- collectives ----------------------------------------------------------------------------
    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """`dist.all_to_all_single` with equal splits along dim 0 of the flattened tensor."""
        flat = x.reshape(-1)
        out = torch.empty_like(flat)
        self.all_to_all_views(flat.view(self.world, -1), out.view(self.world, -1))
        return out.view(x.shape)

    def all_to_all_views(self, send: torch.Tensor, recv: torch.Tensor) -> None:
        """All-to-all between views: `send[j]` goes to member j of the group and `recv[k]`
        receives what member k sent here. Both have the group's size as first dimension and
        may be any strided view: the copies into and out of shared memory do the permuting a
        caller would otherwise do before and after the exchange."""
        chunk = send[0]
        size = chunk.numel() * chunk.element_size()
        seq = self._begin([(send, send.numel() * send.element_size())])
        recv[self.index].copy_(send[self.index])
        self._wait_all(seq)
        for k in range(self.world):
            if k != self.index:
                self._read(k, seq, self.index * size, chunk, out=recv[k])

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x`, stacked along a new first dimension in group order."""
        seq = self._begin([(x, x.numel() * x.element_size())])
        out = torch.empty((self.world, *x.shape), dtype=x.dtype)
        out[self.index].copy_(x)
        self._wait_all(seq)
        for k in range(self.world):
            if k != self.index:
                self._read(k, seq, 0, x, out=out[k])
        return out

    def post_neighbours(self, to_prev: torch.Tensor | None,
                        to_next: torch.Tensor | None) -> "PostedNeighbours":
        """Start a halo exchange: `to_prev` for rank index-1, `to_next` for index+1 (None where
        there is nothing to send). Each must fit in half the capacity. Returns at once."""
        slot = self.capacity // 2
        seq = self._begin([(to_prev, slot), (to_next, slot)])
        return PostedNeighbours(self, seq, slot)

    def post_shift(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Start passing `x` to the next rank of the ring; the returned wait gives the tensor the
        previous rank passed."""
        seq = self._begin([(x, x.numel() * x.element_size())])

        def wait() -> torch.Tensor:
            self._wait_all(seq)
            return self._read((self.index - 1) % self.world, seq, 0, x)

        return wait

    def reset(self) -> None:
        """Back to sequence 0; every rank must call it, with a barrier after it before the next
        exchange (after a failed job the ranks may have stopped at different exchanges)."""
        self._seq = 0
        self._publish(0)


class PostedNeighbours:
    def __init__(self, channel: ShmChannel, seq: int, slot: int):
        self.channel, self.seq, self.slot = channel, seq, slot

    def wait(self, from_prev: torch.Tensor | None, from_next: torch.Tensor | None
             ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What the neighbours sent, as tensors shaped like `from_prev` and `from_next`
        (None: nothing expected from that side)."""
        ch = self.channel
        ch._wait_all(self.seq)
        prev = next_ = None
        if from_prev is not None:  # the previous rank's payload for its next rank: slot 1
            prev = ch._read(ch.index - 1, self.seq, self.slot, from_prev)
        if from_next is not None:
            next_ = ch._read(ch.index + 1, self.seq, 0, from_next)
        return prev, next_


def _typed(raw: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bytes of shared memory (uint8, aligned to the element size: halves start 64 bytes in and
    every offset is a multiple of an element) as a contiguous tensor shaped like `like`."""
    return raw.view(like.dtype).view(like.shape)


def _affordable(capacity: int, world: int) -> int:
    """At most `capacity`, and the group's files together at most half of /dev/shm's free
    space (the other half left to the next channel and to everyone else)."""
    try:
        stat = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    free = stat.f_bavail * stat.f_frsize
    return min(capacity, free // (4 * world) // 4096 * 4096)


def _sees_peers(everyone: list, index: int) -> bool:
    """Every peer's file is in my /dev/shm with the peer's mark: we share one /dev/shm. Host
    names do not tell (containers with a /dev/shm each may share one), nor does
    LOCAL_WORLD_SIZE (two launchers on one host are two "nodes")."""
    return all(_mark_of(name) == mark
               for k, (_, _, name, mark) in enumerate(everyone) if k != index)


def _mark_of(name: str) -> bytes | None:
    try:
        with open(os.path.join(SHM_DIR, name), "rb") as f:
            f.seek(MARK_AT)
            return f.read(16)
    except OSError:
        return None


def open_channel(group, capacity: int, timeout_s: float, spin: bool = True) -> ShmChannel | None:
    """A channel for `group` (a collective over it), or None on every rank when any rank cannot
    have one: not Linux x86-64, ranks not sharing one /dev/shm (`_sees_peers`: other hosts, or
    containers with one each), or /dev/shm without room. Its capacity is `capacity` or less
    where /dev/shm is small (`_affordable`). `spin`: a waiting rank first reads its peer's
    number in a busy loop (~1 ms; right when every rank has a core of its own), else it yields
    its core at once."""
    world = dist.get_world_size(group)
    index = dist.get_rank(group)
    # rank 0 names the files and sizes them to what /dev/shm has room for (Docker gives a
    # container 64 MiB by default); bigger exchanges then take gloo, as `fits` says
    wanted = capacity
    box = [(uuid.uuid4().hex, _affordable(capacity, world)) if index == 0 else None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    token, capacity = box[0]
    name = f"wanserve-{token}-{index}"
    path = os.path.join(SHM_DIR, name)
    mark = uuid.uuid4().bytes  # 16 bytes
    ok = supported() and capacity >= min(wanted, MIN_CAPACITY)
    if ok:
        try:
            with open(path, "wb") as f:
                f.truncate(SEQ_BYTES + 2 * capacity)
                # fail here, not with SIGBUS at the first copy into a page tmpfs cannot give
                os.posix_fallocate(f.fileno(), 0, SEQ_BYTES + 2 * capacity)
                f.seek(MARK_AT)
                f.write(mark)
        except OSError:
            ok = False
            if os.path.exists(path):
                os.unlink(path)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, (ok, os.getpid(), name, mark), group=group)
    verdicts: list = [None] * world
    dist.all_gather_object(verdicts, all(e[0] for e in everyone) and _sees_peers(everyone, index),
                           group=group)
    channel = None
    try:
        if all(verdicts):
            channel = ShmChannel(group, index, world, [e[1] for e in everyone],
                                 [os.path.join(SHM_DIR, e[2]) for e in everyone], capacity,
                                 timeout_s, spin)
        dist.barrier(group=group)  # every rank has mapped every file
    finally:
        if ok:
            os.unlink(path)  # the mappings stay; nothing is left behind in /dev/shm
    return channel


# -- the channels this process has, by the ranks of their group ----------------------------------
_channels: dict[tuple[int, ...], ShmChannel] = {}


def register(channel: ShmChannel) -> None:
    _channels[tuple(dist.get_process_group_ranks(channel.group))] = channel


def has_channel(ranks: tuple[int, ...]) -> bool:
    return ranks in _channels


def channel_for(group, tensor: torch.Tensor | None = None) -> ShmChannel | None:
    """The channel serving `group`'s ranks; None without one, or when `tensor` is not on the
    CPU or is larger than the channel takes (the caller then uses gloo)."""
    if not _channels or group is None:
        return None
    channel = _channels.get(tuple(dist.get_process_group_ranks(group)))
    if channel is not None and tensor is not None and (
            tensor.device.type != "cpu"
            or not channel.fits(tensor.numel() * tensor.element_size())):
        return None
    return channel


def any_channel() -> bool:
    return bool(_channels)


def reset_all() -> None:
    """Every channel back to its first exchange (see `ShmChannel.reset`)."""
    for channel in _channels.values():
        channel.reset()
