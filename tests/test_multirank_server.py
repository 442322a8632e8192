"""A 2-rank server (Ulysses 2) over real HTTP: requests, progress, cancellation, faults, stop."""
from __future__ import annotations

import base64
import os
import signal
import threading
import time

import pytest
import requests

from conftest import (CANCELLED, assert_stopped_after_cancel, logged_steps, metric, png_bytes,
                      job_after_a_restart, rank_pids, start_server)
from test_http_e2e import stream_info

SLOW = {"size": "256x256", "num_frames": "17", "num_inference_steps": "50"}


def post(server, fields, prefer_async=False, timeout=300):
    headers = {"Prefer": "respond-async"} if prefer_async else {}
    files = {"input_reference": ("ref.png", png_bytes(), "image/png")}
    return requests.post(server.url + "/v1/videos", data={"prompt": "p", "seed": "1", **fields},
                         files=files, headers=headers, timeout=timeout)


@pytest.fixture(scope="module")
def server2(tmp_path_factory):
    # steps paced (0.1 s each) so that a client polling the job sees its progress move
    # however loaded the machine is (unpaced, a loaded run saw only [0, 99])
    srv = start_server(tmp_path_factory.mktemp("server2"), "--ulysses", "2",
                       "--collective-timeout", "30", nproc=2,
                       env={"WANSERVE_TEST_STEP_DELAY": "0.1"})
    yield srv
    start = time.monotonic()
    code = srv.stop()
    assert code == 0, srv.log()[-3000:]
    assert time.monotonic() - start < 30, "SIGTERM did not stop every rank within 30 s"


def test_health_reports_the_parallel_layout(server2):
    """checked with (the load peaks): wanserve/engine/parallel/distributed.py `gather_to_all` returning [value]
    (only rank 0's)."""
    health = requests.get(server2.url + "/health", timeout=5).json()
    assert health["parallel"]["world_size"] == 2 and health["parallel"]["layout"] == "U2R1C1"
    assert health["parallel"]["transformer"] == "sequence-parallel"
    assert health["parallel"]["vae_encode"] == health["parallel"]["vae_decode"] \
        == "sharded over 2 ranks"
    assert health["parallel"]["exchanges"] == "gloo"
    assert health["cpu_tuning"]["shared_memory"] == "ulysses, sequence-parallel, vae"
    # every rank's own peak host memory while loading the model (the tiny one: a few hundred MiB)
    peaks = health["load"]["peak_memory_per_rank"]
    assert len(peaks) == 2 and all(100 < peak["host_mib"] < 4000 for peak in peaks), peaks


def test_three_sequential_requests_of_different_sizes(server2):
    for size, frames in (("128x128", "9"), ("144x112", "5"), ("96x160", "13")):
        resp = post(server2, {"size": size, "num_frames": frames})
        assert resp.status_code == 200, resp.text
        mp4 = base64.b64decode(resp.json()["data"][0]["b64_json"])
        width, height = map(int, size.split("x"))
        assert stream_info(mp4)[:3] == (int(frames), width, height)


def test_async_job_progress_increases_to_completion(server2):
    """checked with: progress reported every 4th step only (wanserve/engine/serving/worker.py on_step)."""
    resp = post(server2, {"num_inference_steps": "12", "size": "192x192"}, prefer_async=True)
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert job["status"] == "queued" and resp.headers["openai-poll-after-ms"]
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = requests.get(f"{server2.url}/v1/videos/{job['id']}", timeout=5).json()
        if job["status"] == "in_progress" and (not seen or job["progress"] != seen[-1]):
            seen.append(job["progress"])
        if job["status"] in ("completed", "failed"):
            break
        time.sleep(0.02)
    assert job["status"] == "completed" and job["progress"] == 100
    assert len(seen) >= 3 and seen == sorted(set(seen)), seen
    # polling can miss steps; rank 0's log has every step the server recorded
    assert logged_steps(server2, job["id"]) == list(range(1, 13))


