"""--data-dir bounded: the store's caps, the sweep, and a full disk refusing new jobs."""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
import requests

from conftest import start_server
from test_jobs_lifecycle import QUICK, submit, wait_first_step, wait_status
from wanserve.api.jobs import Job, JobStore, new_job_id
from wanserve.api.retention import Retention, StoreLimits


def _stored_job(store: JobStore, status: str = "queued") -> Job:
    job = Job(id=new_job_id(), status="queued", created_at=int(time.time()), model="m",
              prompt="p", seconds="1", size="64x64", seed=0, num_frames=5, fps=8)
    store.add(job, {"prompt": "p"}, {"input_reference": b"png"})
    if status != "queued":
        store.update(job.id, status=status)
    return job


def _finish(store: JobStore, job: Job, status: str, ended_at: int, video_bytes: int = 0) -> None:
    video = store.save_video(job.id, b"\0" * video_bytes) if video_bytes else None
    store.update(job.id, status=status, completed_at=ended_at, video_file=video,
                 expires_at=ended_at + int(store.ttl_s) if video else None)


def _ids(store: JobStore) -> set[str]:
    return {job.id for job in store.list(None, 100, "asc")[0]}


def test_caps_evict_the_oldest_finished_first_and_never_a_live_job(tmp_path):
    """A real store on disk. The count cap counts every stored job, live ones too, and evicts
    finished ones by when they ended (not when they were created); the byte cap counts MP4s;
    the newest finished job stays even alone over the cap.
    checked with: `finished_oldest_first` selecting every status (wanserve/api/jobs.py): the
    running and queued jobs were evicted first (no `completed_at` sorts first)."""
    store = JobStore(tmp_path, ttl_s=3600)
    now = int(time.time())
    running = _stored_job(store, "in_progress")  # the oldest job of all
    done_first, failed, done_late = (_stored_job(store) for _ in range(3))
    queued = _stored_job(store)
    done_early = _stored_job(store)  # created after done_late, ends before it
    _finish(store, done_first, "completed", now - 50, 1000)
    _finish(store, failed, "failed", now - 40)
    _finish(store, done_early, "completed", now - 30, 1000)
    _finish(store, done_late, "completed", now - 20, 1000)

    by_count = Retention(store, StoreLimits(max_videos=4))
    assert by_count.enforce_caps() == 2
    assert _ids(store) == {running.id, queued.id, done_early.id, done_late.id}
    assert not (store.video_dir / f"{done_first.id}.mp4").exists()
    for live in (running, queued):
        assert store.is_live(live.id) and store.inputs.has(live.id)
    assert store.get(running.id).status == "in_progress" and store.get(queued.id).status == "queued"

    assert Retention(store, StoreLimits(max_bytes=1500)).enforce_caps() == 1
    assert _ids(store) == {running.id, queued.id, done_late.id}
    assert not (store.video_dir / f"{done_early.id}.mp4").exists()
    # alone over the cap, the newest finished job stays (its caller may be reading it)
    assert Retention(store, StoreLimits(max_videos=1, max_bytes=10)).enforce_caps() == 0
    assert _ids(store) == {running.id, queued.id, done_late.id}
    assert sorted(p.name for p in store.video_dir.iterdir()) == [f"{done_late.id}.mp4"]


def test_the_sweep_removes_expired_jobs_of_every_end_and_files_no_job_owns(tmp_path):
    """checked with: `expire` selecting only rows with an `expires_at` (wanserve/api/jobs.py,
    as before the sweep): the failed and cancelled rows stayed."""
    store = JobStore(tmp_path, ttl_s=10)
    now = int(time.time())
    old = [_stored_job(store) for _ in range(3)]
    for job, status in zip(old, ("completed", "failed", "cancelled")):
        _finish(store, job, status, now - 11, 100 if status == "completed" else 0)
    recent, live = _stored_job(store), _stored_job(store)
    _finish(store, recent, "failed", now - 5)
    orphan = store.video_dir / f"{new_job_id()}.mp4"
    orphan.write_bytes(b"x")
    partial = store.video_dir / f".{new_job_id()}.mp4.partial"
    partial.write_bytes(b"x")
    lost_inputs = store.inputs.root / new_job_id()
    lost_inputs.mkdir()
    fresh_orphan = store.video_dir / f"{new_job_id()}.mp4"
    fresh_orphan.write_bytes(b"x")
    long_ago = time.time() - 120
    for path in (orphan, partial, lost_inputs, store.inputs.root / live.id):
        os.utime(path, (long_ago, long_ago))

    report = Retention(store, StoreLimits(), leftover_age_s=60).sweep()
    assert (report.expired, report.leftovers) == (3, 3)
    assert _ids(store) == {recent.id, live.id}
    assert sorted(p.name for p in store.video_dir.iterdir()) == [fresh_orphan.name]
    assert [p.name for p in store.inputs.root.iterdir()] == [live.id]


