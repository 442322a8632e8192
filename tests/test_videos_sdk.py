"""The pinned `openai` SDK against a real server: polling paced by `openai-poll-after-ms`, the
SDK's own types as the contract for every job state, and its calls unchanged."""
from __future__ import annotations

import base64
import http.client
import io
import json
import statistics
import threading
import time
from typing import Literal
from urllib.parse import urlsplit

import httpx2
import numpy as np
import openai
import openai.pagination
import PIL.Image
import pydantic
import pytest
import requests

from conftest import png_bytes, start_server
from test_http_e2e import decode_frames
from test_jobs_lifecycle import QUICK, wait_status

class Recorder:
    """Every response the SDK's HTTP client got: (arrival, method, path, status, job status,
    openai-poll-after-ms)."""

    def __init__(self):
        self.seen: list[tuple] = []

    def __call__(self, response: httpx2.Response) -> None:
        response.read()
        kind = response.headers.get("content-type", "")
        body = response.json() if kind.startswith("application/json") else {}
        after = response.headers.get("openai-poll-after-ms")
        self.seen.append((time.monotonic(), response.request.method, response.request.url.path,
                          response.status_code, body.get("status") if isinstance(body, dict)
                          else None, int(after) if after is not None else None))

    def polls(self, video_id: str) -> list[tuple]:
        return [s for s in self.seen if s[1] == "GET" and s[2] == f"/v1/videos/{video_id}"]


def sdk(server, recorder: Recorder | None = None) -> openai.OpenAI:
    http = httpx2.Client(event_hooks={"response": [recorder]} if recorder else {})
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         http_client=http)


@pytest.fixture(scope="module")
def paced(tmp_path_factory):
    """A server whose steps take 1.5 s more than the tiny model's own time: a step time that no
    constant and no SDK default stands in for, and that the load of a shared machine changes
    little. A job that reaches step FAIL_STEP fails there."""
    srv = start_server(tmp_path_factory.mktemp("paced"),
                       env={"WANSERVE_TEST_STEP_DELAY": "1.5",
                            "WANSERVE_TEST_FAIL_AT": f"0:{FAIL_STEP}"})
    yield srv
    assert srv.stop() == 0


PACED = {"prompt": "paced", "size": "176x96", "num_frames": "5"}
FAIL_STEP = 10


def submit(srv, steps: int) -> requests.Response:
    return requests.post(srv.url + "/v1/videos", headers={"Prefer": "respond-async"},
                         data={**PACED, "num_inference_steps": str(steps)}, timeout=30,
                         files={"input_reference": ("r.png", png_bytes(176, 96), "image/png")})


def step_times(srv, job_id: str) -> list[float]:
    """The seconds between the job's steps, as its event stream shows them to a client."""
    seen = {}
    with requests.get(f"{srv.url}/v1/videos/{job_id}/events", stream=True, timeout=120) as resp:
        for line in resp.iter_lines():
            if line.startswith(b"data: "):
                event = json.loads(line[6:])
                seen.setdefault(event["step"], time.monotonic())
    return [seen[i + 1] - seen[i] for i in range(1, max(seen)) if i in seen and i + 1 in seen]


def test_create_and_poll_waits_what_the_server_measured(paced):
    """The SDK sleeps the header's milliseconds between polls (the first it reads), and that is
    the step time the server measured. checked with: `openai-poll-after-ms` the constant 500 of
    before (`poll_headers` returning {"openai-poll-after-ms": "500"}, wanserve/api/serving.py)."""
    step_s = statistics.mean(step_times(paced, submit(paced, 6).json()["id"])[-3:])  # recent
    assert step_s > 1.4  # the delay is there
    recorder = Recorder()
    video = sdk(paced, recorder).videos.create_and_poll(
        prompt="paced", input_reference=("r.png", png_bytes(176, 96), "image/png"),
        extra_headers={"Prefer": "respond-async"},
        extra_body={**PACED, "num_inference_steps": "8"})
    assert video.status == "completed"
    (created,) = [s for s in recorder.seen if s[1] == "POST"]
    assert created[3] == 202 and created[5] is not None
    polls = recorder.polls(video.id)
    waiting = polls[:-1]  # the answers the SDK slept on (it polls at once after the create)
    assert all(s[4] in ("queued", "in_progress") and s[5] is not None for s in waiting), waiting
    assert polls[-1][4] == "completed" and polls[-1][5] is None  # nothing left to poll
    told = waiting[0][5] / 1000
    assert 0.5 * step_s <= told <= 2 * step_s, (told, step_s)  # the machine's load varies
    gaps = [later[0] - earlier[0] for earlier, later in zip(polls, polls[1:])]
    assert min(gaps) >= told - 0.01 and statistics.median(gaps) <= told + 0.4, (told, gaps)
    later = [s[5] / 1000 for s in waiting if s[4] == "in_progress"][2:]  # the job's own steps
    assert later and all(0.5 * step_s <= wait <= 2 * step_s for wait in later), (step_s, later)


