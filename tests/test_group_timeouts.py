"""Every process group of a job has the configured `--collective-timeout`: the world, the step
channel, and the groups xfuser and yunchang create for Ulysses, ring and CFG parallelism (which
would otherwise get torch's 30-minute gloo / 10-minute NCCL default). Only the channels on which
idle ranks wait (the next request, the ready barrier, a replica leader's next job) have a long one.

Runs as this file under torchrun (two replicas of U2 on 4 ranks); rank 0 prints what it found.
Checked with: `init_distributed` without `groups_created_with` (xfuser's groups report 30 min).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 17.0


def test_every_group_has_the_collective_timeout():
    from conftest import torchrun_script

    found = torchrun_script(__file__, 4)
    assert found["groups"] > 8  # world, xfuser's coordinators (device + cpu), yunchang's, ours
    assert found["control"] == 30 * 24 * 3600
    assert found["others"] == [TIMEOUT_S]


def _timeouts() -> dict:
    import torch
    import torch.distributed as dist

    from wanserve.engine.parallel.distributed import init_distributed
    from wanserve.engine.parallel.layout import ParallelLayout

    # two replicas of U2: rank 0 also holds the link to replica 1's leader
    ctx = init_distributed(ParallelLayout(ulysses=2, dp=2), TIMEOUT_S)
    seconds = {}
    for group in dist.distributed_c10d._world.pg_map:
        backend = group._get_backend(torch.device("cpu"))
        seconds[group] = backend.options._timeout.total_seconds()
    waits = [ctx.control_group, ctx.world_control, *(link.jobs for link in ctx.links)]
    control = sorted({seconds.pop(group) for group in waits})
    assert len(control) == 1, control
    return {"groups": len(seconds) + len(waits), "control": control[0],
            "others": sorted(set(seconds.values()))}


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    result = _timeouts()
    if int(os.environ["RANK"]) == 0:
        print(json.dumps(result), flush=True)
    os._exit(0)
