"""The job store: job metadata in SQLite, MP4s as files under --data-dir.

Live jobs are kept in memory too, so per-step progress costs no disk write; every status
change is written through. Each live job's inputs are kept too (wanserve/api/job_inputs.py), until it
ends. On start-up, jobs that were queued or running when the previous process stopped come back
queued (`interrupted`), in creation order, for the service to run again.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from wanserve.api.job_inputs import JobInputs

log = logging.getLogger("wanserve.api")

TERMINAL = ("completed", "failed", "cancelled")

_COLUMNS = ("id", "created_ns", "status", "progress", "created_at", "completed_at", "expires_at", "model",
            "prompt", "seconds", "size", "seed", "num_frames", "fps", "error_code",
            "error_message", "timings", "video_file", "num_inference_steps", "quality",
            "peak_memory_mb", "peak_memory_kind", "attempts", "last_error", "cache",
            "extended_from", "source_frames", "stream")
# timings that are not a stage of their own (a mean, a total)
_NOT_STAGES = ("step_mean", "generate_total", "mp4_after_decode", "mp4_chunks")  # not own stages


@dataclass
class Job:
    id: str
    status: str
    created_at: int
    model: str
    prompt: str
    seconds: str
    size: str
    seed: int
    num_frames: int
    fps: int
    progress: int = 0
    completed_at: int | None = None
    expires_at: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    timings: dict = field(default_factory=dict)
    video_file: str | None = None
    num_inference_steps: int | None = None
    quality: str = "high"
    peak_memory_mb: float | None = None
    peak_memory_kind: str | None = None
    attempts: int = 0  # times the engine started it
    last_error: str | None = None  # why its last attempt ended without an end (not public)
    cache: dict | None = None  # the step cache's report (policy, preset, computed, cached)
    extended_from: str | None = None  # an extension: the id of the video it continues
    source_frames: int | None = None  # an extension: the frames taken from its source
    stream: bool = False  # a fragmented MP4, readable while it is written
    created_ns: int = field(default_factory=time.time_ns)  # total order for listing

    def public(self) -> dict:
        body = {k: v for k, v in asdict(self).items()
                if k not in ("error_code", "error_message", "video_file", "created_ns",
                             "last_error")}
        body["object"] = "video"
        body["error"] = ({"code": self.error_code, "message": self.error_message}
                         if self.error_code else None)
        body["remixed_from_video_id"] = None
        body["inference_time_s"] = self.timings.get("generate_total")
        body["stage_durations"] = {k: v for k, v in self.timings.items() if k not in _NOT_STAGES}
        return body


def new_job_id() -> str:
    return "video_" + secrets.token_hex(16)


def is_job_id(value: str) -> bool:
    return (value.startswith("video_") and len(value) == 38
            and all(c in "0123456789abcdef" for c in value[6:]))


class JobStore:
    def __init__(self, data_dir: Path, ttl_s: float):
        self.data_dir = Path(data_dir)
        self.video_dir = self.data_dir / "videos"
        self.video_dir.mkdir(parents=True, exist_ok=True)
        self.ttl_s = ttl_s
        self.inputs = JobInputs(self.data_dir / "inputs")
        self._lock = threading.RLock()  # guards _live and the one connection
        self._live: dict[str, Job] = {}
        self._db = sqlite3.connect(self.data_dir / "jobs.sqlite3", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"CREATE TABLE IF NOT EXISTS jobs ({', '.join(_COLUMNS)}, "
                         "PRIMARY KEY (id))")
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_order ON jobs (created_ns)")
        present = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for column in _COLUMNS:  # a data dir written before these columns existed
            if column not in present:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column}")
        self.interrupted = self._recover()

    def _recover(self) -> list[Job]:
        """The jobs the previous process left queued or running, live again as queued, in
        creation order; inputs of jobs no longer live (a save cut short) are dropped."""
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE status IN "
                                    "('queued', 'in_progress') ORDER BY created_ns").fetchall()
            jobs = [self._from_row(row) for row in rows]
            for job in jobs:
                job.status, job.progress = "queued", 0
                self._live[job.id] = job
                self._write(job)
        for name in self.inputs.job_ids():
            if name not in self._live:
                self.inputs.remove(name)
        return jobs

    def _write(self, job: Job) -> None:
        row = asdict(job)
        row["timings"] = json.dumps(job.timings)
        row["cache"] = None if job.cache is None else json.dumps(job.cache)
        placeholders = ", ".join("?" for _ in _COLUMNS)
        self._db.execute(f"INSERT OR REPLACE INTO jobs ({', '.join(_COLUMNS)}) VALUES "
                         f"({placeholders})", [row[c] for c in _COLUMNS])

    @staticmethod
    def _from_row(row) -> Job:
        values = dict(zip(_COLUMNS, row))
        values["timings"] = json.loads(values["timings"] or "{}")
        values["cache"] = json.loads(values["cache"]) if values["cache"] else None
        values["quality"] = values["quality"] or "high"
        values["attempts"] = values["attempts"] or 0
        values["stream"] = bool(values["stream"])
        return Job(**values)

    # --- writes ---------------------------------------------------------------------------
    def add(self, job: Job, fields: dict, files: dict[str, bytes]) -> None:
        """Store a new job with the inputs that can run it again (those first: a stored job
        always has them)."""
        self.inputs.save(job.id, fields, files)
        with self._lock:
            self._live[job.id] = job
            try:
                self._write(job)
            except BaseException:
                del self._live[job.id]
                self.inputs.remove(job.id)
                raise

    def update(self, job_id: str, persist: bool = True, **changes) -> Job | None:
        """Apply changes to a live job. If the write fails (a full disk), the job stays
        readable from memory with its new state, and the error is logged, not raised: the
        callers are engine callbacks that must still wake the job's waiters."""
        with self._lock:
            job = self._live.get(job_id)
            if job is None:
                return None
            for key, value in changes.items():
                setattr(job, key, value)
            if persist:
                try:
                    self._write(job)
                except sqlite3.Error as exc:
                    log.error("job %s: could not persist status %s: %s", job_id, job.status, exc)
                    return job
            if job.status in TERMINAL:
                del self._live[job_id]
                self.inputs.remove(job_id)
            return job

    def save_video(self, job_id: str, data: bytes) -> str:
        """Write the MP4 atomically; returns the file name stored with the job."""
        name = f"{job_id}.mp4"
        tmp = self.video_dir / f".{name}.partial"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.video_dir / name)
        except OSError:
            tmp.unlink(missing_ok=True)  # a full disk must not keep what little room is left
            raise
        return name

    def remove_video(self, name: str) -> None:
        """An MP4 that no job row names (its job went away while it was written)."""
        (self.video_dir / name).unlink(missing_ok=True)

    def delete(self, job_id: str) -> bool:
        with self._lock:
            self._live.pop(job_id, None)
            row = self._db.execute("SELECT video_file FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                return False
            self._db.execute("DELETE FROM jobs WHERE id=?", (job_id,))
        self.inputs.remove(job_id)
        if row[0]:
            (self.video_dir / row[0]).unlink(missing_ok=True)
        return True

    def expire(self, now: float | None = None) -> int:
        """Removes the finished jobs past their TTL: a completed one at its `expires_at`, a
        failed or cancelled one (no video, no `expires_at`) the TTL after it ended."""
        now = now if now is not None else time.time()
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM jobs WHERE status IN (?, ?, ?) AND "
                "COALESCE(expires_at, completed_at + ?) <= ?",
                (*TERMINAL, self.ttl_s, int(now))).fetchall()
        for (job_id,) in rows:
            self.delete(job_id)
        return len(rows)

    # --- reads ----------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        with self._lock:
            job = self._live.get(job_id)
            if job is not None:
                return job
            row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id=?",
                                   (job_id,)).fetchone()
        return self._from_row(row) if row else None

    def steps_queued_before(self, job: Job) -> list[int]:
        """The steps of each live job still queued that was created before `job`."""
        with self._lock:
            return [other.num_inference_steps or 0 for other in self._live.values()
                    if other.status == "queued" and other.created_ns < job.created_ns]

    def video_path(self, job: Job) -> Path | None:
        return self.video_dir / job.video_file if job.video_file else None

    def list(self, after: str | None, limit: int, order: str) -> tuple[list[Job], bool]:
        desc = order == "desc"
        sql = f"SELECT {', '.join(_COLUMNS)} FROM jobs"
        args: list = []
        with self._lock:
            anchor = after and self._db.execute("SELECT created_ns FROM jobs WHERE id=?",
                                                (after,)).fetchone()
        if anchor:
            sql += f" WHERE created_ns {'<' if desc else '>'} ?"
            args.append(anchor[0])
        sql += f" ORDER BY created_ns {'DESC' if desc else 'ASC'} LIMIT ?"
        args.append(limit + 1)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
            jobs = [self._live.get(r[0]) or self._from_row(r) for r in rows]
        return jobs[:limit], len(jobs) > limit

    def finished_oldest_first(self) -> list[tuple[str, str | None]]:
        """(id, video file) of every finished job, the one that ended first first."""
        with self._lock:
            return self._db.execute("SELECT id, video_file FROM jobs WHERE status IN (?, ?, ?) "
                                    "ORDER BY completed_at, created_ns", TERMINAL).fetchall()

    def is_live(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._live

    def row_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return dict(rows)

    def close(self) -> None:
        with self._lock:
            self._db.close()
