"""The video service: jobs in, engine events out. No HTTP here (routes live in wanserve/api/app.py).

Engine events arrive on the engine thread; each job's MP4 is encoded on a thread of its own as
the VAE decodes its frames (wanserve/api/mp4_stream.py) and finished and stored on this service's
own executor, so the engine thread is free for the next job while the previous one is stored.
A streamed job's (`stream: true`) is a fragmented MP4 whose bytes its readers follow as they are
written (`live_video`), from its creation until it ends.

A stop loses no job: one the engine gives back unfinished because the server stops, or because a
rank broke and the engine stops for a restart, goes back to `queued` with its inputs kept, and
the next start runs it again (wanserve/api/resume.py). Its synchronous caller gets 503
`server_restarting` naming the job.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import errno
import logging
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

from wanserve.api.events import EventHub
from wanserve.api.extensions import (SOURCE_PART, ExtensionStream, SourceVideo, plain_create,
                                     source_of)
from wanserve.api.errors import (APIError, EngineUnavailable, GenerationFailed,
                                 InsufficientStorage, InvalidRequest, NotFound, RateLimited)
from wanserve.api.jobs import TERMINAL, Job, JobStore, is_job_id, new_job_id
from wanserve.api.live_video import LiveVideo
from wanserve.api.metrics import Metrics
from wanserve.api.memory_budget import check_budget
from wanserve.api.pacing import PollPacer
from wanserve.api.params import parse_params, resolve_request
from wanserve.api.retention import Retention, StoreLimits
from wanserve.api.mp4_stream import StreamedMp4
from wanserve.api.video import encode_mp4
from wanserve.engine.config import ServerConfig
from wanserve.engine.serving.engine import Engine, QueueFull
from wanserve.engine.serving.request import GenerationResult

log = logging.getLogger("wanserve.api")


class VideoService:
    def __init__(self, cfg: ServerConfig, store: JobStore, metrics: Metrics):
        self.cfg = cfg
        self.store = store
        self.metrics = metrics
        self.retention = Retention(store, StoreLimits(cfg.max_stored_videos, cfg.max_stored_bytes,
                                                      cfg.min_free_bytes),
                                   on_evicted=metrics.evicted.inc)
        self.engine: Engine | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.on_fatal_hook = None
        self._waiters: dict[str, asyncio.Future] = {}
        self._encoder = ThreadPoolExecutor(1, thread_name_prefix="wanserve-mp4")
        self._started: dict[str, float] = {}
        self._last_step: dict[str, float] = {}
        self._steps: dict[str, int] = {}  # steps done by the running job
        self._replicas: dict[str, str] = {}  # the replica running each job (a metrics label)
        self.events = EventHub()
        self.pacer = PollPacer()
        self.stopping = False
        self._encoding: set[str] = set()  # generated, MP4 being written: answered when stored
        self._streams: dict[str, StreamedMp4] = {}  # MP4s encoded while their job decodes
        self._live: dict[str, LiveVideo] = {}  # streamed jobs' MP4s, for their readers
        self.resuming = False  # jobs from before a restart still going back into the queue

    # --- requests (event loop) ------------------------------------------------------------
    def _require_engine(self) -> Engine:
        if self.stopping:
            raise EngineUnavailable("the server is stopping; retry once it is back",
                                    code="server_restarting", headers={"Retry-After": "10"})
        if self.resuming:  # they go first: they were submitted first
            raise EngineUnavailable("the server is queueing the jobs it had before its restart",
                                    code="engine_not_ready", headers={"Retry-After": "1"})
        if self.engine is None or self.engine.state != "ready":
            state = self.engine.state if self.engine else "starting"
            raise EngineUnavailable(f"the engine is not ready ({state})", code="engine_not_ready",
                                    headers={"Retry-After": "5"})
        return self.engine

    def request_for(self, job_id: str, fields: dict, files: dict[str, bytes]):
        """(params, GenerationRequest) from a request's fields and file parts."""
        params = parse_params(fields)
        return params, resolve_request(job_id, params, files.get("input_reference"), self.cfg,
                                       self.engine.features, files.get("last_frame"))

    def create_extension(self, fields: dict, files: dict[str, bytes]) -> Job:
        """A job that continues `video` from its last frame (wanserve/api/extensions.py)."""
        self._require_engine()
        source = source_of(fields, files, self.store, self.cfg.limits)
        fields, files = plain_create(fields, files, source)
        try:
            return self.create_job(fields, files, source)
        except InvalidRequest as exc:
            if exc.param not in ("size", "width", "height", "fps"):
                raise
            raise InvalidRequest(f"the source video ({source.width}x{source.height} at "
                                 f"{source.fps} fps) cannot be extended by this model: "
                                 f"{exc.message}", param="video", code=exc.code) from None

    def create_job(self, fields: dict, files: dict[str, bytes],
                   source: SourceVideo | None = None) -> Job:
        """`source`: an extension's (its frames come first; `files` holds its MP4)."""
        engine = self._require_engine()
        self._require_room()
        job_id = new_job_id()
        params, request = self.request_for(job_id, fields, files)
        check_budget(request, engine.memory_plan, self.cfg)
        num_frames = request.num_frames
        if source is not None:  # the joint frame once
            num_frames += source.frames - 1
            if num_frames > self.cfg.limits.total_frames:
                param = "num_frames" if params.num_frames is not None else "seconds"
                raise InvalidRequest(
                    f"the extended video would have {num_frames} frames ({source.frames} of the "
                    f"source, {request.num_frames - 1} new); limits.max_total_frames is "
                    f"{self.cfg.limits.total_frames}", param=param, code="invalid_value")
        job = Job(id=job_id, status="queued", created_at=int(time.time()),
                  model=self.cfg.served_model_name, prompt=request.prompt,
                  seconds=f"{num_frames / request.fps:g}",
                  size=f"{request.width}x{request.height}", seed=request.seed,
                  num_frames=num_frames, fps=request.fps,
                  num_inference_steps=request.num_inference_steps,
                  quality=params.quality or "high",
                  extended_from=source and source.job_id,
                  source_frames=source and source.frames, stream=bool(params.stream))
        try:  # the seed pinned: a re-run after a restart makes the same video
            self.store.add(job, {**fields, "seed": request.seed}, files)
        except (OSError, sqlite3.Error) as exc:
            if _disk_full(exc):
                raise InsufficientStorage(f"the server's disk is full: {exc}; the job was not "
                                          "stored", code="insufficient_storage") from None
            raise GenerationFailed(f"could not store the job: {exc}", code="storage_failed") from None
        self.retention.enforce_caps()
        queued = dataclasses.replace(job)  # as submitted: the engine may start it at once
        self._waiters[job_id] = self.loop.create_future()
        if job.stream:
            self._live[job_id] = LiveVideo()
        try:
            engine.submit(request)
        except QueueFull as exc:
            self.store.delete(job_id)
            self._waiters.pop(job_id, None)
            self._live.pop(job_id, None)
            self.metrics.rejected.inc()
            raise RateLimited(str(exc), code="queue_full", headers={"Retry-After": "10"}) from None
        self.metrics.jobs.labels("queued").inc()
        log.info("job %s queued: %s %s frames, %d steps, seed %d", job_id, job.size,
                 request.num_frames, request.num_inference_steps, request.seed)
        return queued

    def _require_room(self) -> None:
        """A full disk refuses new jobs; stored videos stay readable."""
        if not self.retention.has_room():
            raise InsufficientStorage(
                f"the server's disk has less than {self.cfg.min_free_bytes} bytes free "
                "(server.min_free_bytes); no new job is taken until there is room",
                code="insufficient_storage")

    async def wait(self, job_id: str) -> Job:
        future = self._waiters.get(job_id)
        if future is not None:
            await asyncio.shield(future)
        return self.store.get(job_id)

    async def wait_for_caller(self, job_id: str) -> Job:
        """`wait` for a synchronous caller: if it goes away, the job is cancelled. If the server
        stops first, the job stays for the restart and the caller is told so."""
        try:
            job = await self.wait(job_id)
        except asyncio.CancelledError:
            if not self.stopping:  # a stop closes every connection: nobody went away
                self.cancel_abandoned(job_id)
            raise
        if job is not None and job.status not in TERMINAL:
            raise EngineUnavailable(
                f"the server is restarting before video {job_id} was done; the job is kept and "
                f"runs after the restart: poll GET /v1/videos/{job_id}", code="server_restarting",
                headers={"Retry-After": "10"})
        return job

    def video_bytes(self, job: Job) -> bytes:
        """The finished job's MP4, or the error a synchronous caller gets instead."""
        if job.status == "failed":
            raise GenerationFailed(job.error_message or "generation failed", code=job.error_code)
        if job.status == "cancelled":
            raise APIError("the job was cancelled", code="cancelled", status=409)
        return self.store.video_path(job).read_bytes()

    def live_video(self, job_id: str) -> LiveVideo | None:
        """The MP4 of a streamed job that has not ended, as it is written; None once the job
        ended (its file is stored then, if it completed)."""
        return self._live.get(job_id)

    def sync_body(self, job: Job) -> dict:
        data = self.video_bytes(job)
        return {"created": job.completed_at, "data": [{"b64_json": base64.b64encode(data).decode()}],
                **job.public()}

    def event_of(self, job: Job) -> dict:
        """The event-stream view of a job (wanserve/api/protocol.py VideoEvent)."""
        step = job.num_inference_steps if job.status == "completed" else self._steps.get(job.id, 0)
        event = {"id": job.id, "status": job.status, "progress": job.progress, "step": step,
                 "total_steps": job.num_inference_steps}
        if job.error_code:
            event["error"] = {"code": job.error_code, "message": job.error_message}
        return event

    def get_job(self, job_id: str) -> Job:
        job = self.store.get(job_id) if is_job_id(job_id) else None
        if job is None:
            raise NotFound(f"no video with id {job_id!r}", param="video_id", code="video_not_found")
        return job

    def poll_headers(self, job: Job) -> dict[str, str]:
        """`openai-poll-after-ms` for a job still to be polled (wanserve/api/pacing.py)."""
        if job.status in TERMINAL:
            return {}
        replicas = len(self.engine.replicas) if self.engine is not None else 1
        wait = self.pacer.poll_after_ms(job.id, job.status, self.store.steps_queued_before(job),
                                        replicas)
        return {"openai-poll-after-ms": str(wait)}

    def cancel_or_delete(self, job_id: str) -> dict:
        job = self.get_job(job_id)
        if job.status not in TERMINAL:
            self.engine.cancel(job_id)
            self.store.update(job_id, status="cancelled", completed_at=int(time.time()),
                              error_code="cancelled", error_message="cancelled by the client")
            self._resolve(job_id)
        self.store.delete(job_id)
        return {"id": job_id, "object": "video.deleted", "deleted": True}

    def cancel_abandoned(self, job_id: str) -> None:
        """A synchronous caller went away: nobody will read the result."""
        job = self.store.get(job_id)
        if job is not None and job.status not in TERMINAL:
            log.info("job %s: client disconnected, cancelling", job_id)
            self.engine.cancel(job_id)
            self.store.update(job_id, status="cancelled", completed_at=int(time.time()),
                              error_code="client_disconnected",
                              error_message="the synchronous caller disconnected")
            self._resolve(job_id)

    # --- engine events (engine thread) ----------------------------------------------------
    def _replica(self, job_id: str) -> str:
        replica = self.engine.replica_of(job_id) if self.engine is not None else None
        return str(replica if replica is not None else 0)

    def on_started(self, job_id: str) -> None:
        self._started[job_id] = self._last_step[job_id] = time.perf_counter()
        self.pacer.started(job_id)
        self._replicas[job_id] = replica = self._replica(job_id)
        self.metrics.replica_jobs.labels(replica).inc()
        job = self.store.get(job_id)
        if job is not None and job.stream and job_id not in self._live:  # resumed after a restart
            self._live[job_id] = LiveVideo()
        self.store.update(job_id, status="in_progress", attempts=(job.attempts if job else 0) + 1,
                          last_error=None)

    def on_progress(self, job_id: str, done: int, total: int) -> None:
        now = time.perf_counter()
        self.metrics.step_seconds.labels(self._replicas.get(job_id, "0")).observe(
            now - self._last_step.get(job_id, now))
        self.pacer.stepped(job_id, done, total, now - self._last_step.get(job_id, now))
        self._last_step[job_id] = now
        self._steps[job_id] = done
        job = self.store.update(job_id, persist=False, progress=min(99, 100 * done // total))
        if job is not None:
            self.events.publish(job_id, {"id": job_id, "status": job.status,
                                         "progress": job.progress, "step": done,
                                         "total_steps": total})
            log.info("job %s [%-20s] step %d/%d", job_id, "#" * (20 * done // total), done, total)

    def frame_sink(self, job_id: str) -> StreamedMp4 | None:
        """The job's MP4, encoded on a thread of its own as the VAE decodes its frames."""
        job = self.store.get(job_id)
        if job is None or job.status in TERMINAL:
            return None
        try:
            self._streams[job_id] = stream = self._new_stream(job)
        except GenerationFailed:
            return None  # the encode after the generation fails the job, saying why
        return stream

    def _new_stream(self, job: Job) -> StreamedMp4:
        options = {"quality": job.quality, "preset": self.cfg.mp4_preset,
                   "live": self._live.get(job.id)}
        if not job.source_frames:
            return StreamedMp4(job.fps, **options)
        inputs = self.store.inputs.load(job.id)
        if inputs is None or SOURCE_PART not in inputs[1]:
            raise GenerationFailed("the extension's source video is missing from its inputs",
                                   code="inputs_lost")
        return ExtensionStream(job.fps, inputs[1][SOURCE_PART], **options)

    def on_finished(self, job_id: str, result: GenerationResult) -> None:
        self._encoding.add(job_id)
        self._encoder.submit(self._encode_and_complete, job_id, result)

    def _encode_and_complete(self, job_id: str, result: GenerationResult) -> None:
        job = self.store.get(job_id)
        if job is None or job.status in TERMINAL:  # cancelled meanwhile
            return self._resolve(job_id)
        try:
            start = time.perf_counter()
            stream = self._streams.pop(job_id, None)
            if stream is None and (job.source_frames or job.stream):  # here, all at once
                stream = self._new_stream(job)
                stream.put(result.frames)
            if stream is not None:  # every frame was put as it was decoded
                data, encode_s = stream.finish(), stream.encode_s
            else:
                data = encode_mp4(result.frames, job.fps, quality=job.quality,
                                  preset=self.cfg.mp4_preset)
                encode_s = time.perf_counter() - start
            timings = {k: round(v, 4) for k, v in result.timings.items()}
            timings["mp4_encode"] = round(encode_s, 4)
            if stream is not None:
                timings["mp4_chunks"] = stream.chunks
            # what the encode added after the decode ended (the rest overlapped it)
            timings["mp4_after_decode"] = round(time.perf_counter() - start, 4)
            video_file = self.store.save_video(job_id, data)
        except Exception as exc:
            log.exception("job %s: could not store the video", job_id)
            return self.on_failed(job_id, f"could not store the video: {exc}", "storage_failed")
        now = time.time()
        completed = self.store.update(
            job_id, status="completed", progress=100, completed_at=int(now),
            expires_at=int(now + self.store.ttl_s), timings=timings, video_file=video_file,
            peak_memory_kind=result.peak_memory_kind,
            peak_memory_mb=(round(result.peak_memory_mb, 1)
                            if result.peak_memory_mb is not None else None),
            cache=result.cache)
        if completed is None:  # cancelled or deleted while its MP4 was encoded: no row keeps it
            self.store.remove_video(video_file)
            return self._resolve(job_id)
        self.metrics.jobs.labels("completed").inc()
        for kind in ("computed", "cached"):
            for expert, n in ((result.cache or {}).get(kind) or {}).items():
                self.metrics.cache_steps.labels(expert, kind).inc(n)
        self.retention.enforce_caps()
        self.metrics.job_seconds.labels(self._replicas.pop(job_id, "0")).observe(
            time.perf_counter() - self._started.pop(job_id, start))
        log.info("job %s completed (%s)", job_id, timings)
        self._resolve(job_id)

    def on_failed(self, job_id: str, message: str, code: str) -> None:
        """`server_shutdown` and `engine_failure` (a job the engine went down under: on several
        ranks rank 0 cannot tell a job that broke from a peer that died) keep the job for the
        next start, which runs it again up to `server.max_attempts` times."""
        if code in ("server_shutdown", "engine_failure"):
            return self._keep_for_restart(job_id, message)
        self.store.update(job_id, status="failed", completed_at=int(time.time()),
                          error_code=code, error_message=message)
        self.metrics.jobs.labels("failed").inc()
        self._started.pop(job_id, None)
        self._resolve(job_id)

    def on_cancelled(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job is not None and job.status not in TERMINAL:
            self.store.update(job_id, status="cancelled", completed_at=int(time.time()),
                              error_code="cancelled", error_message="cancelled")
        self.metrics.jobs.labels("cancelled").inc()
        self._started.pop(job_id, None)
        self._resolve(job_id)

    def on_fatal(self, message: str) -> None:
        """The engine stopped for a restart: its jobs stay queued in the store for the next
        start; their synchronous callers are answered now."""
        log.error("engine failure: %s", message)
        self.release_waiters()
        if self.on_fatal_hook is not None:
            self.on_fatal_hook(message)

    def _keep_for_restart(self, job_id: str, reason: str) -> None:
        job = self.store.get(job_id)
        if job is not None and job.status not in TERMINAL:
            log.info("job %s goes back to the queue for the next start: %s", job_id, reason)
            self.store.update(job_id, status="queued", progress=0, last_error=reason)
        self._started.pop(job_id, None)
        self._resolve(job_id)

    def begin_stop(self) -> None:
        """No new jobs from here on; a caller cut off by the stop is not a caller who left."""
        self.stopping = True

    def release_waiters(self) -> None:
        """Answer every synchronous caller still waiting (`wait_for_caller` tells the ones
        whose job is not done that it runs after the restart), and end every streamed video's
        readers."""
        for job_id in {*self._waiters, *self._live}:
            if job_id not in self._encoding:
                self._resolve(job_id)

    def _resolve(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job is not None:
            self.events.publish(job_id, self.event_of(job))
        self._steps.pop(job_id, None)
        self.pacer.ended(job_id)
        self._last_step.pop(job_id, None)
        self._replicas.pop(job_id, None)
        self._encoding.discard(job_id)
        stream = self._streams.pop(job_id, None)
        if stream is not None:  # the job ended without a video
            stream.abort()
        live = self._live.pop(job_id, None)
        if live is not None:  # after the job's state: a reader who misses it finds the file
            live.end(complete=job is not None and job.status == "completed")
        future = self._waiters.pop(job_id, None)
        if future is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(lambda: future.done() or future.set_result(None))

    def close(self) -> None:
        self._encoder.shutdown(wait=True)


def _disk_full(exc: Exception) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return "full" in str(exc)  # sqlite3: "database or disk is full"


def validate_listing(after: str | None, limit: str | None, order: str | None) -> tuple:
    try:
        n = int(limit) if limit is not None else 20
    except ValueError:
        raise InvalidRequest("`limit` must be an integer", param="limit") from None
    if not 1 <= n <= 100:
        raise InvalidRequest("`limit` must be between 1 and 100", param="limit")
    order = order or "desc"
    if order not in ("asc", "desc"):
        raise InvalidRequest("`order` must be 'asc' or 'desc'", param="order")
    return after, n, order
