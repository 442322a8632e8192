"""The Videos API as the 2026 `openai` SDK sees it: preview variants of the content route,
server-paced polling, and the SDK's own types as the contract."""
from __future__ import annotations

import io

import numpy as np
import PIL.Image
import pytest
import requests

from conftest import assert_client_error, png_bytes
from test_http_e2e import decode_frames
from wanserve.api import previews
from wanserve.api.video import encode_mp4

LOSSLESS = {"prompt": "a lighthouse in a storm", "size": "176x96", "num_frames": "17",
            "num_inference_steps": "2", "seed": "11", "quality": "lossless"}


@pytest.fixture(scope="module")
def lossless_job(server):
    resp = requests.post(server.url + "/v1/videos", data=LOSSLESS, timeout=300,
                         files={"input_reference": ("r.png", png_bytes(176, 96), "image/png")})
    assert resp.status_code == 200, resp.text
    job = resp.json()
    mp4 = requests.get(f"{server.url}/v1/videos/{job['id']}/content", timeout=30).content
    return job, decode_frames(mp4)


def content(server, job_id: str, variant: str) -> requests.Response:
    return requests.get(f"{server.url}/v1/videos/{job_id}/content",
                        params={"variant": variant}, timeout=30)


def image_of(resp: requests.Response, fmt: str) -> np.ndarray:
    image = PIL.Image.open(io.BytesIO(resp.content))
    assert image.format == fmt
    return np.asarray(image.convert("RGB")).astype(int)


def assert_is_frame(image: np.ndarray, frames: np.ndarray, index: int, what: str) -> None:
    """`image` is frame `index` up to lossy compression: nearer to it than to any other frame
    by a margin (the tiny model's frames are noise-like, which a lossy codec keeps least: a
    JPEG tile is ~16 levels from its frame, ~29 from the nearest other)."""
    diffs = [float(np.abs(image - frame.astype(int)).mean()) for frame in frames]
    others = min(d for i, d in enumerate(diffs) if i != index)
    assert diffs[index] < 0.7 * others, (what, index, diffs)


def test_thumbnail_is_the_middle_frame_as_webp(server, lossless_job):
    """checked with: `thumbnail_index` giving frame 0 (wanserve/api/previews.py)."""
    job, frames = lossless_job
    resp = content(server, job["id"], "thumbnail")
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/webp"
    thumb = image_of(resp, "WEBP")
    assert thumb.shape == frames[0].shape
    assert_is_frame(thumb, frames, 8, "thumbnail")  # (17 - 1) // 2


def test_spritesheet_tiles_are_the_frames_its_headers_name(server, lossless_job):
    """checked with: `sprite_indices` spacing by `frames // count` (the last frame left out);
    each tile pasted from the frame listed before it (`tiles[indices[max(0, slot - 1)]]` in
    wanserve/api/previews.py `spritesheet`): tile 1 failed."""
    job, frames = lossless_job
    resp = content(server, job["id"], "spritesheet")
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/jpeg"
    h = resp.headers
    columns, rows = int(h["X-Sprite-Columns"]), int(h["X-Sprite-Rows"])
    tile_w, tile_h = int(h["X-Sprite-Tile-Width"]), int(h["X-Sprite-Tile-Height"])
    listed = [int(i) for i in h["X-Sprite-Frames"].split(",")]
    # 16 of 17 frames, evenly spaced, first and last included: the documented layout
    assert listed == [round(i * 16 / 15) for i in range(16)] and listed[-1] == 16
    assert (columns, rows, tile_w, tile_h) == (4, 4, 176, 96)
    sheet = image_of(resp, "JPEG")
    assert sheet.shape == (rows * tile_h, columns * tile_w, 3)
    for slot, frame_index in enumerate(listed):
        y, x = (slot // columns) * tile_h, (slot % columns) * tile_w
        tile = sheet[y:y + tile_h, x:x + tile_w]
        assert_is_frame(tile, frames, frame_index, f"tile {slot}")


def test_spritesheet_of_a_wide_video_scales_its_tiles(tmp_path):
    """Tiles wider than SPRITE_TILE_WIDTH are scaled; a clip shorter than SPRITE_MAX_FRAMES
    shows every frame. checked with: `sprite_tile_size` returning the frame's size."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (5, 128, 512, 3), dtype=np.uint8)
    path = tmp_path / "wide.mp4"
    path.write_bytes(encode_mp4(frames, 8, quality="lossless"))
    sheet = previews.spritesheet(path, 5)
    assert (sheet.frames, sheet.columns, sheet.rows) == ([0, 1, 2, 3, 4], 3, 2)
    assert (sheet.tile_width, sheet.tile_height) == (256, 64)
    image = np.asarray(PIL.Image.open(io.BytesIO(sheet.image)).convert("RGB"))
    assert image.shape == (2 * 64, 3 * 256, 3)


def test_unknown_variant_is_a_400_naming_it_and_unfinished_jobs_have_no_previews(
        server, lossless_job):
    """checked with: the variant check removed from the content route (wanserve/api/app.py)."""
    job, _ = lossless_job
    resp = content(server, job["id"], "poster")
    error = assert_client_error(resp.status_code, resp.content, "variant=poster")
    assert resp.status_code == 400 and error["param"] == "variant"
    assert "thumbnail" in error["message"] and "poster" in error["message"]
    resp = requests.get(f"{server.url}/v1/videos/{job['id']}/content?variant=", timeout=30)
    assert resp.status_code == 200 and resp.headers["content-type"] == "video/mp4"
    missing = content(server, "video_" + "0" * 32, "thumbnail")
    assert missing.status_code == 404
