"""Shared fixtures: real servers started through ./launch.sh on free ports."""
from __future__ import annotations

import http.client
import hashlib
import io
import json
import os
import random
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import PIL.Image
import pytest
import requests

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 240

# Under pytest-xdist every worker runs a test file at once, each with its servers and torchrun
# jobs: a process taking every core for torch's threads then spins against the other worker's.
# Each worker's share of the cores instead, inherited by everything it starts (a one-rank
# server's video took 1.6x as long beside two busy processes with all threads as with one).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    _workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _workers))


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A free port below the kernel's ephemeral range. A port from bind(0) is an ephemeral one,
    and while a multi-rank server loads its model, its gloo connections take ephemeral ports
    too: one of them took the port a test had picked before Sanic could bind it."""
    low, high = _ephemeral_range()
    first, last = (20000, low) if low > 21000 else (high + 1, 65536)
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(first, last)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    data_dir: Path
    log_path: Path
    args: list = field(default_factory=list)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 45.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # launch.sh forwards it to the ranks
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def start_server(tmp: Path, *args: str, nproc: int = 1, data_dir: Path | None = None,
                 env: dict | None = None, wait: bool = True, port: int | None = None) -> Server:
    """`port`: a given one (the launchers of one job on several "nodes" share it)."""
    port = port or free_port()
    data_dir = data_dir or tmp / "data"
    log_path = tmp / f"server-{port}-{time.monotonic_ns()}.log"
    cmd = ["./launch.sh", "--nproc", str(nproc), "--port", str(port), "--data-dir", str(data_dir),
           *args]
    log_file = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, **(env or {})})
    server = Server(f"http://127.0.0.1:{port}", proc, data_dir, log_path, list(args))
    if wait:
        wait_ready(server)
    return server


def wait_ready(server: Server, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.log()[-4000:]}")
        try:
            if requests.get(server.url + "/health", timeout=2).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):  # not up yet; a loaded machine
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"server not ready after {timeout}s:\n{server.log()[-4000:]}")


def job_after_a_restart(tmp: Path, data_dir: Path, job_id: str, *flags: str) -> dict:
    """The job as the first answer of a one-rank server started on `data_dir` gives it: asked
    as soon as HTTP answers, while the model may still be loading (wanserve/api/resume.py settles the
    jobs that cannot run again before that)."""
    again = start_server(tmp, *flags, data_dir=data_dir, wait=False)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert again.proc.poll() is None, again.log()[-4000:]
            try:
                job = requests.get(f"{again.url}/v1/videos/{job_id}", timeout=5).json()
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, again.log()[-4000:]
                time.sleep(0.05)
        wait_ready(again)
        return job
    finally:
        assert again.stop() == 0


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the torchrun workers under launch.sh (RANK in their environment)."""
    pids, frontier = [], [launcher_pid]
    while frontier:
        out = subprocess.run(["pgrep", "-P", str(frontier.pop())], capture_output=True, text=True)
        children = [int(p) for p in out.stdout.split()]
        pids += children
        frontier += children
    ranks = {}
    for pid in pids:
        try:
            env = dict(item.split(b"=", 1) for item in
                       Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if b"RANK" in env and b"TORCHELASTIC_RUN_ID" in env:
            ranks[int(env[b"RANK"])] = pid
    return ranks


def logged_steps(server: Server, job_id: str) -> list[int]:
    """The steps rank 0 logged for a job while it was live (wanserve/api/serving.py on_progress)."""
    return [int(step) for step in
            re.findall(rf"job {job_id} \[[ #]*\] step (\d+)/\d+", server.log())]


def cancelled_steps(server: Server, job_id: str) -> dict[int, int]:
    """{rank: step} from each rank's "rank N: job X cancelled at step i/total" line."""
    return {int(rank): int(step) for rank, step in
            re.findall(rf"rank (\d+): job {job_id} cancelled at step (\d+)/", server.log())}


def metric(server: Server, sample: str) -> float:
    """One sample of /metrics, e.g. 'wanserve_jobs_total{status="cancelled"}'; 0 if absent."""
    text = requests.get(server.url + "/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


CANCELLED = 'wanserve_jobs_total{status="cancelled"}'


def assert_stopped_after_cancel(server: Server, job_id: str, ranks: int, total: int,
                                timeout: float = 60) -> int:
    """Every rank stopped the job at most one step after the last step rank 0 logged for it.

    The API calls Engine.cancel before it marks the job terminal, and rank 0 logs a step only
    while the job is live, so the cancel check of step `last` + 1 sees the cancel: stopping at
    `last` or `last + 1` is exact, however loaded the machine. Returns the step it stopped at.
    """
    deadline = time.monotonic() + timeout
    while len(stopped := cancelled_steps(server, job_id)) < ranks:
        assert time.monotonic() < deadline, (
            f"not every rank cancelled {job_id}: {stopped}\n{server.log()[-3000:]}")
        time.sleep(0.05)
    last = logged_steps(server, job_id)[-1]
    assert set(stopped) == set(range(ranks)) and len(set(stopped.values())) == 1, stopped
    step = stopped[0]
    assert last <= step <= last + 1, f"stopped at step {step}, last logged {last}"
    assert step < total - 5, f"the job was nearly done ({step}/{total}): make it longer"
    return step


def png_bytes(width: int = 160, height: int = 120, seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(pixels).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def assert_client_error(status: int, body: bytes, what: str) -> dict:
    """A 4xx with the OpenAI error shape {"error": {"message", "type", "param", "code"}}."""
    assert 400 <= status < 500, f"{what}: {status} {body[:300]!r}"
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, what
    assert isinstance(error["message"], str) and error["message"], what
    assert isinstance(error["type"], str) and error["type"], what
    assert error["param"] is None or isinstance(error["param"], str), what
    assert error["code"] is None or isinstance(error["code"], str), what
    return error


def raw_request(server, method: str, target: str, headers: dict | None = None,
                body: bytes | None = None) -> tuple[int, dict, bytes]:
    """`target` exactly as it goes on the request line."""
    url = urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One single-rank tiny server shared by the HTTP tests."""
    srv = start_server(tmp_path_factory.mktemp("server"))
    yield srv
    code = srv.stop()
    assert code == 0, f"server exited with {code}:\n{srv.log()[-3000:]}"


API_KEY = "wanserve-test-key"


@pytest.fixture(scope="session")
def keyed_server(tmp_path_factory):
    """One single-rank tiny server started with --api-key API_KEY, its steps and decoded
    chunks paced (0.2 s each) so that a client sees every step and reads a streamed video while
    it is decoded; started without waiting: wait_ready(keyed_server)."""
    srv = start_server(tmp_path_factory.mktemp("keyed"), "--api-key", API_KEY, wait=False,
                       env={"WANSERVE_TEST_STEP_DELAY": "0.2",
                            "WANSERVE_TEST_DECODE_DELAY": "0.2"})
    yield srv
    code = srv.stop()
    assert code == 0, f"server exited with {code}:\n{srv.log()[-3000:]}"


def run_offline(tmp_path: Path, nproc: int, requests: list, *flags: str,
                pythonpath: str = "") -> tuple[dict, dict]:
    """`wanserve.engine.serving.offline` under torchrun (no HTTP, the server's engine code): rank 0's float
    frames {"frames_<i>": array} and its report (layout, world size, timings)."""
    requests_file = tmp_path / "requests.json"
    requests_file.write_text(json.dumps(requests))
    tag = hashlib.sha256(json.dumps([nproc, requests, flags]).encode()).hexdigest()[:10]
    out = tmp_path / f"frames-{tag}.npz"
    cmd = [str(REPO / ".venv/bin/torchrun"), "--standalone", "--nproc-per-node", str(nproc),
           "-m", "wanserve.engine.serving.offline", "--requests", str(requests_file), "--out", str(out), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{pythonpath}:{REPO}" if pythonpath else str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with np.load(out) as data:
        frames = {key: data[key] for key in data.files}
    return frames, json.loads(Path(f"{out}.json").read_text())


def torchrun_script(script: str, nproc: int, *args: str, timeout: float = 300) -> dict:
    """Run a test file as a torchrun job (its `__main__` does the check); the JSON its rank 0
    prints last."""
    cmd = [str(REPO / ".venv/bin/torchrun"), "--standalone", "--nproc-per-node", str(nproc),
           script, *args]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# The files that run longest go first (measured in `make test`, longest first): under
# `--dist loadfile --no-loadscope-reorder` a worker takes the next file as it frees up, so a
# long file at the end of the order would keep one worker busy alone.
LONGEST_FIRST = ("test_compile.py", "test_soak.py", "test_multirank_equivalence.py",
                 "test_step_cache.py", "test_rank_failure.py", "test_restarts.py")


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: every other file keeps its order
