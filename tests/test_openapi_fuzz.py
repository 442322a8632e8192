"""schemathesis against the served OpenAPI spec: responses conform, errors are never 5xx,
schema-violating requests are refused, undeclared methods get 405 with `Allow`.

The positive-acceptance check is left out on purpose: which bytes form an image, and the
cross-field rules (`size` xor `width`/`height`, `num_frames` xor `seconds`, the pixel budget),
cannot be stated in JSON Schema, so a schema-valid request can still be a correct 400/415."""
from __future__ import annotations

import subprocess

from conftest import REPO


def test_schemathesis_finds_nothing(server, tmp_path):
    cmd = [str(REPO / ".venv/bin/schemathesis"), "run", server.url + "/openapi.json",
           "--max-examples", "25", "--phases", "examples,coverage,fuzzing", "--seed", "1",
           "--exclude-checks", "positive_data_acceptance", "--generation-database", "none",
           "--request-timeout", "120"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert "No issues found" in proc.stdout
