"""LoRA adapters on the tiny model: per request, fused, in each key format, on one rank and
under Ulysses and CFG parallel (real torchrun on CPU), compared on float frames.

Mutation checks (each made a test here fail, then was reverted):
- checked with: `adapters.apply` returning at once (no adapter applied): test_adapter_* fail.
- checked with: `_activate` skipping `disable_lora()` (the previous request's adapter stays):
  test_no_residue_after_a_lora_request fails.
- checked with: `scale_low` used for both experts in `_activate`:
  test_merged_and_fused_equal_unfused fails.
- checked with: `_merge` fusing only `transformer`: test_merged_and_fused_equal_unfused fails.
- checked with: rank 1 disabling every adapter in `_activate`: test_parallel_layout_*[U2]
  fails (request 1: max |diff| 8e-2).
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import REPO, run_offline
from lora_files import (make_lora, merged_model, with_bias_and_head, write_diffusers, write_musubi,
                        write_original_wan, write_wan21_i2v)

TOLERANCE = 1e-4
SCALES = "0.7:1.3"  # high-noise, low-noise
REQUESTS = [
    {"seed": 1},                                                         # 0 base
    {"seed": 1, "lora": f"D:{SCALES}"},                                  # 1 diffusers format
    {"seed": 1},                                                         # 2 base after a LoRA
    {"seed": 1, "lora": f"W:{SCALES}"},                                  # 3 original Wan
    {"seed": 1, "lora": f"M:{SCALES}"},                                  # 4 musubi
    {"seed": 1, "lora": [{"name": "pair", "scale_high": 1.0, "scale_low": 0.5},
                         {"name": "other", "scale": 0.8}]},              # 5 two adapters
    {"seed": 2, "lora": "D", "guidance_scale": 1.0, "sample_solver": "euler"},  # 6 distilled
    {"seed": 1, "lora": [f"D:{SCALES}", {"name": "pair", "scale_high": 1.0, "scale_low": 0.5},
                         "other:0.8", "B"]},                             # 7 four adapters
    {"seed": 1, "lora": f"I:{SCALES}"},                                  # 8 Wan2.1 I2V on 2.2
]
# the Wan2.1 LoRA's image keys per expert: k_img and v_img of 2 blocks, img_emb.proj.1 and .3,
# each lora_down and lora_up
WAN21_IMAGE_KEYS = (2 * 2 + 2) * 2


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from wanserve.engine.model.tiny_model import ensure_tiny_model

    root = tmp_path_factory.mktemp("loras")
    model = ensure_tiny_model()
    lora, high, low, other = (make_lora(model, seed) for seed in (1, 2, 3, 4))
    biased = with_bias_and_head(model, make_lora(model, 5), 6)
    paths = {"D": write_diffusers(lora, root / "d.safetensors"),
             "W": write_original_wan(lora, root / "w.safetensors"),
             "M": write_musubi(lora, root / "m.safetensors"),
             "B": write_original_wan(biased, root / "b.safetensors"),
             "I": write_wan21_i2v(lora, root / "i.safetensors", 7),
             "high": write_diffusers(high, root / "high.safetensors"),
             "low": write_diffusers(low, root / "low.safetensors"),
             "other": write_diffusers(other, root / "other.safetensors")}
    high_scale, low_scale = map(float, SCALES.split(":"))
    paths["merged"] = merged_model(model, root / "merged", {
        "transformer": [(lora, high_scale), (biased, 1.0)],
        "transformer_2": [(lora, low_scale), (biased, 1.0)]})
    paths["root"] = root
    return paths


def lora_flags(files) -> list[str]:
    return ["--lora", f"D={files['D']}", "--lora", f"W={files['W']}", "--lora", f"M={files['M']}",
            "--lora", f"pair={files['high']},{files['low']}", "--lora", f"other={files['other']}",
            "--lora", f"B={files['B']}", "--lora", f"I={files['I']}"]


def run(tmp_path, requests, nproc=1, *flags) -> tuple[list, dict]:
    frames, report = run_offline(tmp_path, nproc, requests, *flags)
    return [frames[f"frames_{i}"] for i in range(len(requests))], report


def max_diff(a, b) -> float:
    return float(np.abs(a - b).max())


@pytest.fixture(scope="module")
def single(files, tmp_path_factory):
    return run(tmp_path_factory.mktemp("single"), REQUESTS, 1, *lora_flags(files))


def test_adapter_changes_the_video(single):
    frames, _ = single
    assert max_diff(frames[1], frames[0]) > 0.05
    assert max_diff(frames[5], frames[0]) > 0.05 and max_diff(frames[5], frames[1]) > 0.05


def test_no_residue_after_a_lora_request(single):
    frames, _ = single
    assert max_diff(frames[2], frames[0]) == 0.0


def test_every_key_format_gives_the_same_video(single):
    frames, _ = single
    for index in (3, 4):  # original Wan with alpha, musubi with alpha
        assert max_diff(frames[index], frames[1]) <= TOLERANCE, index


def test_wan21_lora_on_wan22_drops_the_image_keys_and_reports_them(single):
    """A Wan2.1 I2V LoRA: its image-attention and image-embedder keys match no layer of
    Wan2.2-I2V; they are counted in the start-up report, and the rest applies as it would
    without them (request 8 against the same LoRA in the original Wan format, request 3).
    Checked with: `_load_into` not recording the count (the report has no unmatched_keys)."""
    frames, report = single
    assert report["adapters"]["unmatched_keys"] == {"I": 2 * WAN21_IMAGE_KEYS}  # both experts
    assert max_diff(frames[8], frames[3]) <= TOLERANCE


def test_merged_and_fused_equal_unfused(single, files, tmp_path):
    """D merged by hand into a copy of the weights (0.7 on the high-noise expert, 1.3 on the
    low-noise one) and B (original Wan with `diff_b` bias deltas and a `head.head.diff` /
    `diff_b` output head) at 1.0, with pair (1.0 / 0.5) and other (0.8) fused on top at
    start-up, equals the four applied per request on the original weights.
    Checked with: `_load_into` dropping the `lora_B.bias` keys (the `diff_b` deltas; max |diff|
    0.39), and dropping the `proj_out` keys (the head; 0.35)."""
    preset = tmp_path / "fused.yaml"
    tree = (REPO / "configs" / "tiny.yaml").read_text()
    preset.write_text(tree + f"""
