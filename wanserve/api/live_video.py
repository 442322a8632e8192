"""The bytes of a streamed job's MP4 while they are written, for the clients that follow them.

The encoder (on its thread, through PyAV) only appends; any number of readers on the event loop
each get every byte from the first, as it comes, until the video ends. Appending never waits
for a reader: a slow one gets what piled up in one piece, one that leaves just stops asking.
"""
from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator


class VideoCutShort(Exception):
    """The video ended unfinished (its job failed or was cancelled)."""


class LiveVideo:
    """A write-only, unseekable file for the muxer (a fragmented MP4 never seeks back), read by
    `follow`. `end` once, when the video is done or given up."""

    def __init__(self):
        self._data = bytearray()
        self._lock = threading.Lock()
        self._ended = self.complete = False
        self._wakers: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def write(self, data) -> int:
        with self._lock:
            if not self._ended:  # after `end`: an aborted encoder closing its file
                self._data += data
                self._wake()
        return len(data)

    def getvalue(self) -> bytes:
        with self._lock:
            return bytes(self._data)

    def end(self, complete: bool) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended, self.complete = True, complete
            self._wake()

    @property
    def ended(self) -> bool:
        return self._ended

    def _wake(self) -> None:  # under the lock
        for loop, event in self._wakers:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that reader's loop closed
                pass

    async def follow(self) -> AsyncIterator[bytes]:
        """Every byte from the first, in the pieces they came in (joined when the reader was
        slower); returns at the end of a complete video, raises VideoCutShort after the last
        byte of one given up."""
        offset = 0
        waker = (asyncio.get_running_loop(), asyncio.Event())
        try:
            while True:
                with self._lock:
                    data, ended = bytes(self._data[offset:]), self._ended
                    waker[1].clear()
                    self._wakers.add(waker)
                if data:
                    offset += len(data)
                    yield data
                elif ended:
                    if not self.complete:
                        raise VideoCutShort("the video ended unfinished")
                    return
                else:
                    await waker[1].wait()
        finally:
            with self._lock:
                self._wakers.discard(waker)
