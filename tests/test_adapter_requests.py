"""The `lora` and `sample_solver` fields, adapter registration and the distilled presets,
without running the model (plus one HTTP server for the 400s and the --lora-dir cache).

Mutation checks (each made a test here fail, then was reverted):
- checked with: `lora_dir_file` without the `root not in resolved.parents` check:
  test_bad_lora_values_answer_400 fails (`../` path accepted).
- checked with: `DistilledEulerScheduler.set_timesteps` passing `num_inference_steps` instead
  of sigmas: test_distilled_grid_and_split fails.
- checked with: `Adapters._ensure_dynamic` without `move_to_end` (first in, first out):
  test_lora_dir_cache_evicts_the_least_recently_used fails (C evicts A, B is never loaded again:
  evicted [A], loaded [A, B, C]).
"""
from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import requests
from safetensors.torch import save_file

from conftest import assert_client_error, png_bytes, start_server
from wanserve.engine.adapters.choice import dynamic_name, resolve_lora
from wanserve.engine.adapters.lora import AdapterError, AdapterUse
from wanserve.engine.config import load_config
from lora_files import make_lora, write_diffusers


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    from wanserve.engine.model.tiny_model import ensure_tiny_model

    root = tmp_path_factory.mktemp("lora")
    (root / "dir").mkdir()
    lora = make_lora(ensure_tiny_model(), 1)
    write_diffusers(lora, root / "dir" / "dyn.safetensors")
    for seed, name in ((2, "A"), (3, "B"), (4, "C")):
        write_diffusers(make_lora(ensure_tiny_model(), seed), root / "dir" / f"{name}.safetensors")
    return write_diffusers(lora, root / "a.safetensors")


def test_lora_field_forms(lora_file):
    cfg = load_config(["--lora", f"a={lora_file}", "--lora", f"b={lora_file},{lora_file}"])
    assert resolve_lora(None, cfg) == ()
    assert resolve_lora("a", cfg) == (AdapterUse("a", 1.0, 1.0),)
    assert resolve_lora("a:0.5", cfg) == (AdapterUse("a", 0.5, 0.5),)
    assert resolve_lora("a:3:1.5, b", cfg) == (AdapterUse("a", 3.0, 1.5), AdapterUse("b", 1, 1))
    assert resolve_lora('{"name": "a", "scale_low": 2}', cfg) == (AdapterUse("a", 1.0, 2.0),)
    assert resolve_lora([{"name": "b", "scale": 0.3}], cfg) == (AdapterUse("b", 0.3, 0.3),)
    assert resolve_lora("none", cfg) == resolve_lora([], cfg) == ()


def test_fused_default_refuses_others(lora_file):
    cfg = load_config(["--lora", f"a={lora_file}", "--set", "loras.f.path=" + str(lora_file),
                       "--set", "loras.f.fuse=true"])
    assert resolve_lora(None, cfg) == (AdapterUse("f", 1.0, 1.0),)
    assert resolve_lora("f", cfg) == (AdapterUse("f", 1.0, 1.0),)
    for value in ("a", "f:0.5", "none"):
        with pytest.raises(AdapterError, match="fused"):
            resolve_lora(value, cfg)
    allowed = load_config(["--lora", f"a={lora_file}", "--set", f"loras.f.path={lora_file}",
                           "--set", "loras.f.fuse=true", "--set", "lora_unfuse_per_request=true"])
    assert resolve_lora("a", allowed) == (AdapterUse("a", 1.0, 1.0),)


