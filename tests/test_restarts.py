"""Restarts that lose nothing: what was queued or running when the server went down runs again
after the restart, with the same video as a run that was never interrupted.

- the job store keeps each live job's inputs and gives back, after a restart, the jobs that were
  queued or running, in creation order (in-process, no server);
- SIGTERM with one job running, a synchronous caller's job queued and one more queued, and an
  extension of a finished video queued: the stop
  is prompt, the caller gets 503 `server_restarting` naming its job, the store holds all four
  as queued; after a restart on the same data dir the first runs again, and SIGKILL of the whole
  job (launcher and ranks) interrupts it with the others queued; after one more restart all
  four complete, equal to uninterrupted runs (lossless MP4s, decoded frames compared exactly),
  and a stop under repeated SIGTERMs exits 0;
- two "nodes" on 127.0.0.1 (two launch.sh, one rank each, c10d rendezvous, Ulysses 2 spanning
  them) with `--max-restarts 1`: the non-serving node's rank is SIGKILLed mid-job, torchrun
  starts every rank again, the job comes back and completes for a client polling across the
  restart, and the queued job completes;
- the same two nodes with one replica each (`--dp 2`): the rank of replica 1 is SIGKILLed while
  both replicas run a job; both jobs come back and complete.
"""
from __future__ import annotations

import base64
import json
import os
import signal
import sqlite3
import sys
import threading
import time

import requests

from conftest import free_port, png_bytes, rank_pids, start_server, wait_ready
from test_http_e2e import decode_frames
from test_jobs_lifecycle import submit, wait_first_step, wait_status

# lossless: the decoded frames are the generated ones, so "the same video" is exact
SMALL = {"size": "64x64", "num_frames": "5", "quality": "lossless"}
RUNNING = {**SMALL, "num_inference_steps": "12"}
# half a second a step: RUNNING is surely still running when it is interrupted (its 12 steps
# take 0.1 s unpaced)
PACED = {"WANSERVE_TEST_STEP_DELAY": "0.5"}
QUEUED = {**SMALL, "num_inference_steps": "3", "seed": "11"}


def as_json(srv, fields, prefer_async=True):
    """The request `submit` sends, with the image as a data: URL (nothing but fields to keep)."""
    body = {"prompt": "p", **fields,
            "input_reference": "data:image/png;base64," + base64.b64encode(png_bytes()).decode()}
    return requests.post(srv.url + "/v1/videos", json=body, timeout=300,
                         headers={"Prefer": "respond-async"} if prefer_async else {})


