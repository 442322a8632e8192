"""Rank 0 and the leaders of the other replicas: jobs out, progress and videos back.

Rank 0 sends a job on the link's long-timeout channel (the leader may have waited for it for
days). While the job runs, the leader asks rank 0 whether to stop after every step (and before
every latent frame the VAE decodes), telling it the step it finished, and at the end sends the
outcome, then the frames, uint8, in bounded chunks (wanserve/engine/serving/frame_transfer.py),
all on the link's short-timeout channel, so a replica that dies or hangs is noticed within the
collective timeout. Inside its replica the leader does exactly what rank 0 does in replica 0
(wanserve/engine/serving/worker.py `run_request`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Callable

import numpy as np
import torch.distributed as dist

from wanserve.engine.adapters.lora import AdapterLoadError
from wanserve.engine.assembly import ServedModel
from wanserve.engine.parallel.distributed import (DistContext, ReplicaLink, broadcast_message,
                                exit_without_teardown, read_note)
from wanserve.engine.serving.frame_transfer import (FramesHeader, frames_header, receive_frames,
                                                     send_frames)
from wanserve.engine.serving.frames import FrameSink
from wanserve.engine.serving.request import GenerationRequest, GenerationResult, JobCancelled, Shutdown
from wanserve.engine.serving.worker import JobOutOfMemory, end_of_job, oom_note, run_request

log = logging.getLogger("wanserve.engine")


class ReplicaFailed(Exception):
    """The job failed on another replica. `fatal`: that replica's ranks are no longer in step
    (its leader exits, and the engine with it)."""

    def __init__(self, message: str, fatal: bool, code: str = "generation_failed"):
        super().__init__(message)
        self.fatal = fatal
        self.code = code


class ReplicaLost(Exception):
    """The link to another replica's leader broke or timed out: it died or hangs."""


@dataclass
class _Outcome:
    kind: str  # finished | cancelled | lora_failed | failed
    message: str = ""
    step: int = 0
    fatal: bool = False
    code: str = "generation_failed"
    result: dict | None = None  # GenerationResult's fields but the frames
    frames: FramesHeader | None = None  # the frames that follow it


def _send(group, obj, to: int) -> None:
    dist.send_object_list([obj], dst=to, group=group)


def _recv(group, src: int):
    box = [None]
    dist.recv_object_list(box, src=src, group=group)
    return box[0]


class RemoteReplica:
    """Rank 0's handle on one other replica."""

    def __init__(self, link: ReplicaLink):
        self.link = link

    def run(self, request: GenerationRequest, progress: Callable[[int, int], None],
            cancelled: Callable[[], bool], sink: FrameSink | None = None) -> GenerationResult:
        """The job on the replica; `sink` gets its frames as they arrive from the leader."""
        link = self.link
        try:
            _send(link.jobs, request, link.leader)
            while True:
                message = _recv(link.steps, link.leader)
                if isinstance(message, _Outcome):
                    return self._outcome(request, message, sink)
                done, total = message
                if done is not None:
                    progress(done, total)
                _send(link.steps, bool(cancelled()), link.leader)
        except RuntimeError as exc:  # gloo: the peer closed the connection, or the timeout
            raise ReplicaLost(f"replica {link.replica} (ranks {link.ranks[0]}-"
                              f"{link.ranks[-1]}) stopped answering: {exc}") from None

    def _outcome(self, request: GenerationRequest, outcome: _Outcome,
                 sink: FrameSink | None) -> GenerationResult:
        if outcome.kind == "cancelled":
            raise JobCancelled(request.job_id, outcome.step, request.num_inference_steps)
        if outcome.kind == "lora_failed":
            raise AdapterLoadError(outcome.message)
        if outcome.kind == "failed":
            raise ReplicaFailed(outcome.message, outcome.fatal, outcome.code)
        frames = receive_frames(outcome.frames, self.link.leader, self.link.steps, sink)
        return GenerationResult(frames=frames, **outcome.result)

    def shutdown(self, reason: str) -> None:
        _send(self.link.jobs, Shutdown(reason), self.link.leader)


def leader_loop(ctx: DistContext, model: ServedModel) -> None:
    """The leader of a replica other than replica 0: jobs from rank 0 until Shutdown."""
    link = ctx.links[0]
    while True:
        message = _recv(link.jobs, 0)
        broadcast_message(ctx, message)  # to the rest of this replica
        if isinstance(message, Shutdown):
            log.info("rank %d: shutdown (%s)", ctx.rank, message.reason)
            return
        outcome, frames = _run(ctx, model, link, message)
        if outcome.fatal:
            _send(link.steps, outcome, 0)
            _exit(ctx, message.job_id, outcome.message)
        try:
            end_of_job(ctx, model)
        except Exception as exc:
            _exit(ctx, message.job_id, f"a rank of replica {ctx.replica} did not reach the end "
                  f"of the job: {exc}")
        _send(link.steps, outcome, 0)
        if frames is not None:
            send_frames(frames, outcome.frames, 0, link.steps)


def _run(ctx: DistContext, model: ServedModel, link: ReplicaLink,
         request: GenerationRequest) -> tuple[_Outcome, np.ndarray | None]:
    finished: list = [None, None]  # the last step not yet told to rank 0

    def progress(done: int, total: int) -> None:
        finished[:] = [done, total]

    def cancelled() -> bool:
        _send(link.steps, tuple(finished), 0)
        finished[:] = [None, None]
        return _recv(link.steps, 0)

    try:
        result = run_request(ctx, model, request, progress, cancelled, as_uint8=True)
    except JobCancelled as exc:
        return _Outcome("cancelled", step=exc.step), None
    except AdapterLoadError as exc:  # every rank, before any collective of the job
        return _Outcome("lora_failed", str(exc)), None
    except Exception as exc:
        log.exception("rank %d: job %s failed", ctx.rank, request.job_id)
        # alone in its replica, the leader is still in step with itself
        fatal = ctx.replica_size > 1
        oom = str(exc) if isinstance(exc, JobOutOfMemory) else (
            read_note(oom_note(request.job_id)) if fatal else None)
        if oom:
            return _Outcome("failed", oom, fatal=fatal, code="out_of_memory"), None
        return _Outcome("failed", f"generation failed: {exc}", fatal=fatal), None
    rest = {f.name: getattr(result, f.name) for f in fields(result) if f.name != "frames"}
    return _Outcome("finished", result=rest, frames=frames_header(result.frames)), result.frames


def _exit(ctx: DistContext, job_id: str, why: str) -> None:
    log.error("rank %d: job %s: %s; this rank exits so that every rank restarts in a known "
              "state", ctx.rank, job_id, why)
    exit_without_teardown(1)
