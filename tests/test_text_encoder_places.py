"""Where UMT5 lives (`memory.text_encoder`, `--text-encoder`): `cpu` keeps it in host memory
and encodes there, the embeddings moved to the device, alone and with
`--offload-inactive-expert`; `shard` splits it over the ranks of each replica (FSDP2), each
rank reading only its rows of the checkpoint (tests/test_sharded_weights.py under CFG parallel,
tests/test_sharded_loading.py in bfloat16).

The device here is `meta` (as in tests/test_loading.py): whatever is placed on the device ends
up there, what is kept on the host stays real CPU tensors.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import run_offline
from wanserve.engine.assembly import load_weights
from wanserve.engine.config import load_config
from wanserve.engine.model.offload import place_on_device
from wanserve.engine.model.tiny_model import ensure_tiny_model
from wanserve.engine.parallel.distributed import DistContext
from wanserve.engine.parallel.sliced_loading import build_text_encoder_on_meta


def devices(module) -> set[str]:
    return {p.device.type for p in module.parameters()}


@pytest.mark.parametrize("offload", [False, True], ids=["resident", "offload"])
def test_the_text_encoder_stays_on_the_host(offload):
    """Loaded (and, without offload, placed) as the assembly does it, for a `meta` device: the
    text encoder's parameters are on the CPU and the VAE's on the device; with offload the
    experts are loaded on the host too.
    Checked with: `keep_on_host` without the text encoder (wanserve/engine/assembly.py
    `load_weights`): its parameters were on `meta`."""
    cfg = load_config(["--text-encoder", "cpu", *(["--offload-inactive-expert"] * offload)])
    ctx = DistContext(0, 1, 0, torch.device("meta"), cfg.layout, None, None, 60.0)
    pipe, _ = load_weights(cfg, ctx, ensure_tiny_model())
    assert devices(pipe.text_encoder) == {"cpu"} and devices(pipe.vae) == {"meta"}
    experts = {"cpu"} if offload else {"meta"}
    assert devices(pipe.transformer) == devices(pipe.transformer_2) == experts
    if offload:
        return  # the swaps copy real tensors, which `meta` cannot take
    placed, _ = place_on_device(pipe, ctx.device, cfg.offload_inactive_expert,
                                text_encoder_on_host=cfg.text_encoder == "cpu")
    assert placed["text_encoder"] == "cpu"
    assert devices(pipe.text_encoder) == {"cpu"} and devices(pipe.vae) == {"meta"}


def test_text_encoder_setting_is_read_and_checked():
    assert load_config([]).text_encoder == "device"
    assert load_config(["--set", "memory.text_encoder=cpu"]).text_encoder == "cpu"
    assert load_config(["--text-encoder", "shard"]).text_encoder == "shard"
    with pytest.raises(SystemExit, match="memory.text_encoder must be one of device, cpu, shard"):
        load_config(["--set", "memory.text_encoder=gpu"])


def test_encoding_on_the_cpu_equals_encoding_on_the_device(tmp_path):
    """The same requests (two prompts, one with a negative prompt) with the encoder on the
    device, on the CPU, and on the CPU with the inactive expert offloaded: the same frames.
    On a CPU-only machine the device is the CPU, so this checks the setting changes nothing
    else (test_the_text_encoder_stays_on_the_host checks where it is).
    Checked with: the text encoder kept on the host loaded in bfloat16
    (wanserve/engine/model/pipeline.py `load_pipeline`): the `cpu` frames differed."""
    requests = [{"seed": 1, "prompt": "a red fox"},
                {"seed": 2, "prompt": "waves at night", "negative_prompt": "blurry"}]
    runs = {}
    for name, flags in (("device", ()), ("cpu", ("--text-encoder", "cpu")),
                        ("cpu+offload", ("--text-encoder", "cpu", "--offload-inactive-expert"))):
        runs[name] = run_offline(tmp_path, 1, requests, *flags)
    for name, (frames, _) in runs.items():
        for key, value in frames.items():
            assert np.array_equal(value, runs["device"][0][key]), (name, key)
    assert not np.array_equal(runs["device"][0]["frames_0"], runs["device"][0]["frames_1"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_the_encoder_built_for_sliced_loading_has_from_pretrained_dtypes(dtype):
    """transformers 5.25 keeps UMT5's `wo` in float32 under float16 only.
    Checked with: `keep_in_fp32` always on (`build_text_encoder_on_meta`): bf16 failed."""
    from transformers import UMT5EncoderModel

    folder = ensure_tiny_model() / "text_encoder"
    loaded = UMT5EncoderModel.from_pretrained(folder, dtype=dtype, use_kernels=False)
    built = build_text_encoder_on_meta(folder, dtype)
    assert ({k: p.dtype for k, p in built.named_parameters()}
            == {k: p.dtype for k, p in loaded.named_parameters()})
    assert built.shared.weight is built.encoder.embed_tokens.weight  # tied, as loaded
