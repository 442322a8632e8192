"""Rank 0's engine: one bounded queue, and one thread per replica that feeds it jobs.

The first thread loads the pipeline; then each replica's thread loops: pop a request → run it
on its replica → report through `EngineEvents`. Replica 0 is rank 0's own (rank 0 broadcasts
the request to its ranks and runs it like them); the others are driven through their leader
(wanserve/engine/serving/replicas.py). A job goes to whichever replica is free first. The threads never touch
HTTP or files; the API layer turns events into job updates and encodes the MP4 on its own
executor.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from wanserve.engine.adapters.lora import AdapterLoadError
from wanserve.engine.assembly import ServedModel
from wanserve.engine.parallel.distributed import (DistContext, broadcast_message, read_note,
                                                  ready_barrier)
from wanserve.engine.serving.frames import FrameSink
from wanserve.engine.serving.replicas import RemoteReplica, ReplicaFailed, ReplicaLost
from wanserve.engine.model.features import ModelFeatures
from wanserve.engine.parallel.rank_processes import dead_peers
from wanserve.engine.serving.request import GenerationRequest, GenerationResult, JobCancelled, Shutdown
from wanserve.engine.serving.worker import JobOutOfMemory, end_of_job, oom_note, run_request

log = logging.getLogger("wanserve.engine")


class QueueFull(Exception):
    pass


class EngineEvents(Protocol):
    def on_started(self, job_id: str) -> None: ...
    def frame_sink(self, job_id: str) -> FrameSink | None: ...  # the frames as they are decoded
    def on_progress(self, job_id: str, done: int, total: int) -> None: ...
    def on_finished(self, job_id: str, result: GenerationResult) -> None: ...
    def on_failed(self, job_id: str, message: str, code: str) -> None: ...
    def on_cancelled(self, job_id: str) -> None: ...
    def on_fatal(self, message: str) -> None: ...


_STOP = object()


@dataclass
class Replica:
    """One replica as rank 0 sees it (for /health and /metrics)."""

    index: int
    ranks: tuple[int, ...]
    state: str = "loading"  # loading → idle ⇄ busy → stopped | failed
    current_job: str | None = None
    jobs_run: int = 0
    thread: threading.Thread | None = field(default=None, repr=False)

    def public(self) -> dict:
        return {"replica": self.index, "ranks": list(self.ranks), "state": self.state,
                "current_job": self.current_job, "jobs_run": self.jobs_run}


class Engine:
    def __init__(self, ctx: DistContext, load: Callable[[], ServedModel],
                 events: EngineEvents, max_queue: int, job_timeout_s: float):
        self.ctx = ctx
        self._load = load
        self._events = events
        self._max_queue = max_queue
        self._job_timeout_s = job_timeout_s
        self._queue: queue.Queue = queue.Queue()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        layout = ctx.layout
        self.replicas = [Replica(r, tuple(layout.replica_ranks(r))) for r in range(layout.dp)]
        self._remote = {link.replica: RemoteReplica(link) for link in ctx.links}
        self._loader = threading.Thread(target=self._start, name="wanserve-engine", daemon=True)
        self.state = "loading"  # loading → ready → stopped | failed
        self.error: str | None = None
        self.info: dict = {}  # what runs where (attention backend, parallel parts), once loaded
        self.features = ModelFeatures()  # what requests may ask of the model, once loaded
        self.memory_plan = None  # wanserve/engine/model/memory_plan.py, once loaded
        self.offload = None  # wanserve.engine.model.offload.ExpertOffload when the inactive expert is offloaded
        self.prompt_cache = None  # rank 0's (wanserve/engine/model/prompt_cache.py), once loaded
        self._stopping = False

    # --- called from the API (any thread) ---------------------------------------------
    def start(self) -> None:
        self._loader.start()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def current_job(self) -> str | None:
        """The job replica 0 runs, else any replica's (one replica: the job)."""
        return next((r.current_job for r in self.replicas if r.current_job), None)

    @property
    def prompt_cache_counts(self) -> tuple[int, int]:
        """(hits, misses) of rank 0's prompt cache."""
        cache = self.prompt_cache
        return (cache.hits, cache.misses) if cache is not None else (0, 0)

    def replica_of(self, job_id: str) -> int | None:
        return next((r.index for r in self.replicas if r.current_job == job_id), None)

    def submit(self, request: GenerationRequest) -> None:
        with self._lock:
            if self._queue.qsize() >= self._max_queue:
                raise QueueFull(f"the queue is full ({self._max_queue} jobs waiting)")
            self._queue.put(request)

    def cancel(self, job_id: str) -> None:
        """Queued jobs are dropped when popped; a running job stops at its next step."""
        with self._lock:
            self._cancelled.add(job_id)

    def stop(self, timeout: float = 25.0) -> bool:
        """Stop within `timeout`: running jobs are interrupted at their next step (or latent
        frame of their decode) and they and every queued job are failed with a reason (their
        clients are told, nothing hangs). False when a replica's thread is still inside a step
        at the timeout: its jobs are failed all the same, and the process must exit without
        waiting for it."""
        self._stopping = True
        for _ in self.replicas:
            self._queue.put(_STOP)
        deadline = time.monotonic() + timeout
        self._loader.join(max(0.0, deadline - time.monotonic()))
        for replica in self.replicas:
            if replica.thread is not None:
                replica.thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [r for r in self.replicas if r.thread is not None and r.thread.is_alive()]
        if not stuck and not self._loader.is_alive():
            return True
        log.error("a running job did not reach a stopping point within %gs", timeout)
        for replica in stuck:
            if replica.current_job is not None:
                self._events.on_failed(replica.current_job, "the server stopped before the "
                                       "job finished", "server_shutdown")
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return False
            if item is not _STOP:
                self._events.on_failed(item.job_id, "the server stopped before the job "
                                       "started", "server_shutdown")

    # --- the engine threads ---------------------------------------------------------------
    def _start(self) -> None:
        try:
            model = self._load()
            ready_barrier(self.ctx)
        except Exception as exc:
            log.exception("engine failed to start")
            self._fail(f"engine failed to start: {exc}")
            return
        self.info = model.info
        self.features = model.features
        self.memory_plan = model.memory_plan
        self.offload = model.offload
        self.prompt_cache = model.pipe.prompt_cache
        for replica in self.replicas:
            replica.state = "idle"
            replica.thread = threading.Thread(target=self._serve, args=(replica, model),
                                              name=f"wanserve-replica-{replica.index}",
                                              daemon=True)
        self.state = "ready"
        log.info("engine ready (%d replica(s))", len(self.replicas))
        for replica in self.replicas:
            replica.thread.start()

    def _serve(self, replica: Replica, model: ServedModel) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                self._tell_replica_to_stop(replica, "server stopping")
                replica.state = "stopped"
                if all(r.state == "stopped" for r in self.replicas):
                    self.state = "stopped"
                return
            if self._stopping:
                self._events.on_failed(item.job_id, "the server stopped before the job started",
                                       "server_shutdown")
                continue
            if self._take_cancel(item.job_id):
                self._events.on_cancelled(item.job_id)
                continue
            if not self._run_job(replica, model, item):
                replica.state = "failed"
                return

    def _naming_dead_peers(self, reason: str) -> str:
        dead = dead_peers(self.ctx.processes, self.ctx.rank)
        if dead:
            log.error("%s", dead)
        return f"{reason} ({dead})" if dead else reason

    def _execute(self, replica: Replica, model: ServedModel, request: GenerationRequest,
                 progress, cancelled, sink: FrameSink | None) -> GenerationResult:
        """The job's frames come back as uint8, the MP4 encoder's input."""
        remote = self._remote.get(replica.index)
        if remote is not None:  # its leader sends the frames in chunks after its decode
            return remote.run(request, progress, cancelled, sink)
        broadcast_message(self.ctx, request)
        return run_request(self.ctx, model, request, progress, cancelled, sink, as_uint8=True)

    def _run_job(self, replica: Replica, model: ServedModel, request: GenerationRequest) -> bool:
        job_id = request.job_id
        deadline = time.monotonic() + self._job_timeout_s
        replica.current_job, replica.state = job_id, "busy"
        try:
            self._events.on_started(job_id)
            sink = self._events.frame_sink(job_id)
            result = self._execute(
                replica, model, request,
                progress=lambda done, total: self._events.on_progress(job_id, done, total),
                cancelled=lambda: (self._stopping or job_id in self._cancelled
                                   or time.monotonic() > deadline),
                sink=sink,
            )
            self._events.on_finished(job_id, result)
        except JobCancelled:
            if self._stopping:  # the `finally` below clears any cancel mark
                self._events.on_failed(job_id, "the server stopped before the job finished",
                                       "server_shutdown")
            elif self._take_cancel(job_id):
                self._events.on_cancelled(job_id)
            else:
                self._events.on_failed(job_id, f"the job exceeded the time limit of "
                                       f"{self._job_timeout_s:g}s", "job_timeout")
        except AdapterLoadError as exc:
            # the same file failed on every rank before the job's first collective: the
            # ranks are still in step
            self._events.on_failed(job_id, f"the LoRA could not be loaded: {exc}",
                                   "lora_load_failed")
        except ReplicaLost as exc:
            log.error("job %s: %s", job_id, exc)
            reason = self._naming_dead_peers(f"a rank died or stopped responding: {exc}")
            self._events.on_failed(job_id, reason, "engine_failure")
            self._fail(reason)
            return False
        except Exception as exc:
            log.exception("job %s failed on replica %d", job_id, replica.index)
            fatal = exc.fatal if isinstance(exc, ReplicaFailed) else self.ctx.replica_size > 1
            reason = str(exc) if isinstance(exc, ReplicaFailed) else f"generation failed: {exc}"
            out_of_memory = self._out_of_memory(exc, job_id, fatal)
            if out_of_memory:  # running it again would run out of memory again
                self._events.on_failed(job_id, out_of_memory, "out_of_memory")
            else:
                # `engine_failure`: the engine goes down under the job (the service keeps it
                # for the next start)
                self._events.on_failed(job_id, self._naming_dead_peers(reason) if fatal
                                       else reason, "engine_failure" if fatal
                                       else "generation_failed")
            if fatal:
                # the replica's other ranks may be inside a collective of this job, and on
                # NCCL they cannot be put back in step: stop, so that every rank restarts clean
                self._fail(f"a job failed on replica {replica.index} ({exc}); the engine "
                           "stops so that every rank restarts in a known state")
                return False
        finally:
            replica.current_job = None
            replica.jobs_run += 1
            if replica.state == "busy":
                replica.state = "idle"
            self._take_cancel(job_id)
        if replica.index in self._remote:
            return True  # its leader ran the end of the job before it answered
        try:
            end_of_job(self.ctx, model)
        except Exception as exc:
            log.error("a rank did not reach the end of job %s: %s", job_id, exc)
            self._fail(f"a rank died or stopped responding: {exc}")
            return False
        return True

    def _out_of_memory(self, exc: Exception, job_id: str, fatal: bool) -> str | None:
        """The reason, when the job failed for want of memory: on this rank, on another
        replica, or on a rank that left it in the store before it exited."""
        if isinstance(exc, JobOutOfMemory) or getattr(exc, "code", "") == "out_of_memory":
            return str(exc)
        return read_note(oom_note(job_id)) if fatal else None

    def _take_cancel(self, job_id: str) -> bool:
        with self._lock:
            if job_id in self._cancelled:
                self._cancelled.discard(job_id)
                return True
            return False

    def _tell_replica_to_stop(self, replica: Replica, reason: str) -> None:
        try:
            remote = self._remote.get(replica.index)
            if remote is not None:
                remote.shutdown(reason)
            else:
                broadcast_message(self.ctx, Shutdown(reason))
        except Exception as exc:
            log.warning("could not tell replica %d to stop: %s", replica.index, exc)

    def _fail(self, message: str) -> None:
        self.state = "failed"
        self.error = message
        self._events.on_fatal(message)
