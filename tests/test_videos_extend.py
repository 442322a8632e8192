"""POST /v1/videos/extensions against the shared tiny server: a video continued from its last
frame is the source's frames, then a plain image-to-video request's frames from that last frame
after the joint one, exactly (lossless); from a stored job, an uploaded MP4 and the `openai`
SDK's own `videos.extend`; and the refusals, each naming its field."""
from __future__ import annotations

import base64
import io
import warnings

import numpy as np
import openai
import PIL.Image
import pytest
import requests

from conftest import assert_client_error, png_bytes
from test_http_e2e import decode_frames
from test_videos_sdk import assert_sdk_video
from wanserve.api.video import encode_mp4

SOURCE = {"prompt": "a lighthouse in a storm", "size": "64x48", "num_frames": "9",
          "num_inference_steps": "2", "seed": "5", "quality": "lossless"}
# the new part: 9 frames (1 s at the tiny preset's 8 fps), so 9 + 9 - 1 in all
NEW = {"prompt": "the storm clears", "num_inference_steps": 2, "seed": 7}
EXTENSIONS = "/v1/videos/extensions"

warnings.filterwarnings("ignore", message="The Sora API", category=DeprecationWarning)


def mp4_of(server, job_id: str) -> bytes:
    resp = requests.get(f"{server.url}/v1/videos/{job_id}/content", timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.content


@pytest.fixture(scope="module")
def source(server):
    """A completed lossless job: (its job object, its MP4, its frames)."""
    resp = requests.post(server.url + "/v1/videos", data=SOURCE, timeout=300,
                         files={"input_reference": ("r.png", png_bytes(64, 48), "image/png")})
    assert resp.status_code == 200, resp.text
    job = resp.json()
    mp4 = mp4_of(server, job["id"])
    return job, mp4, decode_frames(mp4)


@pytest.fixture(scope="module")
def extended(server, source):
    """The source extended by NEW (JSON, `video` as {"id"}), and the frames it must have: the
    source's, then those of the plain request from the source's last frame after its first."""
    job, _, frames = source
    resp = requests.post(server.url + EXTENSIONS, timeout=300,
                         json={**NEW, "video": {"id": job["id"]}, "num_frames": 9})
    assert resp.status_code == 200, resp.text
    last = io.BytesIO()
    PIL.Image.fromarray(frames[-1]).save(last, format="PNG")
    plain = requests.post(server.url + "/v1/videos", timeout=300, data={
        **NEW, "size": SOURCE["size"], "num_frames": 9, "fps": 8, "quality": "lossless"},
        files={"input_reference": ("last.png", last.getvalue(), "image/png")})
    assert plain.status_code == 200, plain.text
    new = decode_frames(base64.b64decode(plain.json()["data"][0]["b64_json"]))
    return resp.json(), np.concatenate([frames, new[1:]])


def test_extension_is_the_source_then_the_plain_request_from_its_last_frame(server, source,
                                                                            extended):
    """checked with: ExtensionStream.put without dropping the joint frame (18 frames, not 17)."""
    job, _, _ = source
    body, expected = extended
    frames = decode_frames(base64.b64decode(body["data"][0]["b64_json"]))
    assert frames.shape == expected.shape == (17, 48, 64, 3)
    assert np.array_equal(frames, expected)
    assert np.array_equal(frames, decode_frames(mp4_of(server, body["id"])))
    assert (body["extended_from"], body["source_frames"]) == (job["id"], 9)
    assert (body["num_frames"], body["seconds"], body["size"]) == (17, f"{17 / 8:g}", "64x48")
    assert body["quality"] == "lossless"  # the source's, as the request gave none
    stored = requests.get(f"{server.url}/v1/videos/{body['id']}", timeout=5).json()
    assert (stored["extended_from"], stored["seconds"]) == (job["id"], body["seconds"])
    for answer in (body, stored):
        assert_sdk_video(answer, "completed")


def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


SDK_EXTRA = {"num_inference_steps": NEW["num_inference_steps"], "seed": NEW["seed"]}


def test_an_uploaded_mp4_extends_the_same_through_the_sdk(server, source, extended):
    """The pinned SDK's `client.videos.extend` with `video` a file (the multipart part
    `video`), `seconds` the new part's. checked with: `source_of` ignoring the file part
    (`upload = None`: 400 `video` required)."""
    _, mp4, _ = source
    _, expected = extended
    client = sdk(server)
    video = client.videos.extend(prompt=NEW["prompt"], seconds="1",
                                 video=("clip.mp4", mp4, "video/mp4"),
                                 extra_body={**SDK_EXTRA, "quality": "lossless"})
    assert (video.status, video.seconds, video.extended_from, video.source_frames) == (
        "completed", "2.125", None, 9)
    assert np.array_equal(decode_frames(client.videos.download_content(video.id).content),
                          expected)


def test_the_sdks_extend_by_id_answered_at_once_then_polled(server, source, extended):
    """The pinned SDK (3.63.0) refuses `video={"id": ...}` itself, before sending, as it takes
    `video` for a file; `video=openai.omit` with the id in `extra_body` sends the `video[id]`
    form field a working SDK would. `Prefer: respond-async`: queued at once, then polled.
    checked with: the `video[id]` form field not folded back into {"id"}
    (wanserve/api/sdk_forms.py; 400 `video` required)."""
    job, _, _ = source
    _, expected = extended
    client = sdk(server)
    with pytest.raises(RuntimeError, match="Expected entry at `video`"):
        client.videos.extend(prompt=NEW["prompt"], seconds="1", video={"id": job["id"]})
    queued = client.videos.extend(prompt=NEW["prompt"], seconds="1", video=openai.omit,
                                  extra_body={**SDK_EXTRA, "video": {"id": job["id"]}},
                                  extra_headers={"Prefer": "respond-async"})
    assert queued.status in ("queued", "in_progress") and queued.seconds == "2.125"
    done = client.videos.poll(queued.id, poll_interval_ms=100)
    assert (done.status, done.extended_from) == ("completed", job["id"])
    assert np.array_equal(decode_frames(client.videos.download_content(done.id).content),
                          expected)


def _extend(server, fields: dict | None = None, video: bytes | None = None) -> tuple[int, dict]:
    files = {"video": ("v.mp4", video, "video/mp4")} if video is not None else None
    resp = requests.post(server.url + EXTENSIONS, data={"prompt": "p", **(fields or {})},
                         files=files, timeout=60)
    return resp.status_code, assert_client_error(resp.status_code, resp.content, str(fields))


def test_refusals_name_their_field(server, source):
    """Unknown and unfinished sources, an upload that is no video, a size the model cannot
    make, a total over `limits`, and fields that follow the source. checked with: the total
    check removed from VideoService.create_job (the 201-frame extension was made: 200)."""
    job, _, _ = source
    assert _extend(server, {"video": "video_" + "0" * 32})[0] == 404
    assert _extend(server, {"video": "nonsense"})[1]["param"] == "video"
    status, error = _extend(server)
    assert (status, error["param"], error["code"]) == (400, "video", "missing_required_parameter")
    for junk in (b"not a video", png_bytes(64, 48)):
        status, error = _extend(server, video=junk)
        assert (status, error["param"], error["code"]) == (400, "video", "invalid_video")
    odd = encode_mp4(np.zeros((3, 40, 40, 3), np.uint8), 8, quality="lossless")
    status, error = _extend(server, video=odd)  # 40 is no multiple of 16
    assert (status, error["param"]) == (400, "video") and "40x40" in error["message"]
    long = encode_mp4(np.zeros((193, 32, 32, 3), np.uint8), 8)
    status, error = _extend(server, {"num_frames": "9"}, video=long)
    assert (status, error["param"]) == (400, "num_frames") and "201 frames" in error["message"]
    for field, value in (("size", "128x128"), ("fps", "16"), ("input_reference", "AAAA")):
        status, error = _extend(server, {"video": job["id"], field: value})
        assert (status, error["param"]) == (400, field), error
    running = requests.post(server.url + "/v1/videos", headers={"Prefer": "respond-async"},
                            data={**SOURCE, "num_inference_steps": "50"},
                            files={"input_reference": ("r.png", png_bytes(), "image/png")},
                            timeout=60).json()
    try:
        status, error = _extend(server, {"video": running["id"]})
        assert (status, error["param"], error["code"]) == (409, "video", "video_not_ready")
    finally:
        requests.delete(f"{server.url}/v1/videos/{running['id']}", timeout=30)


def test_the_openapi_document_describes_the_route(server):
    """checked with: the "/v1/videos/extensions" entry renamed in `openapi_spec` (KeyError)."""
    spec = requests.get(server.url + "/openapi.json", timeout=5).json()
    content = spec["paths"]["/v1/videos/extensions"]["post"]["requestBody"]["content"]
    for kind in ("application/json", "multipart/form-data"):
        schema = content[kind]["schema"]
        assert schema["required"] == ["prompt", "video"], kind
        assert not {"input_reference", "size", "fps"} & set(schema["properties"]), kind
