"""End to end over real HTTP against a tiny server started by ./launch.sh."""
from __future__ import annotations

import base64
import io
import statistics
import threading
import time

import av
import numpy as np
import pytest
import requests

from conftest import png_bytes
from test_jobs_lifecycle import QUICK

BASE = {"prompt": "a lighthouse in a storm", "seed": "7"}


def decode_frames(mp4: bytes) -> np.ndarray:
    with av.open(io.BytesIO(mp4)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def stream_info(mp4: bytes) -> tuple[int, int, int, float]:
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(video=0))
        return frames, stream.width, stream.height, float(stream.average_rate)


def create(server, fields=None, image=None, **kw):
    files = {"input_reference": ("ref.png", image if image is not None else png_bytes(), "image/png")}
    return requests.post(server.url + "/v1/videos", data={**BASE, **(fields or {})}, files=files,
                         timeout=300, **kw)


def video_of(resp) -> bytes:
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "completed" and body["object"] == "video"
    return base64.b64decode(body["data"][0]["b64_json"])


def test_multipart_returns_playable_mp4_with_requested_shape(server):
    resp = create(server, {"size": "160x96", "num_frames": "13", "fps": "12"})
    body = resp.json()
    mp4 = video_of(resp)
    assert stream_info(mp4) == (13, 160, 96, 12.0)
    assert body["size"] == "160x96" and body["seed"] == 7 and body["progress"] == 100
    assert isinstance(body["created"], int) and body["id"].startswith("video_")
    assert body["seconds"] == f"{13 / 12:g}"
    assert {"text_encode", "image_encode", "denoise", "vae_decode", "mp4_encode"} <= set(body["timings"])
    assert mp4[4:8] == b"ftyp" and mp4.index(b"moov") < mp4.index(b"mdat")  # +faststart


def test_json_with_data_url_and_seconds(server):
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(96, 96)).decode()
    resp = requests.post(server.url + "/v1/videos", json={
        "prompt": "waves", "input_reference": data_url, "seconds": 1, "fps": 8, "seed": 1}, timeout=300)
    frames, width, height, fps = stream_info(video_of(resp))
    assert (frames, fps) == (9, 8.0)  # 1 s x 8 fps -> 8 -> nearest 4k+1
    assert (width, height) == (128, 128)  # square image at the preset's 128x128 area


def test_json_image_reference_object(server):
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(64, 64)).decode()
    resp = requests.post(server.url + "/v1/videos", timeout=300, json={
        "prompt": "p", "input_reference": {"image_url": data_url}, "num_inference_steps": 2})
    assert stream_info(video_of(resp))[1:3] == (128, 128)
    resp = requests.post(server.url + "/v1/videos", timeout=30, json={
        "prompt": "p", "input_reference": {"file_id": "file_123"}})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "input_reference"


def test_bare_base64_and_size_from_image_aspect(server):
    image = base64.b64encode(png_bytes(400, 200)).decode()
    resp = requests.post(server.url + "/v1/videos", json={"prompt": "p", "input_reference": image},
                         timeout=300)
    _, width, height, _ = stream_info(video_of(resp))
    assert width % 16 == 0 and height % 16 == 0 and 1.6 <= width / height <= 2.4


def test_same_seed_same_frames_and_random_seed_reported(server):
    a = decode_frames(video_of(create(server)))
    b = decode_frames(video_of(create(server)))
    assert np.array_equal(a, b)
    r1 = create(server, {"seed": ""}).json()
    r2 = create(server, {"seed": ""}).json()
    assert r1["seed"] != r2["seed"]


def test_reported_seed_reproduces_the_video(server):
    """No seed sent: the seed the job reports regenerates the same frames.
    checked with: `seed=request.seed ^ 1` in wanserve/api/serving.py create_job (the job reports
    a seed other than the one used)."""
    fields = {"prompt": "a lighthouse in a storm", **QUICK}
    image = {"input_reference": ("ref.png", png_bytes(), "image/png")}
    first = requests.post(server.url + "/v1/videos", data=fields, files=image, timeout=300)
    frames = decode_frames(video_of(first))
    seed = requests.get(f"{server.url}/v1/videos/{first.json()['id']}", timeout=5).json()["seed"]
    assert seed == first.json()["seed"]
    again = requests.post(server.url + "/v1/videos", data={**fields, "seed": str(seed)},
                          files=image, timeout=300)
    assert np.array_equal(frames, decode_frames(video_of(again)))
    assert again.json()["seed"] == seed


@pytest.mark.parametrize("fields,frames", [({"fps": "31", "num_frames": "5"}, 5),
                                           ({"fps": "60", "seconds": "0.15"}, 9)])
def test_high_fps_end_to_end(server, fields, frames):
    """fps above the 1..30 the other tests use, up to limits.max_fps (60); `seconds` × 60.
    checked with: `rate = Fraction(min(fps, 30))` in wanserve/api/video.py encode_mp4."""
    fps = int(fields["fps"])
    resp = create(server, {"size": "64x64", "num_inference_steps": "2", **fields})
    assert stream_info(video_of(resp)) == (frames, 64, 64, float(fps))
    body = resp.json()
    assert (body["fps"], body["num_frames"], body["seconds"]) == (fps, frames, f"{frames / fps:g}")


@pytest.mark.parametrize("field,value", [
    ("prompt", "a completely different prompt"),
    ("negative_prompt", "blurry"),
    ("num_inference_steps", "3"),
    ("guidance_scale", "6.0"),
    ("guidance_scale_2", "1.5"),
    ("boundary_ratio", "0.5"),
    ("flow_shift", "8.0"),
    ("seed", "8"),
])
def test_each_parameter_changes_the_output(server, field, value):
    reference = decode_frames(video_of(create(server)))
    changed = decode_frames(video_of(create(server, {field: value})))
    assert reference.shape == changed.shape
    assert np.abs(reference.astype(int) - changed.astype(int)).mean() > 0.05, field


