"""GET /v1/videos/{id}/events: server-sent events of a job's steps, then its end."""
from __future__ import annotations

import json
import time

import requests

from test_jobs_lifecycle import submit, wait_status

# steps of a fraction of a second each: long enough to queue or cancel behind, short enough
# that a cancelled job stops at once
MEDIUM = {"size": "128x128", "num_frames": "9", "num_inference_steps": "30"}


def data_lines(resp, deadline: float):
    """The stream's events; fails once past `deadline` (keep-alive comments come every 15 s,
    so a stream that never ends is noticed then)."""
    for line in resp.iter_lines():
        assert time.monotonic() < deadline, "the event stream did not end"
        if line.startswith(b"data:"):
            yield json.loads(line[5:])


def events(server, video_id: str, timeout: float = 300) -> list[dict]:
    """Every event of the stream, read until the server closes it."""
    with requests.get(f"{server.url}/v1/videos/{video_id}/events", stream=True,
                      timeout=timeout) as resp:
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith("text/event-stream")
        return list(data_lines(resp, time.monotonic() + timeout))


def test_every_step_in_order_then_the_final_event(server):
    """A job queued behind another one: its stream shows it queued, each of its steps, then
    completed, and ends.
    checked with: `"step": done - 1` in VideoService.on_progress (steps 0..5, not 1..6)."""
    blocker = submit(server, {**MEDIUM, "num_inference_steps": "8"}).json()
    job = submit(server, {"size": "64x64", "num_frames": "5", "num_inference_steps": "6"}).json()
    seen = events(server, job["id"])
    assert seen[0]["status"] == "queued" and seen[0]["step"] == 0
    steps = [(e["status"], e["step"], e["total_steps"]) for e in seen[1:-1]]
    assert steps == [("in_progress", s, 6) for s in range(1, 7)], seen
    assert [e["progress"] for e in seen[1:-1]] == sorted(e["progress"] for e in seen[1:-1])
    assert seen[-1] == {"id": job["id"], "status": "completed", "progress": 100, "step": 6,
                        "total_steps": 6}
    assert wait_status(server, blocker["id"], ("completed",))["status"] == "completed"


def test_a_finished_job_gives_one_final_event(server):
    """checked with: `while True` for the loop in wanserve/api/events.py follow (the stream of a
    finished job never ends: a read timeout)."""
    job = submit(server, {"size": "64x64", "num_frames": "5", "num_inference_steps": "2"},
                 prefer_async=False).json()
    seen = events(server, job["id"], timeout=10)
    assert len(seen) == 1 and seen[0]["status"] == "completed" and seen[0]["step"] == 2


def test_a_cancelled_job_ends_its_stream(server):
    """checked with: VideoService._resolve publishing nothing (the stream waits on)."""
    job = submit(server, MEDIUM).json()
    wait_status(server, job["id"], ("in_progress",))
    with requests.get(f"{server.url}/v1/videos/{job['id']}/events", stream=True,
                      timeout=60) as resp:
        stream = data_lines(resp, time.monotonic() + 10)
        assert next(stream)["status"] == "in_progress"
        assert requests.delete(f"{server.url}/v1/videos/{job['id']}", timeout=10).ok
        rest = list(stream)
    assert rest[-1]["status"] == "cancelled" and rest[-1]["error"]["code"] == "cancelled"
    deadline = time.monotonic() + 60
    while requests.get(server.url + "/health", timeout=5).json()["current_job"]:
        assert time.monotonic() < deadline, "the cancelled job kept running"
        time.sleep(0.1)


def test_an_unknown_video_is_a_404(server):
    resp = requests.get(f"{server.url}/v1/videos/video_{'0' * 32}/events", timeout=10)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "video_not_found"
