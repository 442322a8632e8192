"""On a CPU host, run the stages that do not split across ranks once, on rank 0, with the cores
of every local rank.

With one thread per rank, a stage every rank repeats (the VAE encode of the condition video)
or only rank 0 runs (the VAE decode) leaves the other ranks' cores idle: the request then
takes as long as on one rank however many ranks there are. Here rank 0 borrows those cores
while the other ranks wait at the next collective, and shares what the encode produced.
On CUDA this is not used: the VAE is sharded across ranks instead (distvae over NCCL).
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from engine.distributed import DistContext

T = TypeVar("T")


class SoloStages:
    def __init__(self, ctx: DistContext):
        self.ctx = ctx
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
        self.threads = max(1, torch.get_num_threads()) * local_ranks

    @contextlib.contextmanager
    def all_local_cores(self):
        saved = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(saved)

    def once(self, compute: Callable[[], T]) -> T:
        """compute() on rank 0 with every local core; its result on every rank."""
        box = [None]
        if self.ctx.is_driver:
            with self.all_local_cores():
                box[0] = compute()
        dist.broadcast_object_list(box, src=0, group=self.ctx.step_group)
        return box[0]
