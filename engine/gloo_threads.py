"""gloo's event-loop threads give way to a CPU rank's own compute.

Written for torch 2.13.0's bundled gloo on Linux. Every gloo process group has its own TCP
device, and each device runs a thread ("gloo_tcp_loop") that wakes from `epoll_wait` every
10 ms whether or not anything is in flight (gloo/transport/tcp/loop.cc). xfuser's parallel
state and our control and step channels make ~23 such groups per rank, so a rank pinned to
one core is preempted ~2,300 times a second by its own idle threads; the rank it syncs with
next then waits for it. At SCHED_IDLE those threads only get the core when the rank's main
thread is not using it, which is when gloo has work: every gloo collective on CPU blocks its
caller until it completes.

Only applied where shared memory (engine/shm_transport.py) carries the large exchanges, gloo
then moving control messages and small fallbacks, and where every rank has a core to itself
(with more ranks than cores, the core a rank frees by waiting goes to a peer, not to these).
The cost: an asynchronous gloo receive posted before a long computation progresses only once
the core is free (the rank waits, or on rank 0 the MP4 encoding of the previous video, which
shares its core, pauses); nothing is lost, and every wait stays bounded by the collective
timeout.
"""
from __future__ import annotations

import os

LOOP_THREAD_NAME = "gloo_tcp_loop"


def set_gloo_loop_policy(policy: int | None = None) -> int:
    """Give this process's gloo event-loop threads the scheduling `policy` (None: SCHED_IDLE);
    returns how many. Threads created later keep their creator's policy: call once every
    process group exists."""
    if not hasattr(os, "SCHED_IDLE") or not os.path.isdir("/proc/self/task"):
        return 0
    policy = os.SCHED_IDLE if policy is None else policy
    count = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() != LOOP_THREAD_NAME:
                    continue
            os.sched_setscheduler(int(tid), policy, os.sched_param(0))
            count += 1
        except (FileNotFoundError, ProcessLookupError):  # the thread ended meanwhile
            pass
    return count
