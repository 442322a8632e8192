"""No storm wedges the engine: concurrent bad requests among good ones, clients that vanish
midway, and a job left in the queue past every timeout. One server for the module."""
from __future__ import annotations

import http.client
import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
import requests

from bad_requests import invalid_requests, multipart_form
from conftest import (assert_client_error, logged_steps, metric, png_bytes, rank_pids, raw_request,
                      start_server)
from resources import process_figures
from test_jobs_lifecycle import submit, wait_first_step, wait_status

CLIENT_TIMEOUT_S = 2
STEP_DELAY_S = 0.25
SMALL = {"size": "32x32", "num_frames": "5", "num_inference_steps": "1"}
STEPS = 'wanserve_step_seconds_count{replica="0"}'


@pytest.fixture(scope="module")
def storm_server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("storm"), "--max-queue", "32",
                       env={"WANSERVE_TEST_STEP_DELAY": str(STEP_DELAY_S)})
    yield srv
    code = srv.stop()
    assert code == 0, f"server exited with {code}:\n{srv.log()[-3000:]}"


def test_a_storm_of_bad_requests_among_good_ones_leaves_the_engine_as_idle(storm_server):
    """Every kind of bad request, twice each, sent 16 at a time among 8 good ones (6 async, 2
    synchronous): each bad one is a 4xx in the error shape, each good one completes. Then the
    engine is as an idle one: nothing queued or running, and a request sent afterwards starts
    at once and runs exactly its own steps (the engine's step counter and rank 0's step log;
    no clock compared).
    checked with: `replica.current_job = None` dropped from `_run_job`'s `finally`
    (wanserve/engine/serving/engine.py): /health named a finished job as running."""
    srv = storm_server
    warm = submit(srv, SMALL, prefer_async=False).json()
    assert warm["status"] == "completed"
    bad = invalid_requests() * 2
    good = [("async", True)] * 6 + [("sync", False)] * 2
    work = [("bad", case) for case in bad] + [("good", case) for case in good]
    random.Random(7).shuffle(work)
    steps_before = metric(srv, STEPS)

    def send(item):
        kind, case = item
        if kind == "good":
            return kind, case, submit(srv, {**SMALL, "seed": "5"}, prefer_async=case[1])
        what, method, target, headers, body = case
        return kind, case, raw_request(srv, method, target, headers, body)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(send, work))
    accepted = []
    for kind, case, answer in answers:
        if kind == "bad":
            status, _, body = answer
            assert_client_error(status, body, case[0])
        else:
            assert answer.status_code in (200, 202), answer.text[:300]
            accepted.append(answer.json()["id"])
    for job_id in accepted:
        assert wait_status(srv, job_id, ("completed", "failed", "cancelled"),
                           timeout=120)["status"] == "completed", job_id
    assert metric(srv, STEPS) == steps_before + len(good)  # 1 step each, no stray job ran

    health = requests.get(srv.url + "/health", timeout=5).json()
    assert health["status"] == "ok" and health["queue_depth"] == 0
    assert health["current_job"] is None and health["replicas"][0]["state"] == "idle"
    jobs_run = health["replicas"][0]["jobs_run"]
    probe = submit(srv, {**SMALL, "num_inference_steps": "3"}, prefer_async=False).json()
    assert probe["status"] == "completed" and probe["attempts"] == 1
    assert logged_steps(srv, probe["id"]) == [1, 2, 3]
    assert metric(srv, STEPS) == steps_before + len(good) + 3
    assert requests.get(srv.url + "/health", timeout=5).json()["replicas"][0]["jobs_run"] == \
        jobs_run + 1
    assert set(probe["stage_durations"]) == set(warm["stage_durations"])


