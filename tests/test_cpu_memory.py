"""wanserve/engine/cpu/memory.py: after keep_freed_memory(), a step that makes the same large
temporaries over and over reuses pages already mapped; without it glibc unmaps or trims them
on free and each step faults them in again. Each case runs in a fresh interpreter, since
mallopt's settings are process-wide."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent

PROBE = """
import json, resource, sys, torch
from wanserve.engine.cpu.memory import keep_freed_memory
accepted = keep_freed_memory() if sys.argv[1] == "keep" else None

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def step():  # the same large temporaries each time, as each denoising step makes
    a, b = torch.ones(4 << 20), torch.ones(4 << 20)   # 16 MiB each
    c = torch.cat([a, b]); d = c * 2                  # 32 MiB each
    return float(torch.cat([c, d])[-1])               # 64 MiB

per_step = []
for _ in range(12):
    before = faults(); value = step(); per_step.append(faults() - before)
print(json.dumps({"accepted": accepted, "faults": per_step, "value": value}))
"""

PAGES_PER_STEP = ((16 + 16 + 32 + 32 + 64) << 20) // 4096


def probe(mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_without_page_faults():
    kept = probe("keep")
    assert kept["accepted"] is True and kept["value"] == 2.0
    # the first steps grow the heap, and now and then a step still finds no free block that
    # fits (fragmentation) and grows it again; most steps fault nothing
    assert statistics.median(kept["faults"][1:]) < PAGES_PER_STEP // 20, kept


def test_without_it_every_step_faults_its_temporaries_in_again():
    # the control: shows the probe tells the two apart on this machine
    default = probe("default")
    assert statistics.median(default["faults"][1:]) > PAGES_PER_STEP // 2, default


def test_health_reports_the_allocator(server):
    health = requests.get(server.url + "/health", timeout=5).json()
    assert health["cpu_tuning"]["allocator"] == "freed memory kept in the process"
