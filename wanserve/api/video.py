"""MP4 (H.264, faststart) encoding and probing with PyAV: yuv420p for `high` quality, RGB at
qp 0 (libx264rgb) for `lossless`, whose decoded frames are the encoded ones exactly. A streamed
job's MP4 is fragmented instead, a fragment per chunk of frames, written as it is encoded."""
from __future__ import annotations

import io
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from wanserve.engine.config import DEFAULT_MP4_PRESET as DEFAULT_PRESET


def _to_uint8(frames: np.ndarray) -> np.ndarray:
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape (F, H, W, 3), got {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError("frames is empty")
    if frames.dtype == np.uint8:
        return frames
    if np.issubdtype(frames.dtype, np.floating):
        return np.clip(frames * 255 + 0.5, 0, 255).astype(np.uint8)
    raise ValueError(f"frames must be float in [0, 1] or uint8, got {frames.dtype}")


def encode_mp4(frames: np.ndarray, fps: int, *, crf: int = 18, quality: str = "high",
               preset: str = DEFAULT_PRESET) -> bytes:
    """Encode (F, H, W, 3) frames as an H.264 MP4 with the moov atom up front."""
    writer = Mp4Writer(fps, crf=crf, quality=quality, preset=preset)
    try:
        writer.add(frames)
        return writer.finish()
    finally:
        writer.close()


# A fragment is cut at each keyframe; the moov up front holds no samples, so nothing written
# is ever rewritten: the bytes as they are written are the file. Each fragment's data offsets
# count from its own moof, not from the start of the file: Chromium's Media Source Extensions
# refused the first fragment otherwise.
FRAGMENTED = "frag_keyframe+empty_moov+default_base_moof"


class Mp4Writer:
    """The encoder of `encode_mp4`, fed a chunk of frames at a time: the same frames in any
    chunks give the same bytes as `encode_mp4` (wanserve/api/mp4_stream.py feeds it while the
    VAE decodes). Not thread-safe: one thread adds and finishes.

    `fragments_to`: a file with `write` and `getvalue` but no `seek` (wanserve/api/live_video.py)
    that takes a fragmented MP4 instead, as it is made: each `add(..., keyframe=True)` starts a
    fragment, written out when the next one starts (the last by `finish`). Its encoder has no
    lookahead, B-frames or frame threads (x264's zerolatency), so a chunk's frames come out of
    it as they go in."""

    def __init__(self, fps: int, *, crf: int = 18, quality: str = "high",
                 preset: str = DEFAULT_PRESET, fragments_to=None):
        if quality not in ("high", "lossless"):
            raise ValueError(f"quality must be 'high' or 'lossless', got {quality!r}")
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.rate = Fraction(fps)
        self.quality, self.crf, self.preset = quality, crf, preset
        self.fragments_to = fragments_to
        self._tmp = None
        self._container = self._stream = None
        self._count = 0

    def _open(self, width: int, height: int) -> None:
        if height % 2 or width % 2:
            raise ValueError(f"yuv420p needs even width and height, got {width}x{height}")
        if self.fragments_to is not None:
            self._container = av.open(self.fragments_to, mode="w", format="mp4",
                                      options={"movflags": FRAGMENTED})
        else:
            # The mp4 muxer implements +faststart by reopening the output *by name* after
            # writing, so an in-memory BytesIO target fails on close ("No such file or
            # directory: '<none>'"). Hence a real temporary file.
            self._tmp = tempfile.NamedTemporaryFile(suffix=".mp4")
            self._container = av.open(self._tmp.name, mode="w", format="mp4",
                                      options={"movflags": "+faststart"})
        lossless = self.quality == "lossless"
        # yuv444p at qp 0 would still round in the RGB -> YUV conversion: RGB it is
        stream = self._container.add_stream("libx264rgb" if lossless else "libx264",
                                            rate=self.rate)
        stream.width = width
        stream.height = height
        stream.pix_fmt = "rgb24" if lossless else "yuv420p"
        # mbtree=0: with macroblock-tree rate control this libx264 build (PyAV 18's FFmpeg)
        # encoded identical frames differently from run to run; same seed must mean the
        # same video, and the quality cost at crf 18 is small.
        stream.options = {"crf": str(self.crf), "preset": self.preset,
                          "x264-params": "mbtree=0"}
        if lossless:  # the preset changes the size here, never the frames
            stream.options = {"qp": "0", "preset": "medium"}
        if self.fragments_to is not None:
            stream.options = {**stream.options, "tune": "zerolatency"}
        self._stream = stream

    def add(self, frames: np.ndarray, keyframe: bool = False) -> None:
        """`keyframe`: the first frame is a keyframe (in a fragmented MP4, a fragment's first)."""
        pixels = _to_uint8(np.asarray(frames))
        _, height, width, _ = pixels.shape
        if self._stream is None:
            self._open(width, height)
        elif (width, height) != (self._stream.width, self._stream.height):
            raise ValueError(f"frames of {width}x{height} after frames of "
                             f"{self._stream.width}x{self._stream.height}")
        for index, pixel_frame in enumerate(pixels):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixel_frame), format="rgb24")
            frame.pts = self._count
            frame.time_base = 1 / self.rate
            if keyframe and index == 0:
                frame.pict_type = av.video.frame.PictureType.I
            self._container.mux(self._stream.encode(frame))
            self._count += 1

    def finish(self) -> bytes:
        """Flush the delayed (B-)frames, write the file and return its bytes."""
        if self._stream is None:
            raise ValueError("frames is empty")
        self._container.mux(self._stream.encode(None))
        self._container.close()
        self._container = None
        if self.fragments_to is not None:
            return self.fragments_to.getvalue()
        return Path(self._tmp.name).read_bytes()

    def close(self) -> None:
        """Drop what was written (after `finish`, or instead of it)."""
        if self._container is not None:
            self._container.close()
            self._container = None
        if self._tmp is not None:
            self._tmp.close()
            self._tmp = None


def probe_mp4(data: bytes) -> dict:
    """Stream facts of an MP4, with the frame count found by decoding every frame."""
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        ctx = stream.codec_context
        return {
            "frames": frames,
            "width": ctx.width,
            "height": ctx.height,
            "fps": float(stream.average_rate) if stream.average_rate else 0.0,
            "codec": ctx.name,
            "pix_fmt": ctx.format.name if ctx.format else None,
        }


def top_level_boxes(data: bytes) -> list[bytes]:
    """The types of an MP4's top-level boxes in order, up to the first malformed one."""
    boxes, offset, end = [], 0, len(data)
    while offset + 8 <= end:
        size = int.from_bytes(data[offset:offset + 4], "big")
        box_type = data[offset + 4:offset + 8]
        if size == 1:  # 64-bit largesize follows the type
            if offset + 16 > end:
                break
            size = int.from_bytes(data[offset + 8:offset + 16], "big")
        elif size == 0:  # box extends to the end of the file
            size = end - offset
        boxes.append(box_type)
        if size < 8:
            break
        offset += size
    return boxes


def is_faststart(data: bytes) -> bool:
    """True when the top-level `moov` box comes before `mdat`."""
    boxes = top_level_boxes(data)
    return b"moov" in boxes and (b"mdat" not in boxes
                                 or boxes.index(b"moov") < boxes.index(b"mdat"))
