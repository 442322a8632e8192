"""Rank 0's engine: a bounded queue and one thread that feeds every rank, one job at a time.

The thread loads the pipeline, then loops: pop a request → broadcast it → run it like every
other rank → report through `EngineEvents`. It never touches HTTP or files; the API layer
turns events into job updates and encodes the MP4 on its own executor.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Protocol

from engine.adapters import AdapterLoadError
from engine.assembly import ServedModel
from engine.distributed import DistContext, broadcast_message, ready_barrier
from engine.features import ModelFeatures
from engine.request import GenerationRequest, GenerationResult, JobCancelled, Shutdown
from engine.worker import end_of_job, run_request

log = logging.getLogger("wanserve.engine")


class QueueFull(Exception):
    pass


class EngineEvents(Protocol):
    def on_started(self, job_id: str) -> None: ...
    def on_progress(self, job_id: str, done: int, total: int) -> None: ...
    def on_finished(self, job_id: str, result: GenerationResult) -> None: ...
    def on_failed(self, job_id: str, message: str, code: str) -> None: ...
    def on_cancelled(self, job_id: str) -> None: ...
    def on_fatal(self, message: str) -> None: ...


_STOP = object()


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
        self._thread = threading.Thread(target=self._run, name="wanserve-engine", daemon=True)
        self.state = "loading"  # loading → ready → stopped | failed
        self.error: str | None = None
        self.current_job: str | None = None
        self.info: dict = {}  # what runs where (attention backend, parallel parts), once loaded
        self.features = ModelFeatures()  # what requests may ask of the model, once loaded
        self.offload = None  # engine.offload.ExpertOffload when the inactive expert is offloaded
        self._stopping = False

    # --- called from the API (any thread) ---------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

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
        """Stop within `timeout`: the running job is interrupted at its next step (or latent
        frame of its decode) and it and every queued job are failed with a reason (their
        clients are told, nothing hangs). False when the engine thread is still inside a step
        at the timeout: its jobs are failed all the same, and the process must exit without
        waiting for it."""
        self._stopping = True
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            return True
        log.error("the running job did not reach a stopping point within %gs", timeout)
        running = self.current_job
        if running is not None:
            self._events.on_failed(running, "the server stopped before the job finished",
                                   "server_shutdown")
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return False
            if item is not _STOP:
                self._events.on_failed(item.job_id, "the server stopped before the job "
                                       "started", "server_shutdown")

    # --- the engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            model = self._load()
            ready_barrier(self.ctx)
        except Exception as exc:
            log.exception("engine failed to start")
            self._fail(f"engine failed to start: {exc}")
            return
        self.info = model.info
        self.features = model.features
        self.offload = model.offload
        self.state = "ready"
        log.info("engine ready")
        while True:
            item = self._queue.get()
            if item is _STOP:
                self._broadcast_shutdown("server stopping")
                self.state = "stopped"
                return
            if self._stopping:
                self._events.on_failed(item.job_id, "the server stopped before the job started",
                                       "server_shutdown")
                continue
            if self._take_cancel(item.job_id):
                self._events.on_cancelled(item.job_id)
                continue
            if not self._run_job(model, item):
                return

    def _run_job(self, model: ServedModel, request: GenerationRequest) -> bool:
        job_id = request.job_id
        deadline = time.monotonic() + self._job_timeout_s
        self.current_job = job_id
        try:
            broadcast_message(self.ctx, request)
            self._events.on_started(job_id)
            result = run_request(
                self.ctx, model, request,
                progress=lambda done, total: self._events.on_progress(job_id, done, total),
                cancelled=lambda: (self._stopping or job_id in self._cancelled
                                   or time.monotonic() > deadline),
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
        except Exception as exc:
            log.exception("job %s failed", job_id)
            self._events.on_failed(job_id, f"generation failed: {exc}", "generation_failed")
            if self.ctx.world_size > 1:
                # the other ranks may be inside a collective of this job, and on NCCL they
                # cannot be put back in step: stop, so that every rank restarts clean
                self._fail(f"a job failed on rank 0 ({exc}); the engine stops so that every "
                           "rank restarts in a known state")
                return False
        finally:
            self.current_job = None
            self._take_cancel(job_id)
        try:
            end_of_job(self.ctx, model)
        except Exception as exc:
            log.error("a rank did not reach the end of job %s: %s", job_id, exc)
            self._fail(f"a rank died or stopped responding: {exc}")
            return False
        return True

    def _take_cancel(self, job_id: str) -> bool:
        with self._lock:
            if job_id in self._cancelled:
                self._cancelled.discard(job_id)
                return True
            return False

    def _broadcast_shutdown(self, reason: str) -> None:
        try:
            broadcast_message(self.ctx, Shutdown(reason))
        except Exception as exc:
            log.warning("could not tell the other ranks to stop: %s", exc)

    def _fail(self, message: str) -> None:
        self.state = "failed"
        self.error = message
        self._events.on_fatal(message)