def test_a_queued_job_is_told_to_wait_for_the_steps_ahead_of_it(paced):
    """A job queued behind a running one is told about half the wait of the steps ahead of it,
    far more than the running job's step. checked with: a queued job paced as a running one
    (`if status == "in_progress":` → `if True:` before the queue sum, wanserve/api/pacing.py)."""
    long = submit(paced, 12).json()["id"]
    try:
        deadline = time.monotonic() + 60
        while (job := requests.get(f"{paced.url}/v1/videos/{long}", timeout=5)).json()[
                "progress"] < 25:
            assert time.monotonic() < deadline, "the long job never ran"
            time.sleep(0.05)
        running_ms = int(job.headers["openai-poll-after-ms"])
        queued = submit(paced, 2)
        assert queued.json()["status"] == "queued"
        queued_ms = int(queued.headers["openai-poll-after-ms"])
        # at most 9 steps left ahead, at least 3 done: half of 9 steps or less
        assert 3 * running_ms <= queued_ms <= 9 / 2 * running_ms * 1.4, (queued_ms, running_ms)
        requests.delete(f"{paced.url}/v1/videos/{queued.json()['id']}", timeout=5)
    finally:
        requests.delete(f"{paced.url}/v1/videos/{long}", timeout=5)


# The pinned SDK's `Video` with the two declared enumerations that cannot hold here (README):
# any WxH the model takes, and the `cancelled` status.
SDKVideo = pydantic.create_model(
    "SDKVideo", __base__=openai.types.Video, size=(str, ...),
    status=(Literal["queued", "in_progress", "completed", "failed", "cancelled"], ...))


def assert_sdk_video(body: dict, status: str) -> SDKVideo:
    """Every field the SDK declares is there with the SDK's JSON type, checked strictly (no
    "5" for 5, no 5.0 for "5", no string for the error object)."""
    assert set(openai.types.Video.model_fields) <= set(body), body
    video = SDKVideo.model_validate(body, strict=True)
    assert video.status == status, body
    if status in ("failed", "cancelled"):
        openai.types.VideoCreateError.model_validate(body["error"], strict=True)
    else:
        assert body["error"] is None
    return video


def test_every_state_has_the_sdks_json_types(paced, server):
    """queued, in_progress, failed and completed jobs (as created, polled and listed), the
    synchronous answer, a deletion: the SDK's models validate them strictly. checked with:
    `seconds` as a number (`seconds=request.num_frames / request.fps` in `create_job`,
    wanserve/api/serving.py)."""
    failing = submit(paced, FAIL_STEP + 1)
    assert failing.status_code == 202
    assert_sdk_video(failing.json(), "queued")
    queued = submit(paced, 2)
    assert_sdk_video(queued.json(), "queued")
    deadline = time.monotonic() + 60
    while (job := requests.get(f"{paced.url}/v1/videos/{failing.json()['id']}",
                               timeout=5).json())["progress"] == 0:
        assert time.monotonic() < deadline, "never started"
        time.sleep(0.05)
    assert_sdk_video(job, "in_progress")
    assert_sdk_video(requests.get(f"{paced.url}/v1/videos/{queued.json()['id']}",
                                  timeout=5).json(), "queued")
    page = requests.get(paced.url + "/v1/videos?limit=2", timeout=5).json()
    openai.pagination.SyncConversationCursorPage[SDKVideo].model_validate(page, strict=True)
    assert [v["status"] for v in page["data"]] == ["queued", "in_progress"]
    failed = wait_status(paced, failing.json()["id"], ("failed",), timeout=60)
    assert assert_sdk_video(failed, "failed").error.code == "generation_failed"
    done = wait_status(paced, queued.json()["id"], ("completed",), timeout=60)
    video = assert_sdk_video(done, "completed")
    assert video.progress == 100 and video.seconds == "0.625" and video.expires_at
    assert video.completed_at >= video.created_at
    synchronous = requests.post(server.url + "/v1/videos", data={**PACED, **QUICK}, timeout=300,
                                files={"input_reference": ("r.png", png_bytes(), "image/png")})
    assert_sdk_video(synchronous.json(), "completed")
    deleted = requests.delete(f"{paced.url}/v1/videos/{video.id}", timeout=5).json()
    openai.types.VideoDeleteResponse.model_validate(deleted, strict=True)


