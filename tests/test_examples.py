"""examples/online_serving/image_to_video against a real server, started with its
run_server.sh from another directory: each client runs as a subprocess from a temporary
directory too, and its MP4 is decoded with PyAV.

Each test was seen to fail with the behaviour broken by one line, then restored:
- test_curl_sync: curl_sync.sh without `-F "num_frames=$NUM_FRAMES"` (9 frames, not 5).
- test_curl_async: curl_async.sh without the `Prefer: respond-async` header (HTTP 200, not 202).
- test_openai_sdk_client: openai_sdk_client.py without "num_frames" in extra_body.
- test_bad_request_exits_with_the_servers_message[...]: each client printing the server's
  message to stderr but exiting 0 (curl_sync.sh: `sys.exit(print(..., file=sys.stderr))`
  for `sys.exit(...)`; curl_async.sh: the same, which then polls with no id until the
  subprocess timeout; openai_sdk_client.py: `return 0` for `return 1` after an HTTP error);
  and curl_sync.sh printing a fixed message instead of the server's.
- test_extend_clients_continue_an_uploaded_mp4_then_a_video_by_id: extend_curl.sh sending a
  file as an id (`if [ -f "$VIDEO" ]` → `if false`: HTTP 404), and extend_sdk.py without
  "num_frames" in extra_body (17 frames, not 13).
- the module's server fixture (every test errors): run_server.sh resolving the repository
  as `../..` from its folder instead of `../../..`; its teardown assertion: run_server.sh
  running launch.sh as a child without `exec` (SIGTERM stops the script, not the ranks).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import av
import numpy as np
import pytest

from conftest import REPO, Server, free_port, wait_ready
from wanserve.api.video import encode_mp4

EXAMPLES = REPO / "examples" / "online_serving" / "image_to_video"
SIZE, NUM_FRAMES = (96, 64), 5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The tiny model through run_server.sh, as conftest.start_server does through launch.sh."""
    tmp = tmp_path_factory.mktemp("examples-server")
    port, log_path = free_port(), tmp / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([EXAMPLES / "run_server.sh", "--port", str(port),
                                 "--data-dir", str(tmp / "data")],
                                cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    srv = Server(f"http://127.0.0.1:{port}", proc, tmp / "data", log_path)
    wait_ready(srv)
    yield srv
    code = srv.stop()  # SIGTERM to run_server.sh has to reach launch.sh and stop every rank
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever a broken run_server.sh left running
    except ProcessLookupError:
        pass
    assert code == 0, f"run_server.sh exited with {code}:\n{srv.log()[-3000:]}"


def run_client(command: list, server: Server, cwd, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("IMAGE", "PROMPT", "SEED", "SIZE", "NUM_FRAMES", "STEPS", "OUT",
                            "VIDEO")}
    environ.update({"SERVER": server.url, "SIZE": f"{SIZE[0]}x{SIZE[1]}",
                    "NUM_FRAMES": str(NUM_FRAMES), "STEPS": "2", "SEED": "3", **env})
    return subprocess.run(command, cwd=cwd, env=environ, capture_output=True, text=True,
                          timeout=120)


def assert_video(path) -> None:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(video=0))
        assert (frames, stream.width, stream.height) == (NUM_FRAMES, *SIZE)


def test_curl_sync(server, tmp_path):
    out = tmp_path / "sync.mp4"
    done = run_client([EXAMPLES / "curl_sync.sh"], server, tmp_path, OUT=str(out))
    assert done.returncode == 0, done.stderr
    assert "seed 3" in done.stdout
    assert_video(out)


def test_curl_async(server, tmp_path):
    out = tmp_path / "async.mp4"
    done = run_client([EXAMPLES / "curl_async.sh"], server, tmp_path, OUT=str(out))
    assert done.returncode == 0, done.stderr
    assert "completed 100%" in done.stdout
    assert_video(out)


def test_openai_sdk_client(server, tmp_path):
    out = tmp_path / "sdk.mp4"
    done = run_client([sys.executable, EXAMPLES / "openai_sdk_client.py"], server, tmp_path,
                      OUT=str(out))
    assert done.returncode == 0, done.stderr
    assert_video(out)


@pytest.mark.parametrize("client", ["curl_sync.sh", "curl_async.sh", "openai_sdk_client.py"])
def test_bad_request_exits_with_the_servers_message(server, tmp_path, client):
    command = [sys.executable] if client.endswith(".py") else []
    out = tmp_path / "never.mp4"
    done = run_client([*command, EXAMPLES / client], server, tmp_path, SIZE="7x7", OUT=str(out))
    assert done.returncode != 0
    assert "HTTP 400: `width` has to be a multiple of 16, got 7" in done.stderr, done.stderr
    assert not out.exists()


def frame_count(path) -> tuple[int, int, int]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for _ in container.decode(video=0)), stream.width, stream.height


def test_extend_clients_continue_an_uploaded_mp4_then_a_video_by_id(server, tmp_path):
    """extend_curl.sh uploads a 5-frame MP4 (5 + 5 - 1 frames); extend_sdk.py extends the
    result by its id (9 + 5 - 1); an unknown id exits non-zero with the server's message.
    checked with: extend_curl.sh sending a file as an id (`if false`, 404), and extend_sdk.py
    without "num_frames" in extra_body (17 frames, not 13)."""
    first, extended, again = (tmp_path / f"{name}.mp4" for name in ("first", "ext", "again"))
    pixels = np.random.default_rng(0).integers(0, 256, (5, SIZE[1], SIZE[0], 3), np.uint8)
    first.write_bytes(encode_mp4(pixels, 8))
    done = run_client([EXAMPLES / "extend_curl.sh"], server, tmp_path, VIDEO=str(first),
                      OUT=str(extended))
    assert done.returncode == 0, done.stderr
    assert frame_count(extended) == (9, *SIZE)
    assert "(5 from the upload)" in done.stdout, done.stdout
    video_id = done.stdout.split(": ", 1)[1].split()[0]
    done = run_client([sys.executable, EXAMPLES / "extend_sdk.py"], server, tmp_path,
                      VIDEO=video_id, OUT=str(again))
    assert done.returncode == 0, done.stderr
    assert frame_count(again) == (13, *SIZE)
    done = run_client([EXAMPLES / "extend_curl.sh"], server, tmp_path, VIDEO="video_" + "0" * 32,
                      OUT=str(tmp_path / "never.mp4"))
    assert done.returncode != 0 and "HTTP 404: no video with id" in done.stderr, done.stderr
