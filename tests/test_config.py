"""wanserve/engine/config.py: the CPU test vehicle's keys live under one `cpu:` section; the keys the
presets had before are still read, with a warning.

Checked with: mapping `memory.keep_freed_cpu_memory` to the wrong key (the value test fails);
dropping the warning (the warning tests fail)."""
from __future__ import annotations

import warnings

import pytest

from conftest import REPO
from wanserve.engine.config import CpuSettings, load_config


def preset(tmp_path, extra: str) -> str:
    text = (REPO / "configs" / "tiny.yaml").read_text().split("\n# The CPU test vehicle")[0]
    path = tmp_path / "preset.yaml"
    path.write_text(text + "\n" + extra)
    return str(path)


def test_presets_have_the_cpu_section_and_it_can_be_switched_off():
    assert load_config([]).cpu == CpuSettings(tuning=True, shared_memory=True,
                                              keep_freed_memory=True)
    assert not load_config(["--set", "cpu.tuning=false"]).cpu.tuning


def test_old_keys_are_read_with_a_warning(tmp_path):
    path = preset(tmp_path, "memory:\n  keep_freed_cpu_memory: false\n")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cfg = load_config(["--config", path, "--set", "parallel.cpu_shared_memory=false"])
    assert sorted(str(w.message).split(": use ")[1] for w in seen
                  if w.category is FutureWarning) == ["cpu.keep_freed_memory", "cpu.shared_memory"]
    assert cfg.cpu == CpuSettings(tuning=True, shared_memory=False, keep_freed_memory=False)


def test_the_cpu_section_wins_over_an_old_key(tmp_path):
    path = preset(tmp_path, "cpu:\n  shared_memory: true\n")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        cfg = load_config(["--config", path, "--set", "parallel.cpu_shared_memory=false"])
    assert cfg.cpu.shared_memory


def test_removed_and_unknown_keys(tmp_path):
    with pytest.warns(FutureWarning, match="pin_cpu_cores is no longer used"):
        load_config(["--set", "parallel.pin_cpu_cores=true"])
    with pytest.raises(SystemExit, match="unknown key.*pin_cores"):
        load_config(["--set", "cpu.pin_cores=true"])


def test_more_local_ranks_than_gpus_is_refused_before_loading(monkeypatch):
    """Checked with: the count comparison removed (nothing raised)."""
    import torch

    from wanserve.engine import startup
    from wanserve.engine.parallel.layout import LayoutError

    monkeypatch.setattr(startup, "gpu_usable", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    startup.check_devices(4)
    with pytest.raises(LayoutError, match="8 ranks on this host but 4 GPU"):
        startup.check_devices(8)
    monkeypatch.setattr(startup, "gpu_usable", lambda: False)
    startup.check_devices(8)  # CPU ranks share the cores


def test_create_response_from_yaml_and_flag(tmp_path):
    """checked with: `pick("create_response", "sync")` replaced by "sync" (the YAML value and
    the flag are ignored)."""
    assert load_config([]).create_response == "sync"
    path = preset(tmp_path, "server:\n  create_response: async\n")
    assert load_config(["--config", path]).create_response == "async"
    assert load_config(["--config", path, "--create-response", "sync"]).create_response == "sync"
    with pytest.raises(SystemExit, match="create_response must be one of"):
        load_config(["--set", "server.create_response=later"])
