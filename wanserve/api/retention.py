"""--data-dir kept bounded while serving: expired jobs, the store's caps, leftovers, free space.

The server sweeps the store at start-up and then periodically: the finished jobs past their TTL
go (their rows, MP4s and kept inputs), then the oldest finished jobs beyond
`server.max_stored_videos` (every stored job counts, live ones too) or
`server.max_stored_bytes` (the MP4s' bytes), then files no job owns (an MP4 stored while its
job was deleted, a write cut short). The caps are applied again each time a job is stored or
completes. Running and queued jobs are never evicted, nor is the newest finished job: its
caller may still be reading it, even when it alone is over the byte cap.

A new job is refused (wanserve/api/serving.py: 507) while the data dir's file system has less
than `server.min_free_bytes` free.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from wanserve.api.jobs import JobStore

log = logging.getLogger("wanserve.api")

MAX_SWEEP_INTERVAL_S = 60
LEFTOVER_AGE_S = 60  # a file no job owns yet while its job is being stored is younger


@dataclass(frozen=True)
class StoreLimits:
    max_videos: int | None = None  # stored jobs, live ones included; None: no cap
    max_bytes: int | None = None  # bytes of the stored MP4s; None: no cap
    min_free_bytes: int = 0  # free space below which new jobs are refused


@dataclass
class SweepReport:
    expired: int = 0
    evicted: int = 0
    leftovers: int = 0


class Retention:
    def __init__(self, store: JobStore, limits: StoreLimits, on_evicted=None,
                 leftover_age_s: float = LEFTOVER_AGE_S):
        self.store = store
        self.limits = limits
        self.leftover_age_s = leftover_age_s
        self._on_evicted = on_evicted or (lambda count: None)
        self._lock = threading.Lock()  # one eviction pass at a time

    @property
    def sweep_interval_s(self) -> float:
        return max(1.0, min(MAX_SWEEP_INTERVAL_S, self.store.ttl_s / 4))

    def has_room(self) -> bool:
        if self.limits.min_free_bytes <= 0:
            return True
        return shutil.disk_usage(self.store.data_dir).free >= self.limits.min_free_bytes

    def sweep(self) -> SweepReport:
        return SweepReport(expired=self.store.expire(), evicted=self.enforce_caps(),
                           leftovers=self._remove_leftovers())

    def enforce_caps(self) -> int:
        """Evicts the oldest finished jobs until the store is within its caps; returns how many."""
        max_videos, max_bytes = self.limits.max_videos, self.limits.max_bytes
        if max_videos is None and max_bytes is None:
            return 0
        with self._lock:
            finished = self.store.finished_oldest_first()
            count = self.store.row_count()
            sizes = {job_id: self._video_size(video_file) for job_id, video_file in finished}
            stored = sum(sizes.values())
            evicted = 0
            for job_id, _ in finished[:-1]:  # the newest finished job is kept
                if not ((max_videos is not None and count > max_videos)
                        or (max_bytes is not None and stored > max_bytes)):
                    break
                if self.store.delete(job_id):
                    log.info("evicted job %s (stored jobs %d, MP4 bytes %d)", job_id, count, stored)
                    evicted += 1
                count -= 1
                stored -= sizes[job_id]
        if evicted:
            self._on_evicted(evicted)
        return evicted

    def _video_size(self, video_file: str | None) -> int:
        if not video_file:
            return 0
        try:
            return (self.store.video_dir / video_file).stat().st_size
        except FileNotFoundError:
            return 0

    def _remove_leftovers(self) -> int:
        """Files older than LEFTOVER_AGE_S that no stored job owns: MP4s whose job is gone,
        partial writes, kept inputs of jobs no longer live."""
        removed = 0
        for path in _old_entries(self.store.video_dir, self.leftover_age_s):
            job = None if path.name.startswith(".") else self.store.get(path.stem)
            if job is None or job.video_file != path.name:
                path.unlink(missing_ok=True)
                removed += 1
        for path in _old_entries(self.store.inputs.root, self.leftover_age_s):
            if not self.store.is_live(path.name):
                self.store.inputs.remove(path.name)  # a job's, or a `.partial` save's
                removed += 1
        if removed:
            log.info("removed %d file(s) no job owns", removed)
        return removed


def _old_entries(folder: Path, age_s: float) -> list[Path]:
    cutoff = time.time() - age_s
    entries = []
    for entry in os.scandir(folder):
        try:
            if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                entries.append(Path(entry.path))
        except FileNotFoundError:
            pass
    return entries
