"""On start-up, the jobs the previous process left queued or running go back into the queue.

In creation order, once the engine is ready and before any new job. A job that was running starts
again from step 0 with its pinned seed, so its inputs give the same video. A job starts at most
`server.max_attempts` times (`attempts` counts its starts); one that used them up, or whose inputs
are gone or not valid on this server any more, fails with the reason.
"""
from __future__ import annotations

import asyncio
import logging

from api.errors import APIError
from api.jobs import Job
from api.serving import VideoService
from engine.engine import QueueFull
from engine.request import GenerationRequest

log = logging.getLogger("wanserve.api")

QUEUE_RETRY_S = 0.2


async def resume_interrupted(service: VideoService) -> None:
    jobs = service.store.interrupted
    if not jobs:
        return
    service.resuming = True  # new jobs wait: these were submitted before them
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


def _request_or_fail(service: VideoService, job: Job) -> GenerationRequest | None:
    limit = service.cfg.max_attempts
    if job.attempts >= limit:
        last = job.last_error or "the server was killed or lost before it said why"
        return _fail(service, job, "attempts_exhausted",
                     f"the job was started {job.attempts} time(s) without finishing "
                     f"(server.max_attempts is {limit}); the last attempt ended: {last}")
    inputs = service.store.inputs.load(job.id)
    if inputs is None:
        return _fail(service, job, "inputs_lost", "the server restarted and this job's inputs "
                     "were not kept (a data dir written before inputs were stored?)")
    fields, files = inputs
    try:
        return service.request_for(job.id, fields, files)[1]
    except APIError as exc:  # the configuration changed across the restart
        return _fail(service, job, "invalid_after_restart",
                     f"the job's inputs are not valid on this server since its restart: "
                     f"{exc.message}")


def _fail(service: VideoService, job: Job, code: str, message: str) -> None:
    log.warning("job %s cannot run again: %s", job.id, message)
    service.on_failed(job.id, message, code)
    return None


async def _submit(service: VideoService, request: GenerationRequest) -> None:
    """Into the queue, waiting for room: more jobs may come back than it holds (the running
    one, or a smaller --max-queue than before)."""
    while True:
        try:
            service.engine.submit(request)
            return
        except QueueFull:
            await asyncio.sleep(QUEUE_RETRY_S)
