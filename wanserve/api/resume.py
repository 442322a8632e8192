"""On start-up, the jobs the previous process left queued or running go back into the queue.

A job starts at most `server.max_attempts` times (`attempts` counts its starts). Before the
server answers its first request, the jobs that cannot run again (their attempts used up, their
inputs gone) fail with the reason, so no client ever reads them as queued. The others go back
into the queue in creation order once the engine is ready, before any new job: a job that was
running starts again from step 0 with its pinned seed, so its inputs give the same video. One
whose inputs are no longer valid on this server (its model's features, known once it loads)
fails then.
"""
from __future__ import annotations

import asyncio
import logging

from wanserve.api.errors import APIError
from wanserve.api.jobs import Job
from wanserve.api.serving import VideoService
from wanserve.engine.serving.engine import QueueFull
from wanserve.engine.serving.request import GenerationRequest

log = logging.getLogger("wanserve.api")

QUEUE_RETRY_S = 0.2


def settle_interrupted(service: VideoService) -> list[Job]:
    """Fails the interrupted jobs that cannot run again; returns the others, in creation order.
    Called before the server listens; new jobs wait until these are queued."""
    runnable = [job for job in service.store.interrupted if _can_run_again(service, job)]
    service.resuming = bool(runnable)
    return runnable


async def resume_interrupted(service: VideoService, jobs: list[Job]) -> None:
    if not jobs:
        return
    try:
        while service.engine.state == "loading":
            await asyncio.sleep(0.05)
        if service.engine.state != "ready":
            return  # they stay queued for the next start
        loop = asyncio.get_running_loop()
        for job in jobs:
            request = await loop.run_in_executor(None, _request_or_fail, service, job)
            if request is not None:
                await _submit(service, request)
                log.info("job %s queued again after a restart (attempt %d of at most %d)",
                         job.id, job.attempts + 1, service.cfg.max_attempts)
    finally:
        service.resuming = False


def _can_run_again(service: VideoService, job: Job) -> bool:
    limit = service.cfg.max_attempts
    if job.attempts >= limit:
        last = job.last_error or "the server was killed or lost before it said why"
        return _fail(service, job, "attempts_exhausted",
                     f"the job was started {job.attempts} time(s) without finishing "
                     f"(server.max_attempts is {limit}); the last attempt ended: {last}")
    if not service.store.inputs.has(job.id):
        return _fail(service, job, "inputs_lost", "the server restarted and this job's inputs "
                     "were not kept (a data dir written before inputs were stored?)")
    return True


def _request_or_fail(service: VideoService, job: Job) -> GenerationRequest | None:
    inputs = service.store.inputs.load(job.id)
    if inputs is None:  # unreadable since the start-up's check
        _fail(service, job, "inputs_lost", "the server restarted and this job's inputs could "
              "not be read back")
        return None
    fields, files = inputs
    try:
        return service.request_for(job.id, fields, files)[1]
    except APIError as exc:  # the configuration changed across the restart
        _fail(service, job, "invalid_after_restart",
              f"the job's inputs are not valid on this server since its restart: {exc.message}")
        return None


def _fail(service: VideoService, job: Job, code: str, message: str) -> bool:
    log.warning("job %s cannot run again: %s", job.id, message)
    service.on_failed(job.id, message, code)
    return False


async def _submit(service: VideoService, request: GenerationRequest) -> None:
    """Into the queue, waiting for room: more jobs may come back than it holds (the running
    one, or a smaller --max-queue than before)."""
    while True:
        try:
            service.engine.submit(request)
            return
        except QueueFull:
            await asyncio.sleep(QUEUE_RETRY_S)
