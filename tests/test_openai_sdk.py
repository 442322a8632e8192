"""The official `openai` SDK against a real server: every Videos call it makes."""
from __future__ import annotations

import openai
import pytest
import requests

from conftest import png_bytes
from test_http_e2e import stream_info

TINY = {"num_frames": "5", "num_inference_steps": "2"}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_create_with_file_reference_waits_and_completes(client):
    video = client.videos.create(prompt="a fox in the snow", size="144x112",
                                 input_reference=("ref.png", png_bytes(), "image/png"),
                                 model="wan2.2-i2v-tiny", extra_body={**TINY, "seed": "5"})
    assert video.status == "completed" and video.progress == 100
    assert video.size == "144x112" and video.model == "wan2.2-i2v-tiny"
    assert video.id.startswith("video_") and video.created_at > 0
    mp4 = client.videos.download_content(video.id).read()
    assert stream_info(mp4)[:3] == (5, 144, 112)


def test_create_and_poll_async_then_retrieve_and_delete(client):
    video = client.videos.create_and_poll(
        prompt="rain on a window", input_reference=("r.png", png_bytes(64, 64), "image/png"),
        extra_headers={"Prefer": "respond-async"}, extra_body=TINY, poll_interval_ms=50)
    assert video.status == "completed"
    again = client.videos.retrieve(video.id)
    assert again.id == video.id and again.status == "completed" and again.expires_at
    deleted = client.videos.delete(video.id)
    assert deleted.id == video.id and deleted.deleted is True
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    with pytest.raises(openai.NotFoundError):
        client.videos.download_content(video.id)


def test_list_paginates_over_every_video(client):
    created = [client.videos.create(prompt=f"clip {i}", extra_body=TINY,
                                    input_reference=("r.png", png_bytes(seed=i), "image/png")).id
               for i in range(3)]
    first_page = client.videos.list(limit=2, order="desc")
    assert len(first_page.data) == 2 and first_page.has_more
    assert [v.id for v in first_page.data] == created[::-1][:2]
    everything = [v.id for v in client.videos.list(limit=2, order="asc")]  # auto-paginates
    positions = [everything.index(i) for i in created]
    assert positions == sorted(positions) and len(everything) == len(set(everything))


def test_errors_surface_as_sdk_exceptions(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.videos.create(prompt="x", size="1280x720",
                             input_reference=("r.png", png_bytes(), "image/png"))
    assert err.value.body["param"] == "size" and "1280" in err.value.message
    with pytest.raises(openai.NotFoundError):
        client.videos.create(prompt="x", model="sora-2",
                             input_reference=("r.png", png_bytes(), "image/png"))


def test_content_supports_byte_ranges(client, server):
    video = client.videos.create(prompt="range", extra_body=TINY,
                                 input_reference=("r.png", png_bytes(), "image/png"))
    url = f"{server.url}/v1/videos/{video.id}/content"
    whole = requests.get(url, timeout=10)
    assert whole.headers["content-type"] == "video/mp4"
    part = requests.get(url, headers={"Range": "bytes=10-99"}, timeout=10)
    assert part.status_code == 206 and part.content == whole.content[10:100]
    assert part.headers["content-range"] == f"bytes 10-99/{len(whole.content)}"
    tail = requests.get(url, headers={"Range": "bytes=-16"}, timeout=10)
    assert tail.content == whole.content[-16:]
    bad = requests.get(url, headers={"Range": f"bytes={len(whole.content) + 5}-"}, timeout=10)
    assert bad.status_code == 416


def test_metrics_expose_queue_jobs_and_latency(server, client):
    client.videos.create(prompt="metrics", extra_body=TINY,
                         input_reference=("r.png", png_bytes(), "image/png"))
    text = requests.get(server.url + "/metrics", timeout=5).text
    for name in ("wanserve_queue_depth", 'wanserve_jobs_total{status="completed"}',
                 "wanserve_step_seconds_bucket", "wanserve_job_seconds_count"):
        assert name in text, name
