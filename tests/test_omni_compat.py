"""What vLLM-Omni's clients send and expect: POST /v1/videos/sync, an asynchronous create
(server.create_response: async), extra_params, the job's extra fields, lossless output."""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import time

import numpy as np
import PIL.Image
import pytest
import requests

from wanserve.api.video import _to_uint8
from conftest import REPO, png_bytes, start_server
from wanserve.engine.serving.offline import synthetic_image
from test_http_e2e import decode_frames, stream_info

IMAGE = {"input_reference": ("ref.png", png_bytes(), "image/png")}
TINY = {"prompt": "a lighthouse in a storm", "size": "64x64", "num_frames": "5",
        "num_inference_steps": "2"}


def test_sync_route_answers_the_raw_mp4_with_headers(server):
    """checked with: "X-Request-Id": job.model in the /v1/videos/sync route."""
    resp = requests.post(server.url + "/v1/videos/sync", data={**TINY, "seed": "3"}, files=IMAGE,
                         timeout=300)
    assert resp.status_code == 200 and resp.headers["content-type"] == "video/mp4"
    assert stream_info(resp.content)[:3] == (5, 64, 64)
    video_id = resp.headers["X-Request-Id"]
    assert resp.headers["X-Model"] == "wan2.2-i2v-tiny"
    job = requests.get(f"{server.url}/v1/videos/{video_id}", timeout=5).json()
    assert float(resp.headers["X-Inference-Time-S"]) == pytest.approx(job["inference_time_s"],
                                                                      abs=1e-3)
    bad = requests.post(server.url + "/v1/videos/sync", data={**TINY, "size": "100x64"},
                        files=IMAGE, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "size"


def test_extra_params_flow_under_the_top_level_fields(server):
    """checked with: `{**given, **extra}` in wanserve/api/params.py merge_extra_params (extra_params
    overrides the top-level size)."""
    extra = {"num_frames": 9, "seed": 21, "size": "96x96", "num_inference_steps": 2,
             "not_a_field": 1}
    resp = requests.post(server.url + "/v1/videos", files=IMAGE, timeout=300,
                         data={**TINY, "num_frames": "", "extra_params": json.dumps(extra)})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["size"], body["num_frames"], body["seed"]) == ("64x64", 9, 21)
    as_json = requests.post(server.url + "/v1/videos", timeout=300, json={
        "prompt": "p", "input_reference": "data:image/png;base64," + base64.b64encode(png_bytes()).decode(),
        "size": "64x64", "extra_params": {"num_frames": 5, "seed": 8, "num_inference_steps": 2}})
    assert (as_json.json()["num_frames"], as_json.json()["seed"]) == (5, 8)
    for value in ("{not json", "[1, 2]", '"text"'):
        bad = requests.post(server.url + "/v1/videos", files=IMAGE, timeout=30,
                            data={**TINY, "extra_params": value})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "extra_params", value
    bad = requests.post(server.url + "/v1/videos", files=IMAGE, timeout=30,
                        data={**TINY, "extra_params": '{"seed": -4}'})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "seed"


def test_the_job_reports_inference_time_stages_and_peak_memory(server):
    """checked with: `peak_memory_kind="cuda_max_allocated"` on the CPU in
    wanserve/engine/model/peak_memory.py read_peak."""
    body = requests.post(server.url + "/v1/videos", data=TINY, files=IMAGE, timeout=300).json()
    job = requests.get(f"{server.url}/v1/videos/{body['id']}", timeout=5).json()
    for view in (body, job):
        assert view["inference_time_s"] == view["timings"]["generate_total"] > 0
        assert set(view["stage_durations"]) == set(view["timings"]) - {
            "step_mean", "generate_total", "mp4_after_decode", "mp4_chunks"}  # overlap, a count
        assert {"text_encode", "denoise", "vae_decode", "mp4_encode"} <= set(view["stage_durations"])
        assert view["peak_memory_kind"] == "cpu_rss_high_water"
        assert 50 < view["peak_memory_mb"] < 64 * 1024
        assert view["num_inference_steps"] == 2 and view["quality"] == "high"


