"""`openai-poll-after-ms`: how long a client polling a job should wait, from the steps the
server has measured.

The SDK's `poll` (and so `create_and_poll`) reads the header of its first answer that is
`queued` or `in_progress` (else it takes a second) and sleeps that long between all its polls.
A running job is worth one poll a step: its progress moves once a step, at the pace its own
steps have taken so far. A step is timed from the one before: a job's first step also holds
its text and image encoding, and is not a step time. A queued job waits for the steps ahead of
it (what the running jobs have left and the queued jobs before it, spread over the replicas);
half of that wait, at least a step, is polled twice before its turn, not a hundred times.
Bounded both ways: a step of a few milliseconds is not worth a request, and a client should
not be left waiting long after the job moved.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

MIN_MS = 100
MAX_MS = 10_000
UNMEASURED_MS = 500  # before any step was measured
_EWMA = 0.3  # weight of the newest step in the server-wide step time


@dataclass
class _Running:
    done: int = 0
    total: int = 0
    first: float = 0.0  # when step 1 ended
    last: float = 0.0


def _bounded(seconds: float) -> int:
    return int(min(MAX_MS, max(MIN_MS, round(seconds * 1000))))


class PollPacer:
    def __init__(self):
        self._lock = threading.Lock()
        self._running: dict[str, _Running] = {}
        self._step_s: float | None = None  # the server's recent step time, any job
        self._first_s: float | None = None  # the same for first steps, until a step is timed

    def started(self, job_id: str) -> None:
        with self._lock:
            self._running[job_id] = _Running()

    def stepped(self, job_id: str, done: int, total: int, seconds: float) -> None:
        now = time.perf_counter()
        with self._lock:
            run = self._running.setdefault(job_id, _Running())
            if run.done == 0:
                run.first = now
                self._first_s = _average(self._first_s, seconds)
            else:
                self._step_s = _average(self._step_s, seconds)
            run.done, run.total, run.last = done, total, now

    def ended(self, job_id: str) -> None:
        with self._lock:
            self._running.pop(job_id, None)

    def _server_step_s(self) -> float | None:
        return self._step_s if self._step_s is not None else self._first_s

    def poll_after_ms(self, job_id: str, status: str, queued_ahead: list[int],
                      replicas: int) -> int:
        """`queued_ahead`: the steps of each job queued before this one."""
        with self._lock:
            run = self._running.get(job_id)
            if status == "in_progress" and run is not None and run.done >= 2:
                return _bounded((run.last - run.first) / (run.done - 1))
            step_s = self._server_step_s()
            if step_s is None:
                return UNMEASURED_MS
            if status == "in_progress":
                return _bounded(step_s)
            left = sum(max(0, r.total - r.done) for key, r in self._running.items()
                       if key != job_id)
        wait_s = (left + sum(queued_ahead)) * step_s / max(1, replicas)
        return _bounded(max(step_s, wait_s / 2))


def _average(mean: float | None, value: float) -> float:
    return value if mean is None else _EWMA * value + (1 - _EWMA) * mean
