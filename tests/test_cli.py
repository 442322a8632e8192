"""The `wanserve` command (wanserve/api/cli.py), run as `python -m wanserve.api.cli` against a real server."""
from __future__ import annotations

import subprocess
import sys

import requests

from conftest import REPO, png_bytes, start_server
from test_http_e2e import decode_frames, stream_info
from test_jobs_lifecycle import QUICK, submit


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wanserve.api.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_generate_writes_the_mp4_and_follows_the_steps(server, tmp_path):
    """checked with: ("num_frames", args.num_frames) left out of the fields cmd_generate sends
    (the video has the preset's 9 frames)."""
    image = tmp_path / "first.png"
    image.write_bytes(png_bytes())
    out = tmp_path / "out.mp4"
    proc = cli("generate", str(image), "a lighthouse in a storm", "-o", str(out),
               "--server", server.url, "--size", "96x64", "--num-frames", "13", "--steps", "3",
               "--seed", "4", "--negative-prompt", "blurry")
    assert proc.returncode == 0, proc.stderr
    assert stream_info(out.read_bytes())[:3] == (13, 96, 64)
    for step in (1, 2, 3):
        assert f"step {step}/3" in proc.stderr, proc.stderr
    video_id = proc.stdout.split(", ")[1]
    job = requests.get(f"{server.url}/v1/videos/{video_id}", timeout=5).json()
    assert (job["seed"], job["num_inference_steps"], job["status"]) == (4, 3, "completed")


def test_generate_sends_a_last_frame(server, tmp_path):
    """The same request with and without --last-frame: the last frame changes the video.
    checked with: `files["last_frame"]` not set in cmd_generate (the two videos are equal)."""
    first, last = tmp_path / "first.png", tmp_path / "last.png"
    first.write_bytes(png_bytes(seed=1))
    last.write_bytes(png_bytes(seed=2))
    videos = []
    for extra in ((), ("--last-frame", str(last))):
        out = tmp_path / f"out{len(videos)}.mp4"
        proc = cli("generate", str(first), "p", "-o", str(out), "--server", server.url,
                   "--size", "64x64", "--num-frames", "5", "--steps", "2", "--seed", "3",
                   "--quality", "lossless", *extra)
        assert proc.returncode == 0, proc.stderr
        videos.append(decode_frames(out.read_bytes()))
    assert videos[0].shape == videos[1].shape == (5, 64, 64, 3)
    assert (videos[0] != videos[1]).any()
    missing = cli("generate", str(first), "p", "--server", server.url, "--last-frame",
                  str(tmp_path / "nope.png"))
    assert missing.returncode != 0 and "no such image" in missing.stderr


def test_list_get_and_delete(server):
    """checked with: cmd_delete printing without sending DELETE (the job is still there)."""
    video_id = submit(server, QUICK, prefer_async=False).json()["id"]
    listed = cli("list", "--server", server.url, "--limit", "100")
    assert listed.returncode == 0 and video_id in listed.stdout
    got = cli("get", video_id, "--server", server.url)
    assert got.returncode == 0 and f'"id": "{video_id}"' in got.stdout
    deleted = cli("delete", video_id, "--server", server.url)
    assert deleted.returncode == 0 and video_id in deleted.stdout
    assert requests.get(f"{server.url}/v1/videos/{video_id}", timeout=5).status_code == 404
    gone = cli("get", video_id, "--server", server.url)
    assert gone.returncode == 1 and f"no video with id '{video_id}'" in gone.stderr


def test_a_bad_request_exits_non_zero_with_the_servers_message(server, tmp_path):
    """checked with: main() returning 0 on a CLIError."""
    image = tmp_path / "first.png"
    image.write_bytes(png_bytes())
    proc = cli("generate", str(image), "p", "--server", server.url, "--size", "100x64")
    assert proc.returncode == 1
    assert "`width` has to be a multiple of 16, got 100" in proc.stderr, proc.stderr
    unreachable = cli("list", "--server", "http://127.0.0.1:9")
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr


def test_the_cli_starts_without_torch():
    """checked with: `import wanserve.api.params` added to wanserve/api/cli.py (it pulls torch in)."""
    code = "import sys, wanserve.api.cli; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_a_job_that_fails_exits_1_with_the_servers_reason(tmp_path):
    """The installed `wanserve` script against a server whose every job fails after its first
    step (the test-only failure hook), and against a refused request: exit 1 both times, with
    the server's message on stderr.
    checked with: cmd_generate printing the failed job's reason and returning 0."""
    image = tmp_path / "first.png"
    image.write_bytes(png_bytes())
    srv = start_server(tmp_path, env={"WANSERVE_TEST_FAIL_AT": "0:1"})
    try:
        script = str(REPO / ".venv/bin/wanserve")
        proc = subprocess.run([script, "generate", str(image), "p", "--server", srv.url,
                               "--size", "64x64", "--num-frames", "5", "--steps", "3",
                               "-o", str(tmp_path / "never.mp4")],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr
        assert "failed: generation failed: injected failure on rank 0 after step 1" in proc.stderr
        assert not (tmp_path / "never.mp4").exists()
        refused = subprocess.run([script, "generate", str(image), "p", "--server", srv.url,
                                  "--num-frames", "6"], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1
        assert "wanserve: error:" in refused.stderr and "num_frames" in refused.stderr, refused.stderr
    finally:
        assert srv.stop() == 0
