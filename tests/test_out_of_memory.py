"""An out-of-memory that happens anyway fails its job, not the server.

WANSERVE_TEST_OOM_AT ("RANK:STEP") makes that rank raise a real `torch.OutOfMemoryError` right
after that denoising step of every job that reaches it; a job with fewer steps never does.
"""
from __future__ import annotations

import pytest
import requests

from conftest import start_server
from test_jobs_lifecycle import submit, wait_status
from test_restarts import _poll_across_restarts

SMALL = {"size": "64x64", "num_frames": "5", "seed": "3"}
OOM_STEP = 2
RUNS_OUT = {**SMALL, "num_inference_steps": str(OOM_STEP + 1), "prompt": "too big"}
FITS = {**SMALL, "num_inference_steps": str(OOM_STEP - 1)}


def _assert_failed_naming_memory(job: dict, rank: int) -> None:
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "out_of_memory", job
    message = job["error"]["message"]
    assert f"out of memory on rank {rank} after step {OOM_STEP} of {OOM_STEP + 1}" in message, job
    assert "injected out-of-memory" in message, job
    # what was asked stays with the failed job, as with any failure
    assert (job["prompt"], job["size"], job["seed"]) == ("too big", "64x64", 3), job


def test_one_rank_fails_the_job_and_serves_the_next(tmp_path):
    """One rank: the job that runs out of memory fails with `out_of_memory`, and the same
    engine (no restart) runs the next job to completion.
    Checked with: `_out_of_memory` returning None (wanserve/engine/serving/engine.py)."""
    srv = start_server(tmp_path, env={"WANSERVE_TEST_OOM_AT": f"0:{OOM_STEP}"})
    try:
        pid = srv.proc.pid
        failed = submit(srv, RUNS_OUT).json()
        _assert_failed_naming_memory(wait_status(srv, failed["id"], ("failed", "completed")), 0)
        done = submit(srv, FITS, prefer_async=False)
        assert done.status_code == 200, done.text[:300]
        health = requests.get(srv.url + "/health", timeout=5).json()
        assert health["status"] == "ok" and srv.proc.poll() is None and srv.proc.pid == pid
    finally:
        assert srv.stop() == 0


@pytest.mark.parametrize("failing_rank", [1, 0])
def test_u2_fails_the_job_restarts_and_loses_nothing_else(tmp_path, failing_rank):
    """Ulysses 2: the other rank may be inside a collective of the job, so its state is not
    known; the job fails with `out_of_memory` (rank 1 leaves its reason in the rendezvous
    store before it exits), every rank restarts (`--max-restarts`), and the job queued behind
    it runs after the restart.
    Checked with: `post_note` not called in `worker_loop` (wanserve/engine/serving/worker.py):
    the job was kept for the restart (`engine_failure`), ran out of memory again, and the
    launcher exited once its one restart was used."""
    srv = start_server(tmp_path, "--ulysses", "2", "--max-restarts", "1",
                       "--collective-timeout", "60", nproc=2,
                       env={"WANSERVE_TEST_OOM_AT": f"{failing_rank}:{OOM_STEP}",
                            "WANSERVE_TEST_STEP_DELAY": "0.5"})
    try:
        failed = submit(srv, RUNS_OUT).json()
        queued = submit(srv, FITS).json()
        job = _poll_across_restarts([srv], failed["id"], timeout=120)
        _assert_failed_naming_memory(job, failing_rank)
        assert job["attempts"] == 1, job
        after = _poll_across_restarts([srv], queued["id"], timeout=240)
        assert after["status"] == "completed", after
        assert "queued again after a restart" in srv.log()
    finally:
        assert srv.stop() == 0