def test_a_bad_file_stops_start_up_naming_it(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(SystemExit, match="missing.safetensors: not found"):
        load_config(["--lora", f"x={missing}"])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(SystemExit, match="garbage.safetensors: not a readable"):
        load_config(["--lora", f"x={garbage}"])
    import torch

    wrong = tmp_path / "wrong.safetensors"
    save_file({"model.weight": torch.zeros(2)}, str(wrong))
    with pytest.raises(SystemExit, match="wrong.safetensors: no LoRA key"):
        load_config(["--lora", f"x={wrong}"])


def test_distilled_grid_and_split(lora_file):
    """The Lightning presets on the tiny model's scheduler: UniPC with flow_shift 5 gives the
    [999, 937, 833, 625] grid, 2 high-noise + 2 low-noise steps at boundary 0.9; Euler gives
    the exact distilled sigmas."""
    from wanserve.engine.model.pipeline import DistilledEulerScheduler
    from wanserve.engine.model.tiny_model import ensure_tiny_model
    from diffusers import UniPCMultistepScheduler

    for preset in ("480p", "720p"):
        cfg = load_config(["--config", f"configs/wan2.2-i2v-a14b-lightning-{preset}.yaml",
                           "--model", "tiny", "--lora", f"lightning={lora_file},{lora_file}"])
        d = cfg.defaults
        assert (d.num_inference_steps, d.guidance_scale, d.guidance_scale_2, d.flow_shift,
                d.boundary_ratio) == (4, 1.0, 1.0, 5.0, 0.9)
        (spec,) = cfg.adapters  # the preset names the pair; the flag gives the files
        assert (spec.name, spec.high, spec.low, spec.fuse) == ("lightning", str(lora_file),
                                                               str(lora_file), True)
        assert d.sample_solver == "unipc"
    config = UniPCMultistepScheduler.load_config(ensure_tiny_model() / "scheduler")
    unipc = UniPCMultistepScheduler.from_config(config, flow_shift=5.0)
    unipc.set_timesteps(4)
    assert unipc.timesteps.tolist() == [999, 937, 833, 625]
    boundary = 0.9 * unipc.config.num_train_timesteps
    assert sum(t >= boundary for t in unipc.timesteps.tolist()) == 2
    euler = DistilledEulerScheduler(num_train_timesteps=1000, shift=5.0)
    euler.set_timesteps(4)
    np.testing.assert_allclose(euler.sigmas.numpy(), [1.0, 0.9375, 5 / 6, 0.625, 0.0], atol=1e-6)
    assert sum(t >= boundary for t in euler.timesteps.tolist()) == 2


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory, lora_file):
    srv = start_server(tmp_path_factory.mktemp("lora-server"), "--lora", f"a={lora_file}",
                       "--lora-dir", str(lora_file.parent / "dir"), "--lora-cache", "2")
    yield srv
    srv.stop()


def post(server, **fields):
    body = {"prompt": "waves", "size": "64x64", "num_frames": 5, "seed": 3,
            "num_inference_steps": 2, **fields}
    data = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in body.items()}
    return requests.post(server.url + "/v1/videos", data=data,
                         files={"input_reference": ("f.png", png_bytes(64, 64))}, timeout=120)


def test_bad_lora_values_answer_400(lora_server, lora_file):
    bad = ["nope", "a:abc", "a:1e9", "a:1:2:3", '{"name": "a", "scale": true}', "{oops",
           '[{"name": "a"}, {"name": "a"}]', '{"name": "x", "path": "../a.safetensors"}',
           json.dumps({"name": "x", "path": str(lora_file)}), '{"name": "x", "path": "none.txt"}',
           '{"name": "x", "path": "missing.safetensors"}', '{"scale": 1}']
    for value in bad:
        resp = post(lora_server, lora=value)
        error = assert_client_error(resp.status_code, resp.content, value)
        assert resp.status_code == 400 and error["param"] == "lora", (value, error)
    resp = post(lora_server, sample_solver="ddim")
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "sample_solver"
    for value in ("a:0.5", '{"name": "mine", "path": "dyn.safetensors", "scale": 0.5}', None):
        resp = post(lora_server, **({"lora": value} if value else {}), sample_solver="euler")
        assert resp.status_code == 200, (value, resp.text[:300])


def test_models_lists_the_adapters(lora_server):
    data = requests.get(lora_server.url + "/v1/models", timeout=10).json()["data"]
    assert data[0]["adapters"][0]["name"] == "a"
    assert [m["id"] for m in data[1:]] == ["a"] and data[1]["parent"] == data[0]["id"]
    health = requests.get(lora_server.url + "/health", timeout=10).json()
    assert health["adapters"]["loaded"]["transformer"] == ["a"]


def test_lora_dir_cache_evicts_the_least_recently_used(lora_server, lora_file):
    """--lora-cache 2, requests for A, B, A, C, B: C evicts B (used before A's second request),
    not A (loaded first); B's second request loads it again, and its video equals the first."""
    from test_http_e2e import decode_frames

    directory = lora_file.parent / "dir"
    names = {name: dynamic_name(str((directory / f"{name}.safetensors").resolve()))
             for name in "ABC"}
    start = len(lora_server.log())
    videos = []
    for name in "ABACB":
        resp = post(lora_server, lora=json.dumps({"name": name, "path": f"{name}.safetensors"}),
                    num_frames=1, num_inference_steps=1)
        assert resp.status_code == 200, resp.text[:300]
        videos.append(decode_frames(base64.b64decode(resp.json()["data"][0]["b64_json"])))
    log = lora_server.log()[start:]
    by_name = {v: k for k, v in names.items()}
    evicted = [by_name[n] for n in re.findall(r"LoRA (dir-\w+) evicted", log) if n in by_name]
    loaded = [by_name[n] for n in re.findall(r"LoRA (dir-\w+) loaded", log) if n in by_name]
    assert evicted == ["B", "A"] and loaded == ["A", "B", "C", "B"], (evicted, loaded)
    assert (videos[4] == videos[1]).all()
    assert np.abs(videos[1].astype(int) - videos[0]).max() > 10  # the adapters differ
