"""What every rank does with a request, and the loop of the ranks that do not serve HTTP."""
from __future__ import annotations

import logging
from typing import Callable

import torch.distributed as dist

from engine.distributed import DistContext, agree, broadcast_message
from engine.generate import generate
from engine.pipeline import WanServePipeline
from engine.request import GenerationRequest, GenerationResult, JobCancelled, Shutdown
from kernels import shm_exchange

log = logging.getLogger("wanserve.engine")

Progress = Callable[[int, int], None]


def run_request(ctx: DistContext, pipe: WanServePipeline, request: GenerationRequest,
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
    result = generate(pipe, request, on_step,
                      decode=ctx.is_driver or getattr(pipe, "parallel_vae", False))
    return result if ctx.is_driver else None


def worker_loop(ctx: DistContext, pipe: WanServePipeline) -> None:
    """Ranks != 0: receive → stop if told → generate, until shutdown."""
    while True:
        message = broadcast_message(ctx)
        if isinstance(message, Shutdown):
            log.info("rank %d: shutdown (%s)", ctx.rank, message.reason)
            return
        try:
            run_request(ctx, pipe, message)
        except JobCancelled:
            log.info("rank %d: job %s cancelled", ctx.rank, message.job_id)
        except Exception as exc:  # rank 0 reports it; the ranks stay in step for the next job
            log.error("rank %d: job %s failed: %s", ctx.rank, message.job_id, exc)
        end_of_job(ctx)


def end_of_job(ctx: DistContext) -> None:
    """One sync point after every job that all ranks must reach. A rank that died or is
    stuck makes it raise (the step channel has a bounded timeout): the engine is broken."""
    agree(ctx, False)
    if shm_exchange.any_channel():
        # a job that failed on one rank may have left the ranks at different exchanges
        dist.barrier(group=ctx.step_group)  # every rank is past the job's last exchange
        shm_exchange.reset_all()
        dist.barrier(group=ctx.step_group)  # and nobody starts the next one before all reset