def _settled_figures(pid: int, idle: dict, timeout: float = 20) -> dict:
    """Rank 0's figures once its descriptors and threads are back at `idle` (closing takes a
    moment), or at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        now = process_figures(pid)
        if (now["fds"] <= idle["fds"] and now["threads"] <= idle["threads"]) or \
                time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def _idle_figures(pid: int, seconds: float = 2.0) -> dict:
    """The fewest descriptors and threads rank 0 held over `seconds` of idling (a thread that
    answered the last request may still be on its way out)."""
    samples = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        samples.append(process_figures(pid))
        time.sleep(0.1)
    return {key: min(sample[key] for sample in samples) for key in ("fds", "threads")}


def _port(srv) -> int:
    return urlsplit(srv.url).port


def test_clients_that_vanish_midway_cost_nothing_that_lasts(storm_server):
    """Five clients drop mid-upload; while a synchronous caller's job runs, three drop its
    event stream after the first event and five drop a download after 100 bytes; then the
    caller drops too (its job is cancelled). Afterwards rank 0 holds the descriptors and
    threads it held idle, and the next job completes.
    checked with: `_resolve` not aborting the MP4 stream of a job that ended without a video
    (wanserve/api/serving.py): rank 0 kept one more thread (the stream's encoder)."""
    srv = storm_server
    pid = rank_pids(srv.proc.pid)[0]
    video = submit(srv, {"size": "128x128", "num_frames": "9", "num_inference_steps": "1"},
                   prefer_async=False).json()
    assert video["status"] == "completed"
    idle = _idle_figures(pid)

    upload = b"--b\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx\r\n"
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", _port(srv))) as s:
            s.sendall(b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data;"
                      b" boundary=b\r\nContent-Length: 1000000\r\n\r\n" + upload)
    headers, body = multipart_form({"prompt": "p", **SMALL, "num_inference_steps": "12"},
                          {"input_reference": ("r.png", png_bytes(), "image/png")})
    before = {job["id"] for job in requests.get(srv.url + "/v1/videos", timeout=5).json()["data"]}
    caller = http.client.HTTPConnection("127.0.0.1", _port(srv), timeout=30)
    caller.request("POST", "/v1/videos", body=body, headers=headers)
    running = _new_job(srv, before)
    wait_first_step(srv, running)
    for _ in range(3):
        conn = http.client.HTTPConnection("127.0.0.1", _port(srv), timeout=10)
        conn.request("GET", f"/v1/videos/{running}/events")
        events = conn.getresponse()
        assert events.status == 200 and events.readline().startswith(b"data: ")
        conn.close()
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", _port(srv))) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(f"GET /v1/videos/{video['id']}/content HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert s.recv(100)
    caller.close()
    job = wait_status(srv, running, ("cancelled",), timeout=30)
    assert job["error"]["code"] == "client_disconnected"
    after = _settled_figures(pid, idle)
    assert after["fds"] <= idle["fds"] and after["threads"] <= idle["threads"], (idle, after)
    assert submit(srv, SMALL, prefer_async=False).json()["status"] == "completed"


def _new_job(srv, before: set, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while not (new := [job["id"] for job in
                       requests.get(srv.url + "/v1/videos", timeout=5).json()["data"]
                       if job["id"] not in before]):
        assert time.monotonic() < deadline, "the job was never created"
        time.sleep(0.05)
    return new[0]


def test_a_job_queued_longer_than_its_clients_timeout_still_runs_when_polled_later(storm_server):
    """A job created async behind a long one; its client polls with a 1 s timeout, gives up
    after CLIENT_TIMEOUT_S and goes away. Polled again later, the job is still there, queued;
    once the job ahead is deleted it runs and completes. Nothing on the server gives up on a
    waiting job (`--job-timeout` counts a job's run, not its wait).
    checked with: a timer cancelling each job CLIENT_TIMEOUT_S after it was queued
    (`Engine.submit`, wanserve/engine/serving/engine.py; a poller that gives up): the job
    ahead was given up too, and the waiting one read `in_progress` (then `cancelled`), not
    `queued`."""
    srv = storm_server
    ahead = submit(srv, {**SMALL, "num_inference_steps": "50"}).json()["id"]
    wait_first_step(srv, ahead)
    waiting = submit(srv, SMALL).json()["id"]
    gave_up_at = time.monotonic() + CLIENT_TIMEOUT_S
    while time.monotonic() < gave_up_at:  # the client's own polling, until it gives up
        poll = requests.get(f"{srv.url}/v1/videos/{waiting}", timeout=1).json()
        assert poll["status"] == "queued", poll
        time.sleep(0.5)
    time.sleep(CLIENT_TIMEOUT_S)  # nobody polls
    assert requests.get(f"{srv.url}/v1/videos/{waiting}", timeout=5).json()["status"] == "queued"
    assert requests.delete(f"{srv.url}/v1/videos/{ahead}", timeout=5).json()["deleted"]
    job = wait_status(srv, waiting, ("completed", "failed", "cancelled"), timeout=60)
    assert job["status"] == "completed" and job["attempts"] == 1
