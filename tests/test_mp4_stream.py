"""The MP4 encoded while the VAE decodes (wanserve/api/mp4_stream.py): the same bytes as
encoding the finished video, on its own thread, and through the real server; a streamed job's
fragmented MP4 and the readers that follow it as it is written (wanserve/api/live_video.py)."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import requests

from conftest import png_bytes
from test_http_e2e import decode_frames
from wanserve.api.live_video import LiveVideo, VideoCutShort
from wanserve.api.mp4_stream import StreamedMp4
from wanserve.api.video import encode_mp4, is_faststart, top_level_boxes
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


def put_and_wait(stream: StreamedMp4, chunk: np.ndarray) -> None:
    """`chunk` put, and encoded on the stream's thread."""
    encoded = stream.frames
    stream.put(chunk)
    deadline = time.monotonic() + 30
    while stream.frames < encoded + len(chunk):
        assert time.monotonic() < deadline, "the chunk was never encoded"
        time.sleep(0.005)


@pytest.mark.parametrize("quality", ["high", "lossless"])
def test_streamed_encoding_gives_the_bytes_of_encoding_after_the_decode(quality):
    """17 frames in 5 chunks, each encoded on the stream's thread before the next is put.
    checked with: `Mp4Writer.add` numbering each chunk's frames from 0 (`frame.pts = index`
    over the chunk) in wanserve/api/video.py."""
    video = moving_scene(17, 48, 64)
    stream = StreamedMp4(8, quality=quality)
    for chunk in wanvae_chunks(video):
        put_and_wait(stream, chunk)  # on its thread, before `finish`
    data = stream.finish()
    assert stream.chunks == 5
    assert data == encode_mp4(video, 8, quality=quality)
    assert len(decode_frames(data)) == 17


@pytest.mark.parametrize("quality", ["high", "lossless"])
def test_a_live_stream_is_a_fragment_per_chunk_written_as_it_is_encoded(quality):
    """A streamed job's MP4: a fragment per chunk (its first frame a keyframe), each written
    out when the next chunk is encoded, so that all but the last are out before `finish`;
    the bytes written are the file. The default MP4 stays one `+faststart` file.
    checked with: the keyframe not forced (`keyframe=False` in `StreamedMp4._run`); movflags
    `+faststart` for the fragmented writer too (wanserve/api/video.py)."""
    video = moving_scene(17, 48, 64)
    live = LiveVideo()
    stream = StreamedMp4(8, quality=quality, live=live)
    written = []
    for chunk in wanvae_chunks(video):
        put_and_wait(stream, chunk)
        written.append(len(live.getvalue()))
    data = stream.finish()
    assert data == live.getvalue()
    assert top_level_boxes(data) == [b"ftyp", b"moov", *[b"moof", b"mdat"] * 5, b"mfra"]
    assert written[1] < written[2] < written[3] < written[4] < len(data), written
    frames = decode_frames(data)
    assert frames.shape == (17, 48, 64, 3)
    whole = decode_frames(encode_mp4(video, 8, quality=quality))
    if quality == "lossless":
        assert np.array_equal(frames, whole)
    else:
        assert np.abs(frames.astype(int) - whole).mean() < 2
    default = encode_mp4(video, 8, quality=quality)
    assert is_faststart(default) and b"moof" not in top_level_boxes(default)


def test_live_readers_get_every_byte_from_the_first_and_a_cut_short_end():
    """Readers on an event loop, the writer on a thread: one that joins late gets every byte
    from the first; the end of a video given up raises after its last byte; writes after the
    end are dropped; a reader that leaves is no longer woken.
    checked with: `follow` starting at the bytes written so far (`offset = len(self._data)`);
    `end` not waking the readers (wanserve/api/live_video.py)."""

    async def read_all(live: LiveVideo) -> tuple[bytes, bool]:
        received = b""
        try:
            async for data in live.follow():
                received += data
        except VideoCutShort:
            return received, False
        return received, True

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        live = LiveVideo()
        early = asyncio.ensure_future(read_all(live))
        await loop.run_in_executor(None, live.write, b"ftyp")
        await asyncio.sleep(0.05)
        late = asyncio.ensure_future(read_all(live))
        leaving = live.follow()
        assert await asyncio.wait_for(leaving.__anext__(), 5) == b"ftyp"
        await leaving.aclose()
        await loop.run_in_executor(None, live.write, b"moof")
        await loop.run_in_executor(None, live.end, True)
        assert await asyncio.wait_for(early, 5) == (b"ftypmoof", True)
        assert await asyncio.wait_for(late, 5) == (b"ftypmoof", True)
        assert not live._wakers
        cut = LiveVideo()
        reader = asyncio.ensure_future(read_all(cut))
        await loop.run_in_executor(None, cut.write, b"ftyp")
        await loop.run_in_executor(None, cut.end, False)
        cut.write(b"mfra")
        assert await asyncio.wait_for(reader, 5) == (b"ftyp", False)
        assert cut.getvalue() == b"ftyp"

    asyncio.run(scenario())


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
