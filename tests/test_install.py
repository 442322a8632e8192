"""A fresh install works and stays working: import names of wanserve's own, and a lock that
agrees with pyproject.toml (tools/lock.py, the Makefile's `install` and `lock`)."""
from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import requests

from conftest import REPO, png_bytes

sys.path.insert(0, str(REPO / "tools"))
import lock  # noqa: E402

VENV_PYTHON = str(REPO / ".venv/bin/python")


def _importable_at_the_root() -> set[str]:
    """Names the checkout's root makes importable as regular modules or packages: the root is
    first on sys.path for `python -m`, pytest and torchrun, so each of these shadows any
    installed distribution of the same name (a folder without __init__.py does not)."""
    names = set()
    for entry in REPO.iterdir():
        if entry.is_dir() and (entry / "__init__.py").exists():
            names.add(entry.name)
        elif entry.suffix == ".py":
            names.add(entry.stem)
    return names


def test_the_only_import_name_is_wanserve_and_no_other_distribution_has_it():
    """checked with: a `kernels/__init__.py` at the root again (the name Hugging Face's kernels
    package, which transformers imports at start, has)."""
    assert _importable_at_the_root() == {"wanserve"}
    others = {dist.metadata["Name"] for dist in metadata.distributions()
              if dist.metadata["Name"] and dist.metadata["Name"].lower() != "wanserve"
              and "wanserve" in (dist.read_text("top_level.txt") or "").split()}
    assert not others, f"another distribution installs `wanserve`: {others}"
    assert metadata.entry_points(group="console_scripts", name="wanserve")
    (script,) = metadata.entry_points(group="console_scripts", name="wanserve")
    assert script.value == "wanserve.api.cli:main"


def test_serves_with_hugging_face_kernels_installed(server):
    """transformers (5.25 on) imports Hugging Face's `kernels` at start; from the checkout, as
    every rank runs, that name must reach the installed package, and the server must serve.
    checked with: a `kernels/__init__.py` at the root again (ImportError: cannot import name
    'CUDAProperties' from 'kernels')."""
    assert metadata.distribution("kernels").metadata["Name"] == "kernels"
    probe = ("import kernels, transformers.integrations.hub_kernels; "
             "from transformers import UMT5EncoderModel; print(kernels.__file__)")
    proc = subprocess.run([VENV_PYTHON, "-c", probe], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "site-packages" in proc.stdout, proc.stdout
    resp = requests.post(server.url + "/v1/videos", timeout=300,
                         data={"prompt": "kernels", "size": "64x64", "num_frames": "5",
                               "num_inference_steps": "2", "seed": "1"},
                         files={"input_reference": ("f.png", png_bytes(64, 64), "image/png")})
    assert resp.status_code == 200, resp.text[:500]
    assert resp.json()["status"] == "completed"


def test_the_lock_agrees_with_pyproject():
    """Every declared dependency (server, test and bench extras) is pinned within its range,
    and neither torch nor triton is pinned. checked with: `sanic>=25.3,<26` raised to `>=26`
    in pyproject.toml; a `torch==2.13.0` line added to requirements.lock."""
    assert lock.check() == []
    pinned = lock.pins((REPO / "requirements.lock").read_text())
    assert "torch" not in pinned and "triton" not in pinned
    assert not [name for name in pinned if name.startswith("nvidia-")]


def test_the_lock_check_finds_a_missing_pin_and_one_out_of_range(tmp_path):
    text = (REPO / "requirements.lock").read_text()
    missing = tmp_path / "missing.lock"
    missing.write_text("\n".join(line for line in text.splitlines()
                                 if not line.startswith("sanic==")))
    assert any("'sanic" in p and "not in" in p for p in lock.check(missing))
    outside = tmp_path / "outside.lock"
    outside.write_text(text.replace("\npydantic==", "\npydantic==1.10.0\n#") + "torch==2.13.0\n")
    problems = lock.check(outside)
    assert any("pydantic==1.10.0" in p for p in problems), problems
    assert any(p.startswith("torch is pinned") for p in problems), problems


def test_strip_drops_torch_and_triton_with_their_comments(tmp_path):
    compiled = tmp_path / "compiled.lock"
    compiled.write_text("# header\n\naccelerate==1.0\n    # via wanserve\ntorch==2.13.0+cpu\n"
                        "    # via\n    #   accelerate\n    #   wanserve\n"
                        'triton==3.9.0 ; platform_machine == "x86_64"\n    # via wanserve\n'
                        "zipp==3.0\n    # via importlib-metadata\n")
    lock.strip(compiled)
    assert compiled.read_text() == ("# header\n\naccelerate==1.0\n    # via wanserve\n"
                                    "zipp==3.0\n    # via importlib-metadata\n")


@pytest.mark.parametrize("have_torch", ["2.5.1+cu124"])
def test_a_gpu_box_keeps_what_its_python_has(monkeypatch, tmp_path, have_torch):
    """The system-torch path: packages the system already has are not constrained (pip leaves
    them), torch is held at the box's version, everything else is pinned as locked.
    checked with: `if name not in have` removed from tools/lock.py system_constraints."""
    compiled = tmp_path / "requirements.lock"
    compiled.write_text("sympy==1.14.0\n    # via torch\nsanic==25.12.1\n    # via wanserve\n")

    class Dist:
        def __init__(self, name, version):
            self.metadata, self.version = {"Name": name}, version

    monkeypatch.setattr(lock.metadata, "distributions",
                        lambda: [Dist("torch", have_torch), Dist("SymPy", "1.13.1")])
    assert lock.system_constraints(compiled) == f"torch=={have_torch}\nsanic==25.12.1\n"
