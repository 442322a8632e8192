"""wanserve/engine/cpu/shm_exchange.py under torchrun: every exchange gives what gloo gives, over many
exchanges of changing sizes, dtypes and strides (both halves of each rank's file reused), with
three ranks (a middle rank has two neighbours); a hung peer ends a wait at the timeout and a dead
one at once, each with a clear error; ranks that do not share one /dev/shm (other hosts, or
containers with one each) get no channel, whatever their host names say.

The checks run as this file under torchrun; rank 0 prints the result as JSON.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run(nproc: int, mode: str) -> dict:
    from conftest import torchrun_script

    return torchrun_script(__file__, nproc, mode)


def test_exchanges_match_gloo():
    result = _run(3, "match")
    assert result["opened"] is True
    assert result["exchanges"] >= 150
    assert result["mismatches"] == [], result["mismatches"][:5]
    assert result["too_big_fits"] is False


def test_hung_and_dead_peers_end_the_wait_and_no_shared_dev_shm_means_gloo():
    """checked with (/dev/shm): `_sees_peers(...)` replaced by `True` in `open_channel`'s verdict
    (what the host-name comparison it made before gives on one host): a channel was opened."""
    result = _run(2, "faults")
    assert result["separate_dev_shm_channel"] is False
    assert "no answer" in result["hung_error"]
    assert 1.0 <= result["hung_after_s"] < 10
    assert "died" in result["dead_error"]
    assert result["dead_after_s"] < 10


def test_channels_shrink_to_what_dev_shm_has_room_for(monkeypatch):
    """Docker gives a container 64 MiB of /dev/shm: channels get smaller, not refused."""
    import types

    from wanserve.engine.cpu import shm_exchange

    def free(nbytes):
        monkeypatch.setattr(shm_exchange.os, "statvfs",
                            lambda path: types.SimpleNamespace(f_bavail=nbytes // 4096,
                                                               f_frsize=4096))

    free(24 << 30)
    assert shm_exchange._affordable(16 << 20, 2) == 16 << 20
    free(64 << 20)  # two ranks' files may fill half of it
    assert shm_exchange._affordable(16 << 20, 2) == 8 << 20
    assert shm_exchange._affordable(16 << 20, 4) == 4 << 20
    free(1 << 20)
    assert shm_exchange._affordable(16 << 20, 2) < shm_exchange.MIN_CAPACITY


def test_spinning_only_where_ranks_have_their_own_cores(monkeypatch):
    from wanserve.engine.cpu.shm_transport import ranks_have_own_cores

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert ranks_have_own_cores()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # U2C2 on two cores
    assert not ranks_have_own_cores()


def _match() -> dict:
    import torch
    import torch.distributed as dist

    from wanserve.engine.cpu import shm_exchange

    channel = shm_exchange.open_channel(dist.group.WORLD, capacity=1 << 16, timeout_s=60,
                                        spin=False)
    me, world = dist.get_rank(), dist.get_world_size()
    mismatches, count = [], 0

    def check(name, got, want):
        if want is None or got is None:
            if (want is None) != (got is None):
                mismatches.append(f"{name}: {got is None=} {want is None=}")
        elif got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
            mismatches.append(f"{name}: differs")

    generator = torch.Generator().manual_seed(100 + me)
    for round_ in range(30):
        dtype = (torch.float32, torch.bfloat16, torch.int64)[round_ % 3]
        rows = 3 * (1 + round_ % 4)  # sizes change from one exchange to the next
        x = (torch.randn(rows, 5, generator=generator) * 100).to(dtype)

        want = torch.empty_like(x)
        dist.all_to_all_single(want, x)
        check(f"all_to_all {round_}", channel.all_to_all(x), want)

        # strided views on both sides, as the Ulysses all-to-alls pass them
        y = (torch.randn(world, 4, 3, generator=generator) * 100).to(dtype)
        want = torch.empty(world, 3, 4, dtype=dtype)
        dist.all_to_all_single(want, y.transpose(1, 2).contiguous())
        into = torch.empty(3, world, 4, dtype=dtype).permute(1, 0, 2)
        channel.all_to_all_views(y.transpose(1, 2), into)
        check(f"all_to_all_views {round_}", into.contiguous(), want)

        gathered = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(gathered, x)
        check(f"all_gather {round_}", channel.all_gather(x.t()),
              torch.stack(gathered).transpose(1, 2))

        # halos of different widths each way, as a strided convolution has: 1 row up, 2 down
        posted = channel.post_neighbours(x[:1] if me > 0 else None,
                                         x[-2:] if me < world - 1 else None)
        everyone = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(everyone, x)
        prev, next_ = posted.wait(x[:2] if me > 0 else None, x[:1] if me < world - 1 else None)
        check(f"from previous {round_}", prev, everyone[me - 1][-2:] if me > 0 else None)
        check(f"from next {round_}", next_, everyone[me + 1][:1] if me < world - 1 else None)

        receive = channel.post_shift(x)
        check(f"shift {round_}", receive(), everyone[(me - 1) % world])
        count += 5
        if round_ == 14:  # what end_of_job does between jobs
            dist.barrier()
            channel.reset()
            dist.barrier()
    return {"opened": channel is not None, "exchanges": count, "mismatches": mismatches,
            "too_big_fits": channel.fits((1 << 16) + 1)}


def _faults() -> dict:
    import torch
    import torch.distributed as dist

    from wanserve.engine.cpu import shm_exchange

    # two "hosts" on this one: each rank's /dev/shm a folder of its own, one host name
    shared, shm_exchange.SHM_DIR = shm_exchange.SHM_DIR, tempfile.mkdtemp()
    separate = shm_exchange.open_channel(dist.group.WORLD, capacity=1 << 16, timeout_s=1.5)
    shm_exchange.SHM_DIR = shared
    channel = shm_exchange.open_channel(dist.group.WORLD, capacity=1 << 16, timeout_s=1.5,
                                        spin=False)
    if dist.get_rank() == 1:
        time.sleep(3.0)  # hung through rank 0's first exchange, then gone without a word
        os._exit(0)
    result = {"separate_dev_shm_channel": separate is not None}
    for name, timeout in (("hung", 1.5), ("dead", 60.0)):
        channel.timeout_s = timeout
        start = time.monotonic()
        try:
            channel.all_gather(torch.ones(4))
            result[f"{name}_error"] = "no error"
        except shm_exchange.ShmExchangeError as exc:
            result[f"{name}_error"] = str(exc)
        result[f"{name}_after_s"] = time.monotonic() - start
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    import torch.distributed as dist

    dist.init_process_group("gloo")
    out = _match() if sys.argv[1] == "match" else _faults()
    if dist.get_rank() == 0:
        print(json.dumps(out), flush=True)
    if sys.argv[1] == "match":
        dist.destroy_process_group()
    os._exit(0)
