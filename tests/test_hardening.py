"""Auth, hostile clients and machine faults: refused cleanly, nothing lost, server alive."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess

import openai
import pytest
import requests

from conftest import (API_KEY, REPO, assert_client_error, png_bytes, raw_request, start_server,
                      wait_ready)
from test_jobs_lifecycle import QUICK, submit


def test_api_key_guards_v1_routes_but_not_health(keyed_server):
    """checked with (the traversal part): the get_video route made `<video_id:path>` and its
    body `raw((service.store.video_dir / video_id).read_bytes())`, a route that reads a file
    by id: the first target answered 200 with /etc/passwd."""
    srv = keyed_server
    wait_ready(srv)
    assert requests.get(srv.url + "/health", timeout=5).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        resp = requests.get(srv.url + "/v1/videos", headers=headers, timeout=5)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong").videos.list()
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=API_KEY, max_retries=0)
    video = client.videos.create(prompt="p", extra_body=QUICK,
                                 input_reference=("r.png", png_bytes(), "image/png"))
    assert video.status == "completed"
    # on the request line as written (requests would send /etc/passwd); enough `../` to
    # reach / from any --data-dir
    up = "../" * 16
    for target in (f"/v1/videos/{up}etc/passwd", f"/v1/videos/{up}etc/passwd/content",
                   f"/v1/videos/{up.replace('/', '%2f')}etc%2fpasswd/content"):
        status, _, body = raw_request(srv, "GET", target,
                                      {"Authorization": f"Bearer {API_KEY}"})
        assert status in (400, 404), (target, status)
        assert_client_error(status, body, target)
        assert b"root:" not in body


def _routes() -> list[tuple[str, str]]:
    """(method, path) of every route, from the app's own routing table (create_app), so that
    a route added later is checked without anyone listing it here."""
    from wanserve.api.app import create_app
    from wanserve.engine.config import load_config

    app = create_app(load_config(["--api-key", API_KEY]), None)
    return sorted({(method, route.uri) for route in app.router.routes for method in route.methods})


OPEN_ROUTES = {"/", "/health", "/metrics", "/openapi.json", "/static/<__file_uri__:path>"}
CONTENT_VARIANTS = ("", "?variant=video", "?variant=thumbnail", "?variant=spritesheet")


def test_every_v1_route_and_method_needs_the_key_and_only_those(keyed_server):
    """Each (method, route) of /v1/ answers 401 `invalid_api_key` without the key or with a
    wrong one, and something else with it; `/`, `/static/*` and `/health` answer without one.
    checked with: the auth check skipping paths that end in "/events" (wanserve/api/app.py
    `authenticate`): GET /v1/videos/{id}/events answered 404 without a key."""
    srv = keyed_server
    wait_ready(srv)
    routes = _routes()
    guarded = [(m, uri) for m, uri in routes if uri.startswith("/v1/")]
    assert {uri for _, uri in routes} - {uri for _, uri in guarded} == OPEN_ROUTES
    assert len(guarded) >= 8, guarded  # create, sync, list, retrieve, events, content, delete, models
    for method, uri in guarded:
        path = re.sub(r"<[^>]+>", "video_0000", uri)
        for query in CONTENT_VARIANTS if uri.endswith("/content") else ("",):
            target = path + query
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
                status, _, body = raw_request(srv, method, target, headers)
                assert status == 401, (method, target, headers, status, body[:200])
                assert json.loads(body)["error"]["code"] == "invalid_api_key", (method, target)
            status, _, body = raw_request(srv, method, target,
                                          {"Authorization": f"Bearer {API_KEY}"})
            assert status != 401, (method, target, body[:200])
    for target in ("/", "/health", "/static/playground.js"):
        status, _, _ = raw_request(srv, "GET", target)
        assert status == 200, (target, status)


def test_client_that_vanishes_mid_upload_does_not_hurt_the_server(server):
    body = b"--b\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx\r\n"
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as s:
            s.sendall(b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data;"
                      b" boundary=b\r\nContent-Length: 1000000\r\n\r\n" + body)
    assert requests.get(server.url + "/health", timeout=5).status_code == 200
    assert submit(server, QUICK, prefer_async=False).json()["status"] == "completed"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_disk_fails_the_job_and_the_server_lives(tmp_path):
    """A write that fails for want of room (no free-space threshold: `--min-free-bytes 0`;
    the threshold's refusal is tests/test_disk_bounds.py's)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(disk)], check=True)
    try:
        srv = start_server(tmp_path, "--min-free-bytes", "0", data_dir=disk)
        try:
            filler = disk / "filler"
            room = shutil.disk_usage(disk).free - 24 * 1024  # leave too little for a video
            with open(filler, "wb") as f:
                f.write(b"\1" * room)
            resp = submit(srv, {"size": "256x256", "num_frames": "9"}, prefer_async=False)
            assert resp.status_code == 507, resp.text
            assert resp.json()["error"]["code"] == "insufficient_storage"
            assert requests.get(srv.url + "/health", timeout=5).status_code == 200
            filler.unlink()
            assert submit(srv, QUICK, prefer_async=False).json()["status"] == "completed"
        finally:
            assert srv.stop() == 0
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_concurrent_clients_all_end_completed_or_429(tmp_path):
    out = tmp_path / "load.json"
    proc = subprocess.run([str(REPO / ".venv/bin/python"), "benchmarks/load_test.py",
                           "--clients", "16", "--requests-per-client", "2", "--max-queue", "3",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["outcomes"]) <= {"completed", "429"}
    assert sum(result["outcomes"].values()) == 32
    assert result["outcomes"].get("completed", 0) >= 4 and result["outcomes"].get("429", 0) >= 1
    assert result["health_failures"] == 0 and result["server_exit_code"] == 0