MIN_FREE = 512 * 1024


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_caps_while_serving_and_a_full_disk_refuses_new_jobs_and_serves_the_rest(tmp_path):
    """One server on a 3 MiB tmpfs, `--max-stored-videos 4`, steps paced (0.1 s). Three finished
    jobs, then one running and three queued: each new job evicts the oldest finished one, the
    newest finished stays; the live ones are never touched and all complete. Then the disk is
    filled below `--min-free-bytes`: a new job is refused 507 `insufficient_storage` and not
    stored, while the stored video, the job, the listing and /health still answer; freed, the
    next job completes.
    checked with: `_require_room` made a no-op (wanserve/api/serving.py): the job was
    accepted and completed (200) with 256 KiB free."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], check=True)
    try:
        srv = start_server(tmp_path, "--max-stored-videos", "4", "--min-free-bytes",
                           str(MIN_FREE), data_dir=disk, env={"WANSERVE_TEST_STEP_DELAY": "0.1"})
        try:
            _caps_while_serving(srv)
            _full_disk(srv, disk)
        finally:
            assert srv.stop() == 0
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def _listed(srv) -> list[str]:
    return [job["id"] for job in
            requests.get(srv.url + "/v1/videos?order=asc&limit=100", timeout=5).json()["data"]]


def _caps_while_serving(srv) -> None:
    finished = [submit(srv, QUICK, prefer_async=False).json()["id"] for _ in range(3)]
    running = submit(srv, {**QUICK, "num_inference_steps": "40"}).json()["id"]
    wait_first_step(srv, running)
    queued = [submit(srv, QUICK).json()["id"] for _ in range(3)]
    # 7 jobs stored at most 4: the two oldest finished went, the newest finished stays
    assert _listed(srv) == [finished[2], running, *queued]
    assert requests.get(f"{srv.url}/v1/videos/{finished[0]}", timeout=5).status_code == 404
    statuses = [requests.get(f"{srv.url}/v1/videos/{job}", timeout=5).json()["status"]
                for job in (running, *queued)]
    assert statuses == ["in_progress", "queued", "queued", "queued"], statuses
    for job in (running, *queued):
        assert wait_status(srv, job, ("completed",), timeout=60)["status"] == "completed"
    assert _listed(srv) == [running, *queued]
    assert sorted(p.stem for p in (srv.data_dir / "videos").glob("*.mp4")) == sorted(
        [running, *queued])
    evicted = requests.get(srv.url + "/metrics", timeout=5).text
    assert "wanserve_evicted_total 3.0" in evicted


def _full_disk(srv, disk) -> None:
    kept = _listed(srv)[-1]
    video = requests.get(f"{srv.url}/v1/videos/{kept}/content", timeout=10)
    assert video.status_code == 200
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\1" * (shutil.disk_usage(disk).free - MIN_FREE // 2))
    before = _listed(srv)
    refused = submit(srv, QUICK, prefer_async=False)
    assert refused.status_code == 507, refused.text[:300]
    assert refused.json()["error"] == {
        "message": refused.json()["error"]["message"], "type": "server_error", "param": None,
        "code": "insufficient_storage"}
    assert "min_free_bytes" in refused.json()["error"]["message"]
    assert _listed(srv) == before
    assert not [p for p in (disk / "inputs").iterdir()]
    again = requests.get(f"{srv.url}/v1/videos/{kept}/content", timeout=10)
    assert again.status_code == 200 and again.content == video.content
    assert requests.get(f"{srv.url}/v1/videos/{kept}", timeout=5).json()["status"] == "completed"
    assert requests.get(srv.url + "/health", timeout=5).status_code == 200
    filler.unlink()
    assert submit(srv, QUICK, prefer_async=False).json()["status"] == "completed"


def test_a_job_deleted_while_its_video_is_encoded_leaves_no_mp4(tmp_path, monkeypatch):
    """The job goes away (a client's DELETE) after the encoder thread has checked it and before
    the MP4 is stored: no row names the file, so the caps could never evict it. The 2-minute
    soak found one such MP4 over its byte cap.
    checked with: the `completed is None` branch removed (wanserve/api/serving.py
    `_encode_and_complete`): the MP4 stayed in videos/."""
    import numpy as np

    from wanserve.api import serving
    from wanserve.api.metrics import Metrics
    from wanserve.engine.config import load_config
    from wanserve.engine.serving.request import GenerationResult

    store = JobStore(tmp_path, ttl_s=3600)
    service = serving.VideoService(load_config(["--data-dir", str(tmp_path)]), store, Metrics(lambda: 0))
    job = _stored_job(store, "in_progress")
    encode = serving.encode_mp4

    def deleted_while_encoding(*args, **kwargs):
        assert store.delete(job.id)
        return encode(*args, **kwargs)

    monkeypatch.setattr(serving, "encode_mp4", deleted_while_encoding)
    frames = np.zeros((5, 64, 64, 3), dtype=np.uint8)
    service._encode_and_complete(job.id, GenerationResult(frames))
    service.close()
    assert store.get(job.id) is None
    assert list(store.video_dir.iterdir()) == []
