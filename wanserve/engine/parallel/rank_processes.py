"""Which ranks' processes are gone, for the reason rank 0 records when a job fails under it.

A collective that fails because a peer died says only that a connection closed (gloo) or that
it timed out (NCCL). At the ready barrier every rank tells the others its host and pid
(wanserve/engine/parallel/distributed.py `ready_barrier`); rank 0 can then name a peer on its own node that died.
"""
from __future__ import annotations

import os
import socket
import time

DEATH_WAIT_S = 1.0  # a killed peer's sockets close a moment before it becomes a zombie


def this_process() -> tuple[str, int]:
    return socket.gethostname(), os.getpid()


def process_dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie: exited, not reaped
    except (OSError, IndexError):
        return False


def dead_peers(processes: tuple[tuple[str, int], ...], my_rank: int,
               wait_s: float = DEATH_WAIT_S) -> str:
    """'rank 1 (pid 123) died' for each rank on this host whose process is gone, waiting up to
    `wait_s` for one; '' when none is (or their processes are on other nodes)."""
    host = socket.gethostname()
    local = [(rank, pid) for rank, (where, pid) in enumerate(processes)
             if where == host and rank != my_rank]
    deadline = time.monotonic() + wait_s
    while local:
        dead = [f"rank {rank} (pid {pid}) died" for rank, pid in local if process_dead(pid)]
        if dead or time.monotonic() >= deadline:
            return ", ".join(dead)
        time.sleep(0.05)
    return ""