def test_lossless_frames_are_the_generated_frames(server, tmp_path):
    """Over HTTP with quality=lossless the decoded MP4 is wanserve.engine.serving.offline's frames for the same
    request, rounded to uint8 as wanserve/api/video.py does, exactly.
    checked with: "qp": "1" for lossless in wanserve/api/video.py encode_mp4."""
    spec = {"width": 64, "height": 64, "num_frames": 5, "num_inference_steps": 3, "seed": 11,
            "image_seed": 4, "prompt": "a red kite over the dunes", "guidance_scale": 4.0}
    (tmp_path / "reqs.json").write_text(json.dumps([spec]))
    out = tmp_path / "offline.npz"
    proc = subprocess.run([str(REPO / ".venv/bin/torchrun"), "--standalone", "--nproc-per-node",
                           "1", "-m", "wanserve.engine.serving.offline", "--requests", str(tmp_path / "reqs.json"),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as data:
        expected = _to_uint8(data["frames_0"])
    buf = io.BytesIO()
    PIL.Image.fromarray(synthetic_image(64, 64, 4)).save(buf, format="PNG")
    resp = requests.post(server.url + "/v1/videos", timeout=300, files={
        "input_reference": ("ref.png", buf.getvalue(), "image/png")}, data={
        "prompt": spec["prompt"], "size": "64x64", "num_frames": "5", "num_inference_steps": "3",
        "seed": "11", "guidance_scale": "4.0", "quality": "lossless"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["quality"] == "lossless"
    mp4 = requests.get(f"{server.url}/v1/videos/{resp.json()['id']}/content", timeout=30).content
    frames = decode_frames(mp4)
    assert frames.shape == expected.shape and np.array_equal(frames, expected)
    # the default encoding is lossy: the same request differs somewhere
    high = requests.post(server.url + "/v1/videos/sync", timeout=300, files={
        "input_reference": ("ref.png", buf.getvalue(), "image/png")}, data={
        "prompt": spec["prompt"], "size": "64x64", "num_frames": "5", "num_inference_steps": "3",
        "seed": "11", "guidance_scale": "4.0"})
    assert not np.array_equal(decode_frames(high.content), expected)


@pytest.fixture(scope="module")
def async_server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("async"), "--create-response", "async")
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


def test_a_benchmark_style_client(async_server):
    """vLLM-Omni's serving benchmark: multipart POST (200 at once), poll `status` until
    completed, GET the content, DELETE.
    checked with: `cfg.create_response == "asynch"` in create_video (the POST blocks and
    answers the completed video, not the queued job)."""
    url = async_server.url + "/v1/videos"
    form = {"prompt": "a fox", "model": "wan2.2-i2v-tiny", "seconds": "1", "fps": "8",
            "size": "64x64", "num_inference_steps": "12", "seed": "5"}
    resp = requests.post(url, data=form, files=IMAGE, timeout=60)
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["status"] in ("queued", "in_progress") and "data" not in job
    deadline = time.monotonic() + 300
    while job["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
        job = requests.get(f"{url}/{job['id']}", timeout=10).json()
    assert job["status"] == "completed", job
    content = requests.get(f"{url}/{job['id']}/content", timeout=30)
    assert content.status_code == 200 and stream_info(content.content)[0] == 9  # 1 s x 8 fps
    assert requests.delete(f"{url}/{job['id']}", timeout=10).json()["deleted"] is True
    assert requests.get(f"{url}/{job['id']}", timeout=10).status_code == 404
    # Prefer: respond-async keeps its 202; the spec states the 200 answer
    prefer = requests.post(url, data=form, files=IMAGE, timeout=60,
                           headers={"Prefer": "respond-async"})
    assert prefer.status_code == 202
    spec = requests.get(async_server.url + "/openapi.json", timeout=5).json()
    schema = spec["paths"]["/v1/videos"]["post"]["responses"]["200"]["content"]
    assert schema["application/json"]["schema"]["$ref"].endswith("/Video")


def test_a_data_dir_from_before_the_new_job_fields_still_opens(tmp_path):
    """checked with: the ALTER TABLE loop in wanserve/api/jobs.py JobStore removed (no such column)."""
    import sqlite3

    from wanserve.api.jobs import Job, JobStore

    old = ("id", "created_ns", "status", "progress", "created_at", "completed_at", "expires_at",
           "model", "prompt", "seconds", "size", "seed", "num_frames", "fps", "error_code",
           "error_message", "timings", "video_file")
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    db.execute(f"CREATE TABLE jobs ({', '.join(old)}, PRIMARY KEY (id))")
    db.execute(f"INSERT INTO jobs ({', '.join(old)}) VALUES ({', '.join('?' for _ in old)})",
               ("video_" + "a" * 32, 1, "completed", 100, 1, 2, None, "m", "p", "1", "64x64", 3,
                5, 8, None, None, '{"generate_total": 1.5}', None))
    db.commit()
    db.close()
    store = JobStore(tmp_path, ttl_s=60)
    kept = store.get("video_" + "a" * 32).public()
    assert (kept["quality"], kept["inference_time_s"], kept["peak_memory_mb"],
            kept["attempts"]) == ("high", 1.5, None, 0)
    store.add(Job(id="video_" + "b" * 32, status="queued", created_at=3, model="m", prompt="p",
                  seconds="1", size="64x64", seed=1, num_frames=5, fps=8, quality="lossless"),
              {"prompt": "p"}, {})
    assert store.get("video_" + "b" * 32).quality == "lossless"
    store.close()
