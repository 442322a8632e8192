"""Every process group the job creates gets `--collective-timeout`, xfuser's and yunchang's too.

Written for xfuser 0.7.0 and yunchang 0.6.4: both build their groups with
`torch.distributed.new_group(ranks, backend=...)` and no timeout, so torch (2.13) gives them its
default, 10 minutes on NCCL and 30 on gloo, whatever the job asked for. While they build their
parallel state, a `new_group` called without a timeout gets the job's.
"""
from __future__ import annotations

import contextlib
from datetime import timedelta

import torch.distributed as dist


@contextlib.contextmanager
def groups_created_with(timeout: timedelta):
    original = dist.new_group

    def new_group(*args, **kwargs):
        if len(args) < 2 and kwargs.get("timeout") is None:  # timeout is new_group's 2nd
            kwargs["timeout"] = timeout
        return original(*args, **kwargs)

    dist.new_group = new_group
    try:
        yield
    finally:
        dist.new_group = original
