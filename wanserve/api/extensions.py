"""Extensions: a video continued from its last frame (POST /v1/videos/extensions).

An extension is an ordinary image-to-video job whose first frame is the source video's last
frame, with the source's frames as a prefix: its MP4 is the source's frames, then the new
part's frames after its first (the joint frame, which the source already ends on). Here the
request's `video` becomes a source (a completed job's MP4 or an uploaded one) and the request
becomes the fields and file parts of a plain create: `size` and `fps` the source's,
`input_reference` its last frame (as PNG, lossless), and the source MP4 itself as the part
`video`, which the job keeps with its inputs so that a restart can stitch it again.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass
from typing import Iterator

import av
import numpy as np
import PIL.Image

from wanserve.api.errors import APIError, InvalidRequest, NotFound
from wanserve.api.jobs import JobStore, is_job_id
from wanserve.api.mp4_stream import StreamedMp4
from wanserve.api.params import DATA_URL_RE, SIZE_RE
from wanserve.engine.config import Limits

SOURCE_PART = "video"  # the file part that holds the source MP4 among a job's inputs


@dataclass
class SourceVideo:
    mp4: bytes
    frames: int
    width: int
    height: int
    fps: int
    last_frame: np.ndarray  # (H, W, 3) uint8
    job_id: str | None = None  # None: an uploaded MP4
    quality: str | None = None  # the source job's `quality`


def source_of(fields: dict, files: dict[str, bytes], store: JobStore, limits: Limits
              ) -> SourceVideo:
    """The `video` of an extension request: a file part, `{"id": ...}`, a plain id, or in
    JSON the MP4 as a data: URL."""
    upload = files.get(SOURCE_PART)
    value = fields.get(SOURCE_PART)
    if upload is None and isinstance(value, str) and value.strip().startswith("data:"):
        upload = _data_url_bytes(value.strip())
    if upload is not None:
        return probe_source(upload, limits)
    if isinstance(value, dict):
        value = value.get("id")
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest("`video` is required: the id of a completed video (as {\"id\": "
                             "...} or the id itself) or an MP4 file", param="video",
                             code="missing_required_parameter")
    return _completed_job(value.strip(), store, limits)


def _data_url_bytes(value: str) -> bytes:
    match = DATA_URL_RE.match(value)
    try:
        return base64.b64decode(match.group("data") if match else "", validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("`video` is not a valid base64 data: URL", param="video",
                             code="invalid_video") from None


def _completed_job(video_id: str, store: JobStore, limits: Limits) -> SourceVideo:
    job = store.get(video_id) if is_job_id(video_id) else None
    if job is None:
        raise NotFound(f"no video with id {video_id!r} to extend", param="video",
                       code="video_not_found")
    path = store.video_path(job)
    if job.status != "completed" or path is None or not path.exists():
        raise APIError(f"video {video_id} is {job.status}; only a completed video can be "
                       "extended", param="video", code="video_not_ready", status=409)
    source = probe_source(path.read_bytes(), limits)
    source.job_id, source.quality = job.id, job.quality
    return source


def _open_mp4(data: bytes):
    # the MP4 demuxer (it reads MOV too), not whatever FFmpeg guesses: it decodes a PNG too
    return av.open(io.BytesIO(data), mode="r", format="mp4")


def probe_source(mp4: bytes, limits: Limits) -> SourceVideo:
    """Size, rate, frame count and last frame of untrusted MP4 bytes, or a 400 naming `video`.
    Frames are counted by decoding (stopping past the limit), the size checked first."""
    if not mp4:
        raise InvalidRequest("`video` is empty", param="video", code="invalid_video")
    try:
        with _open_mp4(mp4) as container:
            if not container.streams.video:
                raise InvalidRequest("`video` has no video stream", param="video",
                                     code="invalid_video")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > limits.max_pixels:
                raise InvalidRequest(f"the source video is {width}x{height}; this model makes "
                                     f"at most {limits.max_pixels} pixels", param="video",
                                     code="invalid_value")
            rate = stream.average_rate or stream.guessed_rate
            count, last = 0, None
            for frame in container.decode(stream):
                count += 1
                if count > limits.total_frames:
                    raise InvalidRequest(f"the source video has more than {limits.total_frames} "
                                         "frames, the most an extended video may have",
                                         param="video", code="invalid_value")
                last = frame
            if last is None:
                raise InvalidRequest("`video` has no frames", param="video",
                                     code="invalid_video")
            last_frame = last.to_ndarray(format="rgb24")
    except (av.FFmpegError, ValueError, EOFError) as exc:
        raise InvalidRequest(f"`video` is not a decodable MP4: {exc}", param="video",
                             code="invalid_video") from None
    fps = round(float(rate)) if rate else 0
    if not 1 <= fps <= limits.max_fps:
        raise InvalidRequest(f"the source video's frame rate is {float(rate or 0):g}; between 1 "
                             f"and {limits.max_fps} fps can be extended", param="video",
                             code="invalid_value")
    return SourceVideo(mp4, count, last_frame.shape[1], last_frame.shape[0], fps, last_frame)


def plain_create(fields: dict, files: dict[str, bytes], source: SourceVideo
                 ) -> tuple[dict, dict[str, bytes]]:
    """The fields and file parts of the plain create that makes the new part."""
    if "input_reference" in fields or "input_reference" in files:
        raise InvalidRequest("an extension starts from the source video's last frame: "
                             "`input_reference` does not apply", param="input_reference",
                             code="unsupported_parameter")
    _follows_source(fields, source)
    fields = {k: v for k, v in fields.items() if k not in (SOURCE_PART, "width", "height")}
    fields["size"] = f"{source.width}x{source.height}"
    fields["fps"] = source.fps
    if source.quality and fields.get("quality") in (None, ""):
        fields["quality"] = source.quality  # a lossless video stays lossless
    buf = io.BytesIO()
    PIL.Image.fromarray(source.last_frame).save(buf, format="PNG")
    files = {**files, "input_reference": buf.getvalue(), SOURCE_PART: source.mp4}
    return fields, files


def _follows_source(fields: dict, source: SourceVideo) -> None:
    """`size`, `width`, `height` and `fps` follow the source: given, they must be its own."""
    own = {"width": source.width, "height": source.height, "fps": source.fps}
    size = fields.get("size")
    if isinstance(size, str) and size.strip():
        match = SIZE_RE.match(size)
        given = (int(match.group(1)), int(match.group(2))) if match else None
        if given != (source.width, source.height):
            raise InvalidRequest(f"`size` follows the source video ({source.width}x"
                                 f"{source.height}); got {size!r}", param="size",
                                 code="invalid_value")
    for name, value in own.items():
        given = fields.get(name)
        if given in (None, ""):
            continue
        try:
            same = math.isclose(float(given), value)
        except (TypeError, ValueError):
            same = False
        if not same:
            raise InvalidRequest(f"`{name}` follows the source video ({value}); got {given!r}",
                                 param=name, code="invalid_value")


def source_frames(mp4: bytes) -> Iterator[np.ndarray]:
    """The source's frames, a (1, H, W, 3) uint8 chunk at a time."""
    with _open_mp4(mp4) as container:
        for frame in container.decode(video=0):
            yield frame.to_ndarray(format="rgb24")[None]


class ExtensionStream(StreamedMp4):
    """A StreamedMp4 that encodes the source's frames first (decoded on its own thread), then
    the new part's without its first frame."""

    def __init__(self, fps: int, source_mp4: bytes, **options):
        super().__init__(fps, **options)
        self._joint = True
        super().put(lambda: source_frames(source_mp4))

    def put(self, frames: np.ndarray) -> None:
        if self._joint:
            self._joint, frames = False, frames[1:]
        if len(frames):
            super().put(frames)
