"""What every rank does with a request, and the loop of the ranks that do not serve HTTP."""
from __future__ import annotations

import logging
from typing import Callable

from engine.assembly import ServedModel
from engine.distributed import DistContext, agree, broadcast_message
from engine.generate import generate
from engine.request import GenerationRequest, GenerationResult, JobCancelled, Shutdown

log = logging.getLogger("wanserve.engine")

Progress = Callable[[int, int], None]


def run_request(ctx: DistContext, model: ServedModel, request: GenerationRequest,
                progress: Progress | None = None,
                cancelled: Callable[[], bool] = lambda: False) -> GenerationResult | None:
    """Runs on every rank; returns the frames on rank 0, None elsewhere.

    After every step rank 0 reports progress and all ranks agree on `cancelled()` (rank 0's
    answer) in one tiny collective, so a cancel stops every rank at the same step.
    """

    def on_step(done: int, total: int) -> bool:
        if progress is not None:
            progress(done, total)
        return agree(ctx, cancelled() if ctx.is_driver else False)

    # a sharded VAE decodes on every rank together; otherwise only rank 0 needs the frames
    try:
        result = generate(model.pipe, request, on_step, decode=ctx.is_driver or model.vae_sharded)
    except JobCancelled as exc:  # at WARNING: the level every rank logs
        log.warning("rank %d: %s", ctx.rank, exc)
        raise
    return result if ctx.is_driver else None


def worker_loop(ctx: DistContext, model: ServedModel) -> None:
    """Ranks != 0: receive → stop if told → generate, until shutdown."""
    while True:
        message = broadcast_message(ctx)
        if isinstance(message, Shutdown):
            log.info("rank %d: shutdown (%s)", ctx.rank, message.reason)
            return
        try:
            run_request(ctx, model, message)
        except JobCancelled:
            pass  # run_request logged it
        except Exception as exc:  # rank 0 reports it; the ranks stay in step for the next job
            log.error("rank %d: job %s failed: %s", ctx.rank, message.job_id, exc)
        end_of_job(ctx, model)


def end_of_job(ctx: DistContext, model: ServedModel) -> None:
    """One sync point after every job that all ranks must reach. A rank that died or is
    stuck makes it raise (the step channel has a bounded timeout): the engine is broken."""
    agree(ctx, False)
    if model.after_job is not None:
        model.after_job()