def test_input_image_changes_the_output(server):
    a = decode_frames(video_of(create(server, image=png_bytes(seed=1))))
    b = decode_frames(video_of(create(server, image=png_bytes(seed=2))))
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 0.05


def test_last_frame_as_a_file_part_or_a_data_url_changes_the_video(server):
    """checked with: `last_image` not passed (wanserve/engine/serving/generate.py _denoise): the video is the
    one without a last frame."""
    first, last = png_bytes(seed=1), png_bytes(seed=4)
    plain = decode_frames(video_of(create(server, image=first)))
    as_part = requests.post(server.url + "/v1/videos", data=BASE, timeout=300, files={
        "input_reference": ("a.png", first, "image/png"), "last_frame": ("b.png", last, "image/png")})
    urls = {name: "data:image/png;base64," + base64.b64encode(data).decode()
            for name, data in (("input_reference", first), ("last_frame", last))}
    as_url = requests.post(server.url + "/v1/videos", json={**BASE, **urls}, timeout=300)
    with_last = decode_frames(video_of(as_part))
    assert np.array_equal(with_last, decode_frames(video_of(as_url)))
    assert np.abs(plain.astype(int) - with_last.astype(int)).mean() > 0.05
    resp = requests.post(server.url + "/v1/videos", data=BASE, timeout=30, files={
        "input_reference": ("a.png", first, "image/png"), "last_frame": ("b.png", b"no", "image/png")})
    assert resp.status_code == 415 and resp.json()["error"]["param"] == "last_frame"
    resp = requests.post(server.url + "/v1/videos", timeout=30,
                         json={**BASE, "last_frame": urls["last_frame"]})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "input_reference"


@pytest.mark.parametrize("fields,param,status", [
    ({"size": "100x64"}, "size", 400),
    ({"width": "96"}, "height", 400),
    ({"size": "96x96", "width": "96", "height": "96"}, "size", 400),
    ({"num_frames": "8"}, "num_frames", 400),
    ({"num_frames": "9", "seconds": "1"}, "seconds", 400),
    ({"num_frames": "201"}, "num_frames", 400),
    ({"num_inference_steps": "0"}, "num_inference_steps", 400),
    ({"num_inference_steps": "500"}, "num_inference_steps", 400),
    ({"guidance_scale": "nan"}, "guidance_scale", 400),
    ({"boundary_ratio": "1.5"}, "boundary_ratio", 400),
    ({"seed": "-1"}, "seed", 400),
    ({"size": "2048x2048"}, "size", 400),
    ({"prompt": ""}, "prompt", 400),
    ({"model": "sora-2"}, "model", 404),
])
def test_invalid_values_name_the_param(server, fields, param, status):
    resp = create(server, fields)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_missing_image_unsupported_types_and_oversize(server):
    resp = requests.post(server.url + "/v1/videos", data=BASE, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "input_reference"
    resp = requests.post(server.url + "/v1/videos", data="prompt=x", timeout=30,
                         headers={"Content-Type": "text/plain"})
    assert resp.status_code == 415 and resp.json()["error"]["code"] == "unsupported_media_type"
    resp = create(server, image=b"definitely not an image")
    assert resp.status_code == 415 and resp.json()["error"]["param"] == "input_reference"
    resp = create(server, image=png_bytes()[:200])
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_image"
    resp = create(server, image=b"\x89PNG" + b"\0" * (21 * 1024 * 1024))
    assert resp.status_code == 413 and "error" in resp.json()
    resp = requests.post(server.url + "/v1/videos", data=b"{not json", timeout=30,
                         headers={"Content-Type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"
    # and the server still serves
    assert create(server).status_code == 200


def test_health_answers_while_a_video_is_generating(server):
    result = {}

    def slow_request():
        result["resp"] = create(server, {"size": "256x256", "num_frames": "17",
                                         "num_inference_steps": "30"})

    worker = threading.Thread(target=slow_request)
    worker.start()
    deadline = time.monotonic() + 60
    seen_busy, latencies = False, []
    while worker.is_alive() and time.monotonic() < deadline:
        start = time.perf_counter()
        health = requests.get(server.url + "/health", timeout=5)
        latencies.append(time.perf_counter() - start)
        assert health.status_code == 200
        if health.json()["current_job"]:
            seen_busy = True
        time.sleep(0.05)
    worker.join(300)
    assert seen_busy, "never observed /health during a generation"
    assert result["resp"].status_code == 200
    # answered while the job ran, not after it: a /health that waited on the engine would
    # take as long as what was left of the job; the cores are shared with the job, so a
    # single answer may lag
    job_s = sum(result["resp"].json()["stage_durations"].values())
    assert statistics.median(latencies) < 0.2, latencies
    assert max(latencies) < min(2.0, job_s / 2), (
        f"/health took {max(latencies):.3f}s during a {job_s:.1f}s generation")


def test_models_and_health_report_the_engine(server):
    models = requests.get(server.url + "/v1/models", timeout=5).json()
    entry = models["data"][0]
    assert models["object"] == "list" and entry["id"] == "wan2.2-i2v-tiny"
    assert entry["attention_backend"] == "cpu-flash"
    health = requests.get(server.url + "/health", timeout=5).json()
    assert health["status"] == "ok" and health["parallel"]["world_size"] == 1
    assert health["parallel"]["exchanges"] == "none (one rank)"
    assert health["attention_backend"] == "cpu-flash" and "log-sum-exp" in health["attention_reason"]
    spec = requests.get(server.url + "/openapi.json", timeout=5).json()
    assert "/v1/videos" in spec["paths"]
