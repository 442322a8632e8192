"""What every rank does with a request, and the loop of the ranks that do not serve HTTP."""
from __future__ import annotations

import gc
import logging
import os
import time
from typing import Callable

import torch

from wanserve.engine.adapters.lora import AdapterLoadError
from wanserve.engine.assembly import ServedModel
from wanserve.engine.parallel.distributed import (DistContext, agree, broadcast_message,
                                                  exit_without_teardown, post_note)
from wanserve.engine.serving.frames import FrameSink
from wanserve.engine.serving.generate import generate
from wanserve.engine.serving.request import GenerationRequest, GenerationResult, JobCancelled, Shutdown

log = logging.getLogger("wanserve.engine")

Progress = Callable[[int, int], None]


class JobOutOfMemory(RuntimeError):
    """The device (or host) ran out of memory on this rank during the job; the job fails with
    `out_of_memory`. The memory the job held is freed before this is raised."""


def oom_note(job_id: str) -> str:
    """Where a rank that ran out of memory leaves its reason for rank 0 before it exits."""
    return f"oom/{job_id}"

# Test-only: "RANK:STEP" makes that rank's job fail right after that denoising step
# (tests/test_rank_failure.py), as an out-of-memory on one GPU would.
_FAIL_AT = os.environ.get("WANSERVE_TEST_FAIL_AT")
# Test-only: "RANK:STEP" makes that rank raise torch.OutOfMemoryError right after that step.
_OOM_AT = os.environ.get("WANSERVE_TEST_OOM_AT")
# Test-only: seconds every rank sleeps after each denoising step, so that a test's job is
# surely still running when it acts on it, without burning the CPU the other ranks need.
_STEP_DELAY_S = float(os.environ.get("WANSERVE_TEST_STEP_DELAY", "0"))
# Test-only: seconds the leader sleeps after handing each decoded chunk to the sink, so that a
# test can read a streamed video while it is decoded.
_DECODE_DELAY_S = float(os.environ.get("WANSERVE_TEST_DECODE_DELAY", "0"))


class _PacedSink:
    def __init__(self, sink: FrameSink):
        self._sink = sink

    def put(self, frames) -> None:
        self._sink.put(frames)
        time.sleep(_DECODE_DELAY_S)


def run_request(ctx: DistContext, model: ServedModel, request: GenerationRequest,
                progress: Progress | None = None,
                cancelled: Callable[[], bool] = lambda: False,
                sink: FrameSink | None = None,
                as_uint8: bool = False) -> GenerationResult | None:
    """Runs on every rank of a replica; returns the frames on its leader, None elsewhere
    (and hands them to `sink` there as the VAE decodes them): uint8 with `as_uint8` (what the
    server's MP4 encoder takes), else float32 in [0, 1] (the offline runner's, compared across
    layouts).

    After every step the leader reports progress and all ranks agree on `cancelled()` (the
    leader's answer) in one tiny collective, so a cancel stops every rank at the same step. The
    VAE decode checks again before each latent frame: with a sharded VAE all ranks agree, with
    the VAE on the leader alone it decides by itself.
    """

    def agreed() -> bool:
        return agree(ctx, cancelled() if ctx.is_leader else False)

    steps_done = [0]

    def on_step(done: int, total: int) -> bool:
        steps_done[0] = done
        if _FAIL_AT == f"{ctx.rank}:{done}":
            raise RuntimeError(f"injected failure on rank {ctx.rank} after step {done}")
        if _OOM_AT == f"{ctx.rank}:{done}":
            raise torch.OutOfMemoryError(f"injected out-of-memory on rank {ctx.rank}")
        if _STEP_DELAY_S:
            time.sleep(_STEP_DELAY_S)
        if progress is not None:
            progress(done, total)
        return agreed()

    if sink is not None and _DECODE_DELAY_S:
        sink = _PacedSink(sink)
    # a sharded VAE decodes on every rank together; only rank 0 needs the frames
    try:
        result = generate(model.pipe, request, on_step, decode=ctx.is_leader or model.vae_sharded,
                          frames=ctx.is_leader,
                          decode_cancelled=agreed if model.vae_sharded else cancelled,
                          adapters=model.adapters, sink=sink if ctx.is_leader else None,
                          step_cache=model.step_cache, as_uint8=as_uint8)
    except JobCancelled as exc:  # at WARNING: the level every rank logs
        log.warning("rank %d: %s", ctx.rank, exc)
        raise
    except torch.OutOfMemoryError as exc:
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "no detail"
        reason = (f"out of memory on rank {ctx.rank} after step {steps_done[0]} of "
                  f"{request.num_inference_steps}: {detail}")
    else:
        return result if ctx.is_leader else None
    # outside the handler, whose traceback held the job's tensors
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    log.error("rank %d: job %s: %s", ctx.rank, request.job_id, reason)
    raise JobOutOfMemory(reason)


def worker_loop(ctx: DistContext, model: ServedModel) -> None:
    """The ranks of a replica other than its leader: receive → stop if told → generate, until
    shutdown.

    A job that fails on this rank ends the process: the other ranks may be waiting for it in a
    collective of that job, and on NCCL there is no putting them back in step. They notice at
    once that it is gone (rank 0 fails the job and stops the server; torchrun restarts the job
    or the operator does) instead of waiting out the collective timeout."""
    while True:
        message = broadcast_message(ctx)
        if isinstance(message, Shutdown):
            log.info("rank %d: shutdown (%s)", ctx.rank, message.reason)
            return
        try:
            run_request(ctx, model, message)
        except JobCancelled:
            pass  # run_request logged it
        except AdapterLoadError as exc:  # every rank, before any collective of the job
            log.warning("rank %d: job %s: %s", ctx.rank, message.job_id, exc)
        except Exception as exc:
            if isinstance(exc, JobOutOfMemory):  # rank 0 fails the job with this reason
                post_note(oom_note(message.job_id), str(exc))
            log.error("rank %d: job %s failed: %s; this rank exits so that every rank restarts "
                      "in a known state", ctx.rank, message.job_id, exc)
            exit_without_teardown(1)
        end_of_job(ctx, model)


def end_of_job(ctx: DistContext, model: ServedModel) -> None:
    """One sync point after every job that all ranks must reach. A rank that died or is
    stuck makes it raise (the step channel has a bounded timeout): the engine is broken."""
    agree(ctx, False)
    if model.compiled is not None:
        model.compiled.refresh()
    if model.after_job is not None:
        model.after_job()
