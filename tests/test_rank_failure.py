"""A job that fails on one rank only, and a stop during a long VAE decode, on a 2-rank server
(Ulysses 2, the VAE sharded over both ranks).

- A failure injected on one rank after a chosen step (WANSERVE_TEST_FAIL_AT, as an
  out-of-memory on one GPU would) ends the job's attempt with its reason within seconds, not at
  the collective timeout, and every rank exits non-zero so that the job restarts in a known
  state, kept for the restart; a restart allowed one attempt fails the job with the reason
  (`attempts_exhausted`).
  Checked with: the old worker loop (a failed rank carries on to the end-of-job sync): the
  ranks are out of step and the job hangs until the 120 s timeout; and (attempts) `_request_or_fail`
  comparing `job.attempts > limit` (wanserve/api/resume.py): the job ran again; the check made
  once the engine is ready (its first answer said `queued`).
- SIGTERM while the VAE decodes stops every rank well before the decode would have finished:
  the decode checks for a stop before each latent frame; the job waits, queued, for the restart.
  Checked with: the decode's per-frame check removed (the stop waits for the whole decode).
- SIGTERM while a rank hangs (SIGSTOP) mid-job: rank 0's engine thread never reaches a stopping
  point, so after `--stop-timeout` it gives the job back and exits without waiting for it; the
  launcher and every rank are gone within a bound, not at the collective timeout.
  Checked with: `serve` waiting for the thread (no exit before the 120 s timeout).
"""
from __future__ import annotations

import os
import signal
import time

import pytest
import requests

from conftest import job_after_a_restart, rank_pids, start_server
from test_jobs_lifecycle import submit, wait_status

TIMEOUT_S = "120"
SHORT = {"size": "64x64", "num_frames": "5", "num_inference_steps": "6"}
# few steps, many frames: most of the job is the decode (13 latent frames)
LONG_DECODE = {"size": "320x320", "num_frames": "49", "num_inference_steps": "2", "seed": "5"}


STOP_TIMEOUT_S = 5  # rank 0's wait for the running job's next step (default 25)


def _server(tmp_path, data_dir, env=None):
    return start_server(tmp_path, "--ulysses", "2", "--collective-timeout", TIMEOUT_S,
                        "--stop-timeout", str(STOP_TIMEOUT_S), nproc=2, data_dir=data_dir,
                        env=env)


@pytest.mark.parametrize("failing_rank", [1, 0])
def test_a_job_failing_on_one_rank_fails_within_seconds(tmp_path, failing_rank):
    data_dir = tmp_path / "data"
    srv = _server(tmp_path, data_dir, env={"WANSERVE_TEST_FAIL_AT": f"{failing_rank}:2"})
    ranks = rank_pids(srv.proc.pid)
    start = time.monotonic()
    job = submit(srv, SHORT).json()
    srv.proc.wait(60)  # every rank gone: the job restarts in a known state
    assert time.monotonic() - start < 30
    assert srv.proc.returncode != 0
    assert not any(_alive(pid) for pid in ranks.values())
    if failing_rank == 1:  # rank 0 sees its peer go; the job waits for the restart
        _assert_kept_for_the_restart(data_dir, job["id"])
        return
    failed = job_after_a_restart(tmp_path, data_dir, job["id"], "--max-attempts", "1")
    assert failed["status"] == "failed", failed
    assert failed["error"]["code"] == "attempts_exhausted", failed
    assert "started 1 time(s)" in failed["error"]["message"], failed
    assert "injected failure on rank 0 after step 2" in failed["error"]["message"]


def test_sigterm_during_a_long_decode_stops_every_rank(tmp_path):
    data_dir = tmp_path / "data"
    srv = _server(tmp_path, data_dir)
    try:
        done = submit(srv, LONG_DECODE, prefer_async=False).json()
        decode_s = done["timings"]["vae_decode"]
        job = submit(srv, LONG_DECODE).json()
        # progress reaches 99 with the last step: what is left is the decode
        deadline = time.monotonic() + 120
        while requests.get(f"{srv.url}/v1/videos/{job['id']}", timeout=5).json()["progress"] < 99:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    except BaseException:
        srv.stop()
        raise
    start = time.monotonic()
    assert srv.stop() == 0
    stop_s = time.monotonic() - start
    assert stop_s < 0.5 * decode_s, (stop_s, decode_s)
    _assert_kept_for_the_restart(data_dir, job["id"])


def test_sigterm_with_a_hung_rank_still_stops_within_a_bound(tmp_path):
    data_dir = tmp_path / "data"
    srv = _server(tmp_path, data_dir)
    ranks = rank_pids(srv.proc.pid)
    try:
        job = submit(srv, {**SHORT, "num_inference_steps": "50", "size": "256x256"}).json()
        wait_status(srv, job["id"], ("in_progress",))
        os.kill(ranks[1], signal.SIGSTOP)
        start = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        # rank 0 gives the job 5 s, the other rank exits 15 s after that; the collective
        # timeout is 120 s
        srv.proc.wait(60)
        assert time.monotonic() - start < 60
    finally:
        for pid in ranks.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        srv.stop()
    _assert_kept_for_the_restart(data_dir, job["id"])


def _assert_kept_for_the_restart(data_dir, job_id: str) -> None:
    """The job store, opened as the next start opens it, gives the job back to run again, its
    inputs kept (test_restarts.py runs such jobs after real restarts)."""
    from wanserve.api.jobs import JobStore

    store = JobStore(data_dir, ttl_s=60)
    try:
        assert [job.id for job in store.interrupted] == [job_id]
        assert store.get(job_id).error_code is None
        assert store.inputs.load(job_id) is not None
    finally:
        store.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