def test_cancel_running_job_then_next_job_succeeds(server2):
    """checked with: Engine.cancel made a no-op (wanserve/engine/serving/engine.py)."""
    cancelled = metric(server2, CANCELLED)
    job = post(server2, SLOW, prefer_async=True).json()
    deadline = time.monotonic() + 60
    while not logged_steps(server2, job["id"]):
        assert time.monotonic() < deadline, "the job never ran a step"
        time.sleep(0.05)
    deleted = requests.delete(f"{server2.url}/v1/videos/{job['id']}", timeout=5).json()
    assert deleted == {"id": job["id"], "object": "video.deleted", "deleted": True}
    assert requests.get(f"{server2.url}/v1/videos/{job['id']}", timeout=5).status_code == 404
    assert_stopped_after_cancel(server2, job["id"], ranks=2, total=50)
    freed_by = time.monotonic() + 10
    while requests.get(server2.url + "/health", timeout=5).json()["current_job"] is not None:
        assert time.monotonic() < freed_by, "the engine did not stop the cancelled job"
        time.sleep(0.05)
    assert metric(server2, CANCELLED) == cancelled + 1
    resp = post(server2, {"size": "128x128"})
    assert resp.status_code == 200 and resp.json()["status"] == "completed"


def test_killed_rank_answers_the_caller_and_stops_the_server_with_the_reason(tmp_path):
    """The job is kept for a re-run (tests/test_restarts.py); a restart allowed one attempt fails
    it with the reason of the one it had.
    checked with: shared-memory waits that never notice a dead peer and never time out
    (wanserve/engine/cpu/shm_exchange.py ShmChannel._wait); `dead_peers` returning '' (the reason
    names no rank)."""
    data_dir = tmp_path / "data"
    srv = start_server(tmp_path, "--ulysses", "2", "--collective-timeout", "20", nproc=2,
                       data_dir=data_dir)
    try:
        result = {}
        caller = threading.Thread(target=lambda: result.update(resp=_try_post(srv)))
        caller.start()
        deadline = time.monotonic() + 60
        while not (listing := requests.get(srv.url + "/v1/videos", timeout=5).json()["data"]) \
                or not logged_steps(srv, listing[0]["id"]):
            assert time.monotonic() < deadline, "the job never ran a step"
            time.sleep(0.05)
        job_id = listing[0]["id"]
        # Stop rank 1 first: rank 0 then blocks in its next exchange with it, a shared-memory
        # one (a step's one gloo collective, the cancel flag, only sends from rank 0), and that
        # wait must notice the kill.
        rank1 = rank_pids(srv.proc.pid)[1]
        os.kill(rank1, signal.SIGSTOP)
        time.sleep(0.5)
        os.kill(rank1, signal.SIGKILL)
        killed_at = time.monotonic()
        caller.join(90)
        assert not caller.is_alive(), "the client was left waiting"
        resp = result["resp"]
        assert resp is None or resp.status_code == 503  # an error status or a closed connection
        if resp is not None:
            error = resp.json()["error"]
            assert error["code"] == "server_restarting" and job_id in error["message"], error
        srv.proc.wait(90)
        assert srv.proc.returncode != 0
        assert time.monotonic() - killed_at < 90
    finally:
        srv.stop()
    # the job's record says why its attempt ended, not merely that the server went away
    job = job_after_a_restart(tmp_path, data_dir, job_id, "--max-attempts", "1")
    assert job["status"] == "failed" and job["error"]["code"] == "attempts_exhausted", job
    assert "started 1 time(s)" in job["error"]["message"], job["error"]
    # named whichever channel noticed (a gloo send, a shared-memory wait)
    assert f"rank 1 (pid {rank1}) died" in job["error"]["message"], job["error"]


def _try_post(srv):
    try:
        return post(srv, SLOW, timeout=120)
    except requests.ConnectionError:
        return None
