"""The MP4 encoded while the VAE decodes: a frame sink (wanserve/engine/serving/frames.py) that
hands each decoded chunk to an `Mp4Writer` on a thread of its own, so that when the decode ends
only the last chunk and the flush are left to encode. The bytes are those `encode_mp4` gives for
the same frames; a streamed job's (`live`) are a fragmented MP4 instead, a fragment per chunk,
which its readers get as it is written (wanserve/api/live_video.py)."""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterable

import numpy as np

from wanserve.api.live_video import LiveVideo
from wanserve.api.video import DEFAULT_PRESET, Mp4Writer

_END = object()


class StreamedMp4:
    """`put` from the decoding thread (never blocks, never raises); `finish` or `abort` once,
    from any other thread."""

    def __init__(self, fps: int, *, quality: str = "high", preset: str = DEFAULT_PRESET,
                 crf: int = 18, live: LiveVideo | None = None):
        self._writer = Mp4Writer(fps, crf=crf, quality=quality, preset=preset,
                                 fragments_to=live)
        self.fragmented = live is not None
        self._chunks: queue.SimpleQueue = queue.SimpleQueue()
        self._error: Exception | None = None
        self._aborted = False
        self.encode_s = 0.0  # seconds the encoder thread spent encoding
        self.frames = self.chunks = 0  # encoded so far
        self._thread = threading.Thread(target=self._run, name="wanserve-mp4-stream", daemon=True)
        self._thread.start()

    def put(self, frames: np.ndarray | Callable[[], Iterable[np.ndarray]]) -> None:
        """Frames, or a callable whose chunks of frames are made on the encoding thread (an
        extension's source frames, decoded while the new part is generated): one fragment."""
        if not self._aborted:
            self._chunks.put(frames)

    def _run(self) -> None:
        while (chunk := self._chunks.get()) is not _END:
            if self._error is not None or self._aborted:
                continue
            start = time.perf_counter()
            try:
                pieces = chunk() if callable(chunk) else (chunk,)
                for index, frames in enumerate(pieces):
                    self._writer.add(frames, keyframe=self.fragmented and index == 0)
                    self.frames += len(frames)
                    self.chunks += 1
            except Exception as exc:  # told by `finish`
                self._error = exc
            self.encode_s += time.perf_counter() - start
        if self._aborted:
            self._writer.close()

    def finish(self) -> bytes:
        """Every frame put so far encoded and flushed: the MP4's bytes."""
        self._chunks.put(_END)
        self._thread.join()
        try:
            if self._error is not None:
                raise self._error
            start = time.perf_counter()
            data = self._writer.finish()
            self.encode_s += time.perf_counter() - start
            return data
        finally:
            self._writer.close()

    def abort(self) -> None:
        """The job ended without a video: drop what was encoded (the thread closes the file
        after the chunk it is encoding, if any)."""
        self._aborted = True
        self._chunks.put(_END)
