"""schemathesis against the served OpenAPI spec: responses conform to the schemas of every
route, errors are never 5xx, schema-violating requests are refused, every schema-valid request
is accepted, undeclared methods get 405 with `Allow`, and most valid creates reach generation.

The server runs the tiny model with small limits (sides 32-48, 1-5 frames, 1-2 steps), so that
every valid value of every field, fps 1-60 included, is cheap to generate; the spec states
those limits, and schemathesis draws from their whole range. What JSON Schema cannot say (a
real image, `size` xor `width`/`height`, `seconds` x fps within the frame limit) the hooks in
tests/schemathesis_hooks.py make consistent for the schema-valid cases only.

Checked with: `guidance_scale`'s upper bound dropped from the spec (schemathesis sends g > 50,
the server's 400 fails positive_data_acceptance; rechecked at 12 examples an operation, where
the run makes about 150 schema-valid creates), and fps capped at 30 in wanserve/api/params.py
(fps 60 refused the same way).
"""
from __future__ import annotations

import json
import os
import subprocess
import time

import requests

from conftest import REPO, metric, png_bytes, start_server

LIMITS = {"min_side": 32, "max_side": 48, "max_pixels": 48 * 48, "max_frames": 5, "max_steps": 2}
DEFAULTS = {"num_frames": 5, "num_inference_steps": 2}  # tiny.yaml's are above those limits
COMPLETED = 'wanserve_jobs_total{status="completed"}'


def wait_idle(server, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = requests.get(server.url + "/health", timeout=5).json()
        if health["queue_depth"] == 0 and health["current_job"] is None:
            return
        time.sleep(0.5)
    raise AssertionError(f"jobs still running after {timeout}s")


def test_schemathesis_finds_nothing_and_valid_creates_reach_generation(tmp_path):
    flags = [arg for section, values in (("limits", LIMITS), ("defaults", DEFAULTS))
             for key, value in values.items() for arg in ("--set", f"{section}.{key}={value}")]
    server = start_server(tmp_path, *flags)
    try:
        creates = tmp_path / "creates.txt"
        source = requests.post(server.url + "/v1/videos", timeout=300, data={
            "prompt": "p", "size": "48x48", "num_frames": "5", "num_inference_steps": "2"},
            files={"input_reference": ("r.png", png_bytes(), "image/png")}).json()
        env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
               "PYTHONPATH": str(REPO / "tests"), "FUZZ_CREATES": str(creates),
               "FUZZ_LIMITS": json.dumps({**LIMITS, "fps": 8}),  # tiny.yaml's default fps
               "FUZZ_SOURCE": source["id"]}  # the video that extensions continue
        cmd = [str(REPO / ".venv/bin/schemathesis"), "run", server.url + "/openapi.json",
               "--max-examples", "12", "--phases", "examples,coverage,fuzzing", "--seed", "1",
               "--generation-database", "none", "--request-timeout", "120"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path,
                              env=env)
        # one line per schema-valid create: "status media-type [refusal]"
        lines = creates.read_text().splitlines() if creates.exists() else []
        refused = [line for line in lines if line.split()[0] not in ("200", "202")]
        # the report's curl lines carry the PNG: the refusals say more
        assert proc.returncode == 0, "\n".join(refused[:5]) or proc.stdout[-6000:]
        assert "No issues found" in proc.stdout
        assert len(lines) >= 50 and not refused, refused
        wait_idle(server)
        completed = metric(server, COMPLETED)
        print(f"{len(lines)} schema-valid creates, {completed:.0f} videos generated")
        assert completed >= 0.9 * len(lines), (completed, len(lines))
    finally:
        assert server.stop() == 0