def content(srv, job_id) -> bytes:
    resp = requests.get(f"{srv.url}/v1/videos/{job_id}/content", timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.content


def extend(srv, source_id: str) -> dict:
    """An extension of `source_id` by QUEUED's new part, answered at once."""
    return requests.post(srv.url + "/v1/videos/extensions", headers={"Prefer": "respond-async"},
                         json={"prompt": "p", "video": {"id": source_id}, "num_frames": 5,
                               "num_inference_steps": 3, "seed": 11}, timeout=60).json()


def stored_statuses(data_dir) -> dict[str, str]:
    db = sqlite3.connect(data_dir / "jobs.sqlite3")
    try:
        return dict(db.execute("SELECT id, status FROM jobs").fetchall())
    finally:
        db.close()


def test_the_store_keeps_inputs_while_a_job_lives_and_gives_back_interrupted_jobs(tmp_path):
    """checked with: `_recover` returning the jobs in reverse creation order (`DESC`)."""
    from wanserve.api.jobs import Job, JobStore

    def job(n, status="queued"):
        return Job(id=f"video_{n:032x}", status=status, created_at=n, model="m", prompt="p",
                   seconds="1", size="64x64", seed=n, num_frames=5, fps=8)

    store = JobStore(tmp_path, ttl_s=60)
    for n in (3, 1, 2):
        store.add(job(n), {"prompt": f"p{n}", "seed": n}, {"input_reference": b"png%d" % n,
                                                          "../last_frame": b"x"})
    store.update(job(1).id, status="in_progress", attempts=1)
    store.add(job(4), {"prompt": "done"}, {})
    store.update(job(4).id, status="completed")
    assert store.inputs.load(job(4).id) is None  # removed when the job ended
    (store.inputs.root / ".video_partial.partial").mkdir()  # a save cut short
    store.close()

    again = JobStore(tmp_path, ttl_s=60)
    assert [j.id for j in again.interrupted] == [job(3).id, job(1).id, job(2).id]
    assert [(j.status, j.attempts) for j in again.interrupted] == [
        ("queued", 0), ("queued", 1), ("queued", 0)]
    assert again.inputs.load(job(1).id) == ({"prompt": "p1", "seed": 1},
                                            {"input_reference": b"png1", "../last_frame": b"x"})
    assert sorted(p.name for p in again.inputs.root.iterdir()) == sorted(
        j.id for j in again.interrupted)  # the file part names never became paths
    again.delete(job(2).id)
    assert again.inputs.load(job(2).id) is None
    again.close()


def test_sigterm_then_sigkill_lose_no_job_and_change_no_video(tmp_path):
    """One data dir, three starts. SIGTERM with a job running, a synchronous caller's job and
    one more queued; then SIGKILL of the whole job while the first runs again; then all three
    complete, equal to uninterrupted runs.
    checked with: `on_failed` handling `server_shutdown` as any failure (wanserve/api/serving.py): the
    jobs were stored `failed` and the caller got 500 `server_shutdown`; and the seed not pinned
    in the stored inputs (wanserve/api/serving.py create_job storing `fields` as sent): the job sent
    without a seed came back with another video; and (the last stop, SIGTERM every 2 ms)
    launch.sh taking the status of a `wait` a signal cut short, and running its trap again
    for each signal: exit 143, or 2 from bash itself, in most stops; and (the queued extension)
    "source_frames" left out of the job store's columns (wanserve/api/jobs.py): a finished
    extension read back from the store had lost it (None, not 5)."""
    data_dir = tmp_path / "data"
    first = start_server(tmp_path, data_dir=data_dir, env=PACED)
    answer = {}
    try:
        reference = as_json(first, QUEUED, prefer_async=False).json()  # never interrupted
        reference_video = content(first, reference["id"])
        running = submit(first, RUNNING).json()  # no seed: a random one, pinned
        wait_first_step(first, running["id"])
        caller = threading.Thread(
            target=lambda: answer.update(resp=submit(first, QUEUED, prefer_async=False)))
        caller.start()
        deadline = time.monotonic() + 30
        while len(requests.get(first.url + "/v1/videos", timeout=5).json()["data"]) < 3:
            assert time.monotonic() < deadline, "the synchronous job was never created"
            time.sleep(0.05)
        queued = as_json(first, QUEUED).json()  # its inputs: fields alone, the image in them
        extension = extend(first, reference["id"])  # its inputs hold the source MP4
    except BaseException:
        first.stop()
        raise
    start = time.monotonic()
    assert first.stop() == 0
    assert time.monotonic() - start < 30
    caller.join(10)
    resp = answer["resp"]
    assert resp.status_code == 503, resp.text
    error = resp.json()["error"]
    assert error["code"] == "server_restarting" and error["type"] == "server_error"
    statuses = stored_statuses(data_dir)
    del statuses[reference["id"]]
    assert len(statuses) == 4 and set(statuses.values()) == {"queued"}, statuses
    sync_id = next(job_id for job_id in statuses
                   if job_id not in (running["id"], queued["id"], extension["id"]))
    assert sync_id in error["message"]

    second = start_server(tmp_path, data_dir=data_dir, env=PACED)
    try:
        wait_first_step(second, running["id"])  # it goes first: it was submitted first
        ranks = rank_pids(second.proc.pid)
        assert ranks
    finally:
        os.killpg(second.proc.pid, signal.SIGKILL)  # a crash: nothing gets to clean up
        second.proc.wait()
    # the ranks run in sessions of their own: they must still die with the launcher
    deadline = time.monotonic() + 15
    while any(os.path.exists(f"/proc/{pid}") for pid in ranks.values()):
        assert time.monotonic() < deadline, f"ranks outlived the killed launcher: {ranks}"
        time.sleep(0.2)
    assert stored_statuses(data_dir)[running["id"]] == "in_progress"

    third = start_server(tmp_path, data_dir=data_dir)
    try:
        assert content(third, reference["id"]) == reference_video  # kept byte for byte
        for job_id, attempts in ((running["id"], 3), (sync_id, 1), (queued["id"], 1),
                                 (extension["id"], 1)):
            job = wait_status(third, job_id, ("completed", "failed"), timeout=180)
            assert job["status"] == "completed" and job["attempts"] == attempts, job
        for job_id in (sync_id, queued["id"]):
            assert (decode_frames(content(third, job_id))
                    == decode_frames(reference_video)).all()
        uninterrupted = submit(third, {**RUNNING, "seed": str(running["seed"])},
                                  prefer_async=False).json()
        assert uninterrupted["status"] == "completed"
        assert (decode_frames(content(third, running["id"]))
                == decode_frames(content(third, uninterrupted["id"]))).all()
        uninterrupted = extend(third, reference["id"])
        assert wait_status(third, uninterrupted["id"], ("completed",))["source_frames"] == 5
        assert (decode_frames(content(third, extension["id"]))
                == decode_frames(content(third, uninterrupted["id"]))).all()
        assert not list((data_dir / "inputs").iterdir())  # gone with the jobs
    finally:
        assert _stop_with_repeated_sigterms(third) == 0


def _stop_with_repeated_sigterms(srv, every_s: float = 0.002) -> int:
    """As a supervisor that sends SIGTERM until the process is gone: the exit code must still
    be torchrun's, not the signal's."""
    deadline = time.monotonic() + 45
    while srv.proc.poll() is None:
        assert time.monotonic() < deadline, srv.log()[-3000:]
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(every_s)
    return srv.proc.returncode


def _poll_across_restarts(nodes, job_id: str, timeout: float = 300) -> dict:
    """What a client does while the server restarts: retry until the job has ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert any(n.proc.poll() is None for n in nodes), (
            f"every launcher exited {[n.proc.returncode for n in nodes]}:\n"
            + "\n".join(f"--- node {i}:\n{n.log()[-6000:]}" for i, n in enumerate(nodes)))
        try:
            job = requests.get(f"{nodes[0].url}/v1/videos/{job_id}", timeout=5).json()
            if job.get("status") in ("completed", "failed", "cancelled"):
                return job
        except (requests.ConnectionError, requests.Timeout, json.JSONDecodeError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{job_id} did not end within {timeout}s")


def _two_nodes(tmp_path, *layout: str, env: dict | None = None):
    """Two launchers on 127.0.0.1, one rank each, one job through c10d; (nodes, the one that
    serves, {rank: pid} per node)."""
    port, rendezvous = free_port(), free_port()
    node = ("--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{rendezvous}", "--max-restarts", "1",
            *layout, "--collective-timeout", "30")
    nodes = [start_server(tmp_path, *node, data_dir=tmp_path / "data", port=port, wait=False,
                          env=env)
             for _ in range(2)]
    for srv in nodes:
        wait_ready(srv)
    where = [rank_pids(n.proc.pid) for n in nodes]
    assert sorted(rank for ranks in where for rank in ranks) == [0, 1], where
    # one URL for both; torchrun chose the node of rank 0, the one that serves and logs
    return nodes, next(n for n, ranks in zip(nodes, where) if 0 in ranks), where


def _stop_all(nodes) -> None:
    """Stop both launchers; both must exit 0 unless the test already failed (then its own
    assertion is the one to read, not this one's)."""
    failing = sys.exc_info()[0] is not None
    for n in nodes:
        if n.proc.poll() is None:
            n.proc.send_signal(signal.SIGTERM)
    codes = [n.stop() for n in nodes]
    assert failing or codes == [0, 0], [n.log()[-3000:] for n in nodes]


def test_two_nodes_one_replica_each_and_a_dead_replica_restarts_with_its_job(tmp_path):
    """DP2, one replica per node. A replica whose rank dies takes the whole job down (the
    choice README's "replicas" documents), torchrun starts every rank again, and both jobs
    that were running - one per replica - run again and complete.
    checked with: leader_loop not sending the job's outcome back (wanserve/engine/serving/replicas.py): rank 0
    loses the replica after the restart too, and the job took a third attempt."""
    nodes, srv, where = _two_nodes(tmp_path, "--dp", "2")
    try:
        health = requests.get(srv.url + "/health", timeout=5).json()
        assert health["parallel"]["layout"] == "2xU1R1C1"
        assert [r["ranks"] for r in health["replicas"]] == [[0], [1]]
        long = {**SMALL, "num_inference_steps": "40"}
        jobs = [submit(srv, {**long, "seed": str(seed)}).json()["id"] for seed in (1, 2)]
        deadline = time.monotonic() + 120
        while True:  # the job replica 1 runs, once it has run a step
            busy = requests.get(srv.url + "/health", timeout=5).json()["replicas"]
            on_1 = busy[1]["current_job"]
            if on_1 and wait_first_step(srv, on_1) is None:
                break
            assert time.monotonic() < deadline, busy
            time.sleep(0.05)
        os.kill(next(ranks[1] for ranks in where if 1 in ranks), signal.SIGKILL)
        for job_id in jobs:
            done = _poll_across_restarts(nodes, job_id)
            assert done["status"] == "completed", done
            # the job replica 1 ran started again; the other one too if it was still running
            assert done["attempts"] == 2 if job_id == on_1 else done["attempts"] in (1, 2), done
    finally:
        _stop_all(nodes)


def test_two_nodes_serve_u2_and_a_killed_rank_comes_back_with_max_restarts(tmp_path):
    """checked with: launch.sh passing `--max-restarts 0` to torchrun (every launcher exited),
    launch.sh giving torchrun `--standalone` whatever the flags (each launcher a one-rank job of
    its own: the U2 layout refused), and, before launch.sh set TORCH_DISABLE_SHARE_RDZV_TCP_STORE,
    the restarted rank 1 reading rank 0's old address (the job never came back)."""
    # paced: unpaced, the 12 steps take ~0.1 s on an idle machine, and the kill could land
    # after the job (or in its decode, or between the two jobs) depending on the machine's speed
    nodes, srv, where = _two_nodes(tmp_path, "--ulysses", "2", env=PACED)
    try:
        health = requests.get(srv.url + "/health", timeout=5).json()
        assert health["parallel"]["world_size"] == 2 and health["parallel"]["layout"] == "U2R1C1"

        running = submit(srv, RUNNING).json()
        wait_first_step(srv, running["id"])
        queued = submit(srv, QUEUED).json()
        rank1 = next(ranks[1] for ranks in where if 1 in ranks)
        os.kill(rank1, signal.SIGKILL)

        done = _poll_across_restarts(nodes, running["id"])
        assert done["status"] == "completed" and done["attempts"] == 2, done
        after = _poll_across_restarts(nodes, queued["id"], timeout=120)
        assert after["status"] == "completed" and after["attempts"] == 1, after
        assert "queued again after a restart" in srv.log()
    finally:
        _stop_all(nodes)
