"""The published Wan2.2 layouts (wanserve/engine/model/model_layouts.py) and the GPU script that serves A14B at
full size (benchmarks/gpu_served.py), checked on the CPU.

- The layouts built at full size on `meta` (shapes only, no memory) have the published sizes:
  a 14.3B-parameter expert (28.6 GB in bf16) twice for A14B, 5.0B for TI2V-5B, the 5.7B UMT5-XXL
  encoder, the Wan2.1 and Wan2.2 VAEs, and the modules the checkpoints keep in float32.
- `--model random:NAME?layers=N` cuts only the layer counts.
- The GPU script's smoke run: the published widths at one layer per expert and per text-encoder
  layer, built with random weights by the server itself and served over HTTP through the A14B
  preset; it writes its JSON with every figure a GPU run fills in, and leaves BENCHMARKS.md
  alone off a GPU.

The checkpoint writer and its served comparison (benchmarks/real_layout.py) take minutes at
even the smallest cut: a documented check with its last result in BENCHMARKS.md.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from wanserve.engine.model.model_layouts import LAYOUTS, WAN22_I2V_A14B, parse_random_model
from wanserve.engine.model.random_weights import build_components

FP32_IN_EXPERTS = {"scale_shift_table", "norm2", "time_embedder"}  # rope: buffers only


def billions(module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e9, 3)


@pytest.mark.parametrize("name, experts, expert_b, vae_b", [
    ("wan2.2-i2v-a14b", ("transformer", "transformer_2"), 14.289, 0.127),
    ("wan2.2-ti2v-5b", ("transformer",), 5.0, 0.705),
])
def test_full_layouts_have_the_published_sizes(name, experts, expert_b, vae_b):
    """checked with: A14B's ffn_dim 13824 -> 8960 (the 1.3B model's: the expert has 12.3B)."""
    parts = build_components(LAYOUTS[name], torch.bfloat16, torch.device("meta"))
    assert [key for key in parts if key.startswith("transformer")] == list(experts)
    assert {key: billions(parts[key]) for key in experts} == dict.fromkeys(experts, expert_b)
    assert billions(parts["text_encoder"]) == 5.681  # UMT5-XXL's encoder, embeddings tied
    assert billions(parts["vae"]) == vae_b
    fp32 = {part for n, p in parts["transformer"].named_parameters() if p.dtype == torch.float32
            for part in n.split(".") if part in FP32_IN_EXPERTS}
    assert fp32 == FP32_IN_EXPERTS
    assert parts["tokenizer"].eos_token_id == 1 and parts["tokenizer"].pad_token_id == 0


def test_a_random_spec_cuts_only_the_layer_counts():
    """checked with: cut() also halving ffn_dim (the widths differ)."""
    model = parse_random_model("random:wan2.2-i2v-a14b?layers=2")
    cut, full = model.layout, WAN22_I2V_A14B
    assert cut.transformer == {**full.transformer, "num_layers": 2}
    assert cut.text_encoder == {**full.text_encoder, "num_layers": 2, "num_decoder_layers": 2}
    assert (cut.vae, cut.scheduler, cut.pipeline_config) == (full.vae, full.scheduler,
                                                             full.pipeline_config)
    assert model.spec == "random:wan2.2-i2v-a14b?layers=2"
    assert parse_random_model("random:wan2.2-i2v-a14b").layout == full
    for bad in ("random:wan2.2-t2v", "random:wan2.2-i2v-a14b?heads=2",
                "random:wan2.2-i2v-a14b?layers=0"):
        with pytest.raises(ValueError):
            parse_random_model(bad)


def test_gpu_script_smoke_on_cpu_writes_every_figure_and_leaves_benchmarks_alone(tmp_path):
    """checked with: `if gpu:` -> `if True:` before the BENCHMARKS.md append (the copy was
    appended to)."""
    benchmarks = tmp_path / "BENCHMARKS.md"
    benchmarks.write_text("unchanged\n")
    out = tmp_path / "gpu_served.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_served.py", "--smoke", "--budget-s",
                           "400", "--out", str(out), "--benchmarks-md", str(benchmarks)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] is True and result["matmul_peak_tflops"] > 0
    assert result["model"] == "random:wan2.2-i2v-a14b?layers=1"
    (row,) = result["rows"]
    assert row["backend"] == row["attention_backend"] == "cpu-flash"
    assert row["load"]["random_weights"] is True
    assert row["load"]["parameters"]["transformer"] == 584_523_328  # one full-width block
    assert row["load"]["peak_memory_per_rank"][0]["host_mib"] > 4000  # ~5 GB of weights
    steps = [(r["steps"], r["guidance"]) for r in row["requests"] if "skipped" not in r]
    assert steps == [(1, 1.0), (2, 3.5)]
    for request in row["requests"]:
        assert request["s_per_denoising_step"] > 0 and request["tflops_per_rank"] > 0
        # on a busy CPU the peak and the step are timed under different loads: MFU may pass 1
        assert request["mfu"] == pytest.approx(request["tflops_per_rank"]
                                               / result["matmul_peak_tflops"])
        assert {"text_encode", "image_encode", "vae_decode"} <= set(request["stage_durations"])
    assert benchmarks.read_text() == "unchanged\n"
