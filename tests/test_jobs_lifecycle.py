"""Admission control, expiry and abandoned synchronous calls (restarts: test_restarts.py)."""
from __future__ import annotations

import http.client
import time
from urllib.parse import urlsplit

import requests

from conftest import (CANCELLED, assert_stopped_after_cancel, logged_steps, metric, png_bytes,
                      start_server)

SLOW = {"size": "256x256", "num_frames": "17", "num_inference_steps": "50"}
QUICK = {"size": "64x64", "num_frames": "5", "num_inference_steps": "2"}


def submit(srv, fields, prefer_async=True, timeout=300):
    return requests.post(srv.url + "/v1/videos", data={"prompt": "p", **fields},
                         files={"input_reference": ("r.png", png_bytes(), "image/png")},
                         headers={"Prefer": "respond-async"} if prefer_async else {},
                         timeout=timeout)


def wait_first_step(srv, job_id, timeout=60):
    deadline = time.monotonic() + timeout
    while not logged_steps(srv, job_id):
        assert time.monotonic() < deadline, f"{job_id} never ran a step"
        time.sleep(0.05)


def wait_status(srv, job_id, wanted, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = requests.get(f"{srv.url}/v1/videos/{job_id}", timeout=5).json()
        if job.get("status") in wanted:
            return job
        time.sleep(0.05)
    raise AssertionError(f"{job_id} never reached {wanted}: {job}")


def test_full_queue_answers_429_then_recovers(tmp_path):
    """checked with: Engine.cancel made a no-op (wanserve/engine/serving/engine.py)."""
    srv = start_server(tmp_path, "--max-queue", "1")
    try:
        running = submit(srv, SLOW).json()
        wait_first_step(srv, running["id"])
        queued = submit(srv, QUICK)
        assert queued.status_code == 202
        refused = submit(srv, QUICK)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
        assert refused.json()["error"]["code"] == "queue_full"
        deleted = requests.delete(f"{srv.url}/v1/videos/{running['id']}", timeout=5).json()
        assert deleted["deleted"] is True
        # recovers: the engine dropped the cancelled job and went on to the queued one
        assert_stopped_after_cancel(srv, running["id"], ranks=1, total=50)
        assert wait_status(srv, queued.json()["id"], ("completed",))["progress"] == 100
        assert metric(srv, CANCELLED) == 1
        assert metric(srv, "wanserve_rejected_total") == 1
    finally:
        assert srv.stop() == 0


def test_completed_videos_expire_after_the_ttl(tmp_path):
    srv = start_server(tmp_path, "--video-ttl", "2")
    try:
        job = submit(srv, QUICK, prefer_async=False).json()
        assert job["expires_at"] - job["completed_at"] == 2
        deadline = time.monotonic() + 15
        while requests.get(f"{srv.url}/v1/videos/{job['id']}", timeout=5).status_code != 404:
            assert time.monotonic() < deadline, "the video never expired"
            time.sleep(0.25)
        assert not list((srv.data_dir / "videos").glob("*.mp4"))
    finally:
        assert srv.stop() == 0


def test_a_disconnected_synchronous_caller_cancels_its_job(server):
    """checked with: Engine.cancel made a no-op (wanserve/engine/serving/engine.py)."""
    srv = server  # shared: other tests' jobs are listed too
    before = {job["id"] for job in requests.get(srv.url + "/v1/videos", timeout=5).json()["data"]}
    cancelled = metric(srv, CANCELLED)
    # a connection of our own, closed once the job runs (a client timeout could fire before
    # the job starts or after it ends)
    request = requests.Request(
        "POST", srv.url + "/v1/videos", data={"prompt": "p", **SLOW},
        files={"input_reference": ("r.png", png_bytes(), "image/png")}).prepare()
    url = urlsplit(srv.url)
    caller = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    caller.request("POST", "/v1/videos", body=request.body, headers=dict(request.headers))
    deadline = time.monotonic() + 30
    while not (new := [job["id"] for job in
                       requests.get(srv.url + "/v1/videos", timeout=5).json()["data"]
                       if job["id"] not in before]):
        assert time.monotonic() < deadline, "the job was never created"
        time.sleep(0.05)
    (job_id,) = new
    wait_first_step(srv, job_id)
    caller.close()  # the caller goes away while its job runs
    job = wait_status(srv, job_id, ("cancelled",), timeout=15)
    assert job["error"]["code"] == "client_disconnected"
    assert_stopped_after_cancel(srv, job_id, ranks=1, total=50)
    deadline = time.monotonic() + 10
    while requests.get(srv.url + "/health", timeout=5).json()["current_job"] is not None:
        assert time.monotonic() < deadline, "the engine kept running the abandoned job"
        time.sleep(0.05)
    assert metric(srv, CANCELLED) == cancelled + 1
    assert submit(srv, QUICK, prefer_async=False).json()["status"] == "completed"


def test_a_job_over_the_time_limit_fails_and_frees_the_engine(tmp_path):
    # 0.2 s a step: the 50-step job surely outlives the limit, and QUICK's 2 steps fit inside
    # it with room for a machine several times slower than usual (at 3 s, a run sharing the
    # two cores with other workloads saw QUICK itself time out)
    srv = start_server(tmp_path, "--job-timeout", "8",
                       env={"WANSERVE_TEST_STEP_DELAY": "0.2"})
    try:
        job = submit(srv, {**QUICK, "num_inference_steps": "50"}).json()
        failed = wait_status(srv, job["id"], ("failed",), timeout=30)
        assert failed["error"]["code"] == "job_timeout" and "time limit" in failed["error"]["message"]
        after = submit(srv, QUICK, prefer_async=False).json()
        assert after.get("status") == "completed", after
    finally:
        assert srv.stop() == 0


def test_a_queued_job_that_is_deleted_never_reaches_a_rank(server):
    """DELETE of a job queued behind a running one: the engine drops it when it pops it. Seen
    from what the engine did, not from the job row (a deleted job's row is gone, and updates to
    it are dropped): the replica started one job, not two, and counted one cancel.
    checked with: `cancel_or_delete` cancelling in the engine only jobs already `in_progress`
    (wanserve/api/serving.py): replica 0 started 2 jobs."""
    srv = server  # shared: read the counters as differences
    health = requests.get(srv.url + "/health", timeout=5).json()
    started = metric(srv, 'wanserve_replica_jobs_total{replica="0"}')
    jobs_run = health["replicas"][0]["jobs_run"]
    cancelled = metric(srv, CANCELLED)
    running = submit(srv, SLOW).json()
    wait_first_step(srv, running["id"])
    queued = submit(srv, QUICK).json()
    assert requests.get(f"{srv.url}/v1/videos/{queued['id']}", timeout=5).json()["status"] == "queued"
    assert requests.delete(f"{srv.url}/v1/videos/{queued['id']}", timeout=5).json()["deleted"]
    assert requests.delete(f"{srv.url}/v1/videos/{running['id']}", timeout=5).json()["deleted"]
    # both cancels counted: the running job's at its next step, the queued one's when popped
    deadline = time.monotonic() + 60
    while metric(srv, CANCELLED) < cancelled + 2:
        assert time.monotonic() < deadline, (
            f"the engine counted {metric(srv, CANCELLED) - cancelled} cancels, not 2")
        time.sleep(0.05)
    health = requests.get(srv.url + "/health", timeout=5).json()
    assert health["queue_depth"] == 0 and health["current_job"] is None
    assert metric(srv, 'wanserve_replica_jobs_total{replica="0"}') == started + 1
    assert health["replicas"][0]["jobs_run"] == jobs_run + 1
    assert not logged_steps(srv, queued["id"])