loras:
  pair: {{high: {files['high']}, low: {files['low']}, scale_high: 1.0, scale_low: 0.5, fuse: true}}
  other: {{path: {files['other']}, scale: 0.8, fuse: true}}
""")
    fused, _ = run(tmp_path, [{"seed": 1}], 1, "--config", str(preset),
                   "--model", str(files["merged"]))
    diff = max_diff(fused[0], single[0][7])
    print(f"merged + fused vs unfused: max |diff| {diff:.2e}")
    assert diff <= TOLERANCE


def test_unfuse_per_request(single, files, tmp_path):
    """With lora_unfuse_per_request, a request for another adapter unmerges the fused default
    for that request; the next request without `lora` has it fused again."""
    flags = ["--set", f"loras.pair.high={files['high']}", "--set", f"loras.pair.low={files['low']}",
             "--set", "loras.pair.scale_low=0.5", "--set", "loras.pair.fuse=true",
             "--set", f"loras.other.path={files['other']}", "--set", "loras.other.scale=0.8",
             "--set", "loras.other.fuse=true", "--set", "lora_unfuse_per_request=true",
             "--lora", f"D={files['D']}"]
    requests = [{"seed": 1}, REQUESTS[1], {"seed": 1}, {"seed": 1, "lora": "none"}]
    frames, _ = run(tmp_path, requests, 1, *flags)
    for got, index in zip(frames, (5, 1, 5)):
        diff = max_diff(got, single[0][index])
        print(f"unfuse per request vs request {index}: max |diff| {diff:.2e}")
        assert diff <= TOLERANCE, index
    assert max_diff(frames[3], single[0][0]) <= TOLERANCE  # "none": the base model


def test_guidance_one_runs_one_forward_per_step(single):
    _, report = single
    assert report["runs"][0]["forwards"] == [2, 2, 2, 2]  # guidance 3.5: both branches
    assert report["runs"][6]["forwards"] == [1, 1, 1, 1]


@pytest.mark.parametrize("flags,indices", [
    (("--ulysses", "2"), (0, 1, 5, 6)),
    (("--cfg", "2"), (1, 6)),
], ids=["U2", "C2"])
def test_parallel_layout_with_adapters_equals_one_rank(single, files, tmp_path, flags, indices):
    frames, report = run(tmp_path, [REQUESTS[i] for i in indices], 2, *flags, *lora_flags(files))
    for got, index in zip(frames, indices):
        diff = max_diff(got, single[0][index])
        print(f"{flags[0]} request {index}: max |diff| {diff:.2e}")
        assert diff <= TOLERANCE, index
    if 6 in indices:
        distilled = report["runs"][indices.index(6)]
        assert distilled["forwards"] == [1, 1, 1, 1]  # guidance 1, under CFG parallel too


def test_bias_deltas_on_some_layers_equal_explicit_zero_deltas(tmp_path):
    """An original-Wan LoRA whose `diff_b` bias deltas cover block 0 and the head but not block
    1 serves, and equals the same LoRA with explicit zero deltas on block 1 (a missing delta is
    zero); its deltas count (it differs from the LoRA without any).
    Checked with: `_zero_missing_bias_deltas` returning the state dict unchanged (diffusers
    then leaves block 1's `lora_B.bias` on the meta device and start-up refuses the file)."""
    from wanserve.engine.model.tiny_model import ensure_tiny_model

    model = ensure_tiny_model()
    lora = with_bias_and_head(model, make_lora(model, 5), 6)
    partial = {m: v if not m.startswith("blocks.1.") else v[:2] for m, v in lora.items()}
    zeros = {m: v if not m.startswith("blocks.1.") else (*v[:2], v[2] * 0)
             for m, v in lora.items()}
    plain = {m: v[:2] for m, v in lora.items() if m != "proj_out"}
    flags = []
    for name, weights in (("P", partial), ("Z", zeros), ("N", plain)):
        flags += ["--lora", f"{name}={write_original_wan(weights, tmp_path / f'{name}.safetensors')}"]
    frames, _ = run(tmp_path, [{"seed": 1, "lora": n} for n in "PZN"], 1, *flags)
    assert max_diff(frames[0], frames[1]) == 0.0
    assert max_diff(frames[0], frames[2]) > 0.05


def test_an_adapter_that_cannot_run_is_refused_at_start_up_naming_the_file(tmp_path):
    """A diffusers-format file with one layer's `lora_A` but not its `lora_B` loads in diffusers
    0.42.1 with that `lora_B` on the meta device: the server refuses it at start-up, naming the
    file, instead of answering 500 to every request that uses it.
    Checked with: `_check_runnable` returning at once (the server started)."""
    from safetensors.torch import load_file, save_file

    from conftest import start_server
    from wanserve.engine.model.tiny_model import ensure_tiny_model

    path = write_diffusers(make_lora(ensure_tiny_model(), 5), tmp_path / "broken.safetensors")
    weights = load_file(str(path))
    del weights["transformer.blocks.1.attn1.to_q.lora_B.weight"]
    save_file(weights, str(path))
    with pytest.raises(RuntimeError, match="server exited") as failed:
        start_server(tmp_path, "--lora", f"broken={path}")
    assert f"LoRA file {path}:" in str(failed.value)
    assert "blocks.1.attn1.to_q.lora_B.broken.weight on meta" in str(failed.value)
