"""The MP4 encoded while the VAE decodes (wanserve/api/mp4_stream.py): the same bytes as
encoding the finished video, on its own thread, and through the real server."""
from __future__ import annotations

import time

import numpy as np
import pytest
import requests

from conftest import png_bytes
from test_http_e2e import decode_frames
from wanserve.api.mp4_stream import StreamedMp4
from wanserve.api.video import encode_mp4
from wanserve.engine.config import DEFAULT_MP4_PRESET, load_config


def moving_scene(frames: int, height: int, width: int) -> np.ndarray:
    """A smooth gradient with a moving square: float32 (F, H, W, 3) in [0, 1]."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    video = np.empty((frames, height, width, 3), np.float32)
    for index in range(frames):
        video[index] = np.stack([xx / width, yy / height,
                                 np.full_like(xx, index / frames)], axis=-1)
        top, left = 4 + index, 6 + 2 * index
        video[index, top:top + 12, left:left + 12] = (1.0, 0.2, 0.1)
    return video


def wanvae_chunks(video: np.ndarray) -> list[np.ndarray]:
    """As the Wan VAE decodes: one frame, then four per latent frame."""
    return [video[:1]] + [video[i:i + 4] for i in range(1, len(video), 4)]


@pytest.mark.parametrize("quality", ["high", "lossless"])
def test_streamed_encoding_gives_the_bytes_of_encoding_after_the_decode(quality):
    """17 frames in 5 chunks, each encoded on the stream's thread before the next is put.
    checked with: `Mp4Writer.add` numbering each chunk's frames from 0 (`frame.pts = index`
    over the chunk) in wanserve/api/video.py."""
    video = moving_scene(17, 48, 64)
    stream = StreamedMp4(8, quality=quality)
    for chunk in wanvae_chunks(video):
        encoded = stream.frames
        stream.put(chunk)
        deadline = time.monotonic() + 30
        while stream.frames < encoded + len(chunk):  # on its thread, before `finish`
            assert time.monotonic() < deadline, "the chunk was never encoded"
            time.sleep(0.005)
    data = stream.finish()
    assert stream.chunks == 5
    assert data == encode_mp4(video, 8, quality=quality)
    assert len(decode_frames(data)) == 17


def test_an_aborted_stream_drops_later_frames_and_a_bad_chunk_fails_finish():
    """A job cancelled while decoding: its stream's thread ends, closes its file, and frames
    the decode still puts are not kept.
    checked with: `StreamedMp4.put` queueing after an abort; `_run` keeping no error."""
    stream = StreamedMp4(8)
    stream.put(moving_scene(1, 48, 64))
    stream.abort()
    stream._thread.join(30)
    assert not stream._thread.is_alive() and stream._writer._tmp is None
    stream.put(moving_scene(4, 48, 64))
    assert stream._chunks.qsize() == 0
    bad = StreamedMp4(8)
    bad.put(np.zeros((2, 33, 32, 3), np.float32))
    with pytest.raises(ValueError, match="even width and height"):
        bad.finish()


def test_the_servers_video_is_the_encoding_of_its_frames_in_chunks(server):
    """The server's MP4 for 17 frames (5 decoder calls) was written while decoding, chunk by
    chunk, and is the file encoding its frames after the decode gives, `high` and `lossless`
    (the lossless video's frames are the generated ones exactly).
    checked with: `frame_sink` returning None in wanserve/api/serving.py (no `mp4_chunks`);
    `sink.put(chunk)` skipped for the first chunk in wanserve/engine/serving/frames.py."""
    fields = {"prompt": "p", "size": "64x48", "num_frames": "17", "seed": "5",
              "num_inference_steps": "2"}
    videos, timings = {}, {}
    for quality in ("lossless", "high"):
        resp = requests.post(server.url + "/v1/videos/sync", data={**fields, "quality": quality},
                             files={"input_reference": ("r.png", png_bytes(), "image/png")},
                             timeout=300)
        assert resp.status_code == 200, resp.text
        videos[quality] = resp.content
        job = requests.get(f"{server.url}/v1/videos/{resp.headers['X-Request-Id']}",
                           timeout=10).json()
        timings[quality] = job["timings"]
    frames = decode_frames(videos["lossless"])
    assert frames.shape == (17, 48, 64, 3)
    for quality in ("lossless", "high"):
        assert timings[quality]["mp4_chunks"] == 5, timings[quality]
        assert videos[quality] == encode_mp4(frames, 8, quality=quality), quality


def test_the_preset_comes_from_the_flag_or_the_yaml_and_changes_only_high():
    """checked with: `pick("mp4_preset", ...)` reading `create_response`'s key in
    wanserve/engine/config.py; the lossless branch taking `self.preset` in wanserve/api/video.py."""
    assert load_config([]).mp4_preset == DEFAULT_MP4_PRESET
    assert load_config(["--mp4-preset", "ultrafast"]).mp4_preset == "ultrafast"
    assert load_config(["--set", "server.mp4_preset=fast"]).mp4_preset == "fast"
    with pytest.raises(SystemExit, match="mp4_preset"):
        load_config(["--set", "server.mp4_preset=quick"])
    video = moving_scene(9, 48, 64)
    assert encode_mp4(video, 8, preset="ultrafast") != encode_mp4(video, 8, preset="medium")
    assert (encode_mp4(video, 8, quality="lossless", preset="ultrafast")
            == encode_mp4(video, 8, quality="lossless", preset="medium"))
