"""Data-parallel replicas (`--dp`): one shared queue, one job at a time per replica, the same
video from every replica, cancel and clean stop per replica. Real torchrun, gloo, real HTTP.

checked with (tests/README.md):
- every replica thread but replica 0's never started (`for replica in self.replicas[:1]` in
  Engine._start): the jobs never overlap, the second job waits for the first;
- RemoteReplica.run answers False to every poll: the job on replica 1 is not cancelled;
- the leader's replica broadcast sent from global rank 0 (`src=0` in broadcast_message): the
  DP2 × U2 server does not start (a hang caught by wait_ready's timeout).
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import requests

from conftest import (assert_client_error, cancelled_steps, logged_steps, metric, png_bytes,
                      start_server)
from test_http_e2e import decode_frames

# long enough that the second POST is parsed before the first job ends, on a loaded machine:
# the replicas' steps are paced too (PACED), so a replica that starts late still overlaps
REQUEST = {"prompt": "two lanterns on a lake", "seed": "23", "num_frames": "17",
           "num_inference_steps": "30", "quality": "lossless", "size": "64x64"}


PACED = {"WANSERVE_TEST_STEP_DELAY": "0.1"}  # 30 steps: 3 s a job at least (frames unchanged)


def submit(server, **fields) -> str:
    resp = requests.post(server.url + "/v1/videos", headers={"Prefer": "respond-async"},
                         data={**REQUEST, **fields}, timeout=60,
                         files={"input_reference": ("r.png", png_bytes(seed=3), "image/png")})
    assert resp.status_code == 202, resp.text
    return resp.json()["id"]


def wait_done(server, job_id: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = requests.get(f"{server.url}/v1/videos/{job_id}", timeout=10).json()
        if job["status"] in ("completed", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"{job_id} did not finish: {job}\n{server.log()[-3000:]}")


def frames_of(server, job_id: str) -> np.ndarray:
    return decode_frames(requests.get(f"{server.url}/v1/videos/{job_id}/content",
                                      timeout=30).content)


def busy_together(server, jobs: set[str], timeout: float = 120) -> dict:
    """Poll /health until the replicas run all of `jobs` at the same moment; that body."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = requests.get(server.url + "/health", timeout=10).json()
        if {r["current_job"] for r in body["replicas"]} == jobs:
            return body
        time.sleep(0.02)
    raise AssertionError(f"{jobs} never ran at the same time\n{server.log()[-3000:]}")


@pytest.fixture(scope="module")
def one_rank_video(server):
    """The reference: the same request on the single-rank server."""
    job_id = submit(server)
    assert wait_done(server, job_id)["status"] == "completed"
    return frames_of(server, job_id)


def check_two_jobs_at_once(srv, reference: np.ndarray, exact: bool) -> None:
    first, second = submit(srv), submit(srv)
    body = busy_together(srv, {first, second})
    assert [r["state"] for r in body["replicas"]] == ["busy", "busy"]
    videos = []
    for job_id in (first, second):
        assert wait_done(srv, job_id)["status"] == "completed"
        videos.append(frames_of(srv, job_id))
    assert np.array_equal(videos[0], videos[1]), "two replicas, two videos for one request"
    assert videos[0].shape == reference.shape == (17, 64, 64, 3)
    diff = np.abs(videos[0].astype(int) - reference.astype(int)).max()
    # one replica of one rank is the one-rank server; under U2 float sums may round a pixel
    assert diff == 0 if exact else diff <= 1, diff
    for replica in ("0", "1"):
        assert metric(srv, f'wanserve_replica_jobs_total{{replica="{replica}"}}') >= 1


def test_dp2_two_jobs_at_once_each_the_one_rank_video_cancel_and_stop(tmp_path, one_rank_video):
    """Replica 1's leader sends its frames in chunks of 5000 bytes (42 for 17 frames of 12288
    bytes, ending inside frames): its lossless video is still the one-rank video."""
    srv = start_server(tmp_path, "--dp", "2", nproc=2,
                       env={**PACED, "WANSERVE_TEST_FRAME_CHUNK_BYTES": "5000"})
    try:
        health = requests.get(srv.url + "/health", timeout=10).json()
        assert health["parallel"]["layout"] == "2xU1R1C1"
        assert [r["ranks"] for r in health["replicas"]] == [[0], [1]]
        check_two_jobs_at_once(srv, one_rank_video, exact=True)

        # a cancel reaches the replica that runs the job, within a step
        long = {"num_inference_steps": "50", "num_frames": "17"}
        first, second = submit(srv, **long), submit(srv, **long)
        body = busy_together(srv, {first, second})
        on_replica_1 = next(r["current_job"] for r in body["replicas"] if r["replica"] == 1)
        deadline = time.monotonic() + 60
        while not logged_steps(srv, on_replica_1) and time.monotonic() < deadline:
            time.sleep(0.02)
        cancelled_before = metric(srv, 'wanserve_jobs_total{status="cancelled"}')
        assert requests.delete(f"{srv.url}/v1/videos/{on_replica_1}", timeout=10).status_code == 200
        while 1 not in cancelled_steps(srv, on_replica_1):
            assert time.monotonic() < deadline, srv.log()[-3000:]
            time.sleep(0.05)
        step, last = cancelled_steps(srv, on_replica_1)[1], logged_steps(srv, on_replica_1)[-1]
        assert last <= step <= last + 1 and step < 45, (step, last)
        assert metric(srv, 'wanserve_jobs_total{status="cancelled"}') == cancelled_before + 1
        other = ({first, second} - {on_replica_1}).pop()
        assert wait_done(srv, other)["status"] == "completed"  # replica 0 went on
        missing = requests.get(f"{srv.url}/v1/videos/{on_replica_1}", timeout=10)
        assert_client_error(missing.status_code, missing.content, "cancelled job is deleted")
    finally:
        code = srv.stop()
    assert code == 0, srv.log()[-3000:]  # every rank, replica 1's leader too, exited 0


def test_dp2_u2_on_four_ranks_with_sharded_weights(tmp_path, one_rank_video):
    """--shard-weights: each replica is its own shard group (ranks 0-1 and 2-3), each rank
    holding about half of each expert; both replicas make the same video, the one-rank one.
    (U2 sharded equals U2 unsharded bit for bit: tests/test_sharded_weights.py.)
    checked with: the mesh's shard dimension spanning the replicas, `(1, dp * replica_size)`
    in wanserve/engine/parallel/sharding.py `replica_mesh`: each rank held a quarter (the two
    jobs, run in step, still made the right video)."""
    srv = start_server(tmp_path, "--dp", "2", "--ulysses", "2", "--shard-weights", nproc=4,
                       env=PACED)
    try:
        health = requests.get(srv.url + "/health", timeout=10).json()
        assert [r["ranks"] for r in health["replicas"]] == [[0, 1], [2, 3]]
        sharding = health["sharding"]
        assert len(sharding["param_bytes_per_rank"]) == 4
        # half of each expert: a shard group of the replica's two ranks, not of all four
        assert all(0.45 <= held / sharding["unsharded_bytes"] <= 0.55
                   for held in sharding["param_bytes_per_rank"]), sharding
        check_two_jobs_at_once(srv, one_rank_video, exact=False)
    finally:
        code = srv.stop()
    assert code == 0, srv.log()[-3000:]