def test_poll_returns_on_a_cancelled_job_and_on_one_deleted_under_it(paced):
    """`cancelled` is no status of the SDK's: its `poll` returns on it (a synchronous caller
    that left cancelled the job, which stays), and on a job deleted while polled it raises
    NotFoundError at once rather than polling on. checked with: a cancelled job answered as
    `in_progress` (`status` of the public job, wanserve/api/jobs.py): poll never returned."""
    request = requests.Request(
        "POST", paced.url + "/v1/videos", data={**PACED, "num_inference_steps": "8"},
        files={"input_reference": ("r.png", png_bytes(176, 96), "image/png")}).prepare()
    url = urlsplit(paced.url)
    caller = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    caller.request("POST", "/v1/videos", body=request.body, headers=dict(request.headers))
    job_id = None
    deadline = time.monotonic() + 30
    while job_id is None:
        assert time.monotonic() < deadline, "the job was never created"
        running = [v for v in requests.get(paced.url + "/v1/videos", timeout=5).json()["data"]
                   if v["status"] == "in_progress"]
        job_id = running[0]["id"] if running else None
        time.sleep(0.05)
    caller.close()
    client = sdk(paced)
    result: list = []
    poller = threading.Thread(target=lambda: result.append(client.videos.poll(job_id)),
                              daemon=True)
    poller.start()
    poller.join(timeout=30)
    assert not poller.is_alive(), "poll kept polling a cancelled job"
    assert_sdk_video(client.videos.retrieve(job_id).model_dump(), "cancelled")
    assert result[0].status == "cancelled" and result[0].error.code == "client_disconnected"

    errors: list = []

    def create_and_poll():
        try:
            client.videos.create_and_poll(
                prompt="deleted", input_reference=("r.png", png_bytes(176, 96), "image/png"),
                extra_headers={"Prefer": "respond-async"},
                extra_body={**PACED, "num_inference_steps": "8"})
        except openai.NotFoundError as exc:
            errors.append(exc)

    poller = threading.Thread(target=create_and_poll, daemon=True)
    poller.start()
    deadline = time.monotonic() + 30
    while not (running := [v for v in requests.get(paced.url + "/v1/videos", timeout=5).json()[
            "data"] if v["status"] == "in_progress"]):
        assert time.monotonic() < deadline, "the job never ran"
        time.sleep(0.05)
    requests.delete(f"{paced.url}/v1/videos/{running[0]['id']}", timeout=5)
    poller.join(timeout=10)
    assert not poller.is_alive() and len(errors) == 1


def test_input_reference_objects_and_the_sdks_own_calls(server):
    """`input_reference` as `{"image_url": <data URL>}` through the SDK (a multipart
    `input_reference[image_url]` field) and in JSON makes the same video as the file;
    `{"file_id"}` is a 400 naming `input_reference`; retrieve, list, download_content with each
    variant, delete. checked with: the bracketed form fields left as they came (`nest_bracketed`
    not called in wanserve/api/app.py `_fields_and_files`): the SDK's request answered 400,
    `input_reference` missing."""
    client = sdk(server)
    image = png_bytes(176, 96, seed=4)
    data_url = "data:image/png;base64," + base64.b64encode(image).decode()
    fields = {**PACED, **QUICK, "seed": "3", "quality": "lossless"}
    # the pinned SDK refuses a dict as its `input_reference` argument before sending (it takes
    # that argument for a file); through `extra_body` it goes as the bracketed form field
    by_object = client.videos.create(prompt="paced", extra_body={
        **fields, "input_reference": {"image_url": data_url}})
    by_file = client.videos.create(prompt="paced", input_reference=("r.png", image, "image/png"),
                                   extra_body=fields)
    by_json = requests.post(server.url + "/v1/videos", timeout=300, json={
        **fields, "input_reference": {"image_url": data_url}}).json()
    videos = [decode_frames(client.videos.download_content(v).read())
              for v in (by_object.id, by_file.id, by_json["id"])]
    assert np.array_equal(videos[0], videos[1]) and np.array_equal(videos[0], videos[2])
    for refused in (
            lambda: client.videos.create(prompt="x", extra_body={
                **fields, "input_reference": {"file_id": "file-abc"}}),
            lambda: requests.post(server.url + "/v1/videos", timeout=30, json={
                **fields, "input_reference": {"file_id": "file-abc"}}).raise_for_status()):
        with pytest.raises((openai.BadRequestError, requests.HTTPError)) as err:
            refused()
        error = err.value.response.json()["error"]
        assert error["param"] == "input_reference" and "Files API" in error["message"], error
    assert client.videos.retrieve(by_object.id).status == "completed"
    listed = [v.id for v in client.videos.list(limit=100)]
    assert {by_object.id, by_file.id, by_json["id"]} <= set(listed)
    thumb = PIL.Image.open(io.BytesIO(
        client.videos.download_content(by_file.id, variant="thumbnail").read()))
    sheet = PIL.Image.open(io.BytesIO(
        client.videos.download_content(by_file.id, variant="spritesheet").read()))
    assert (thumb.format, thumb.size, sheet.format) == ("WEBP", (64, 64), "JPEG")  # QUICK
    assert client.videos.delete(by_object.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.videos.download_content(by_object.id, variant="thumbnail")
