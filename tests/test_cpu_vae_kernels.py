"""wanserve/engine/cpu/vae_kernels.py: the tiny model's VAE and transformer with the CPU kernels swapped in
compute what they computed before, and the slow aten kernels are really gone from the trace."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.profiler import profile

from wanserve.engine.parallel import xfuser_compat

xfuser_compat.apply()

from diffusers import AutoencoderKLWan, WanTransformer3DModel  # noqa: E402

from wanserve.engine.model.tiny_model import ensure_tiny_model  # noqa: E402
from wanserve.engine.cpu.vae_kernels import use_fast_cpu_kernels  # noqa: E402


def aten_ops(fn) -> set[str]:
    with profile() as trace:
        fn()
    return {event.key for event in trace.key_averages()}


@pytest.fixture(scope="module")
def vaes():
    vae = AutoencoderKLWan.from_pretrained(ensure_tiny_model(), subfolder="vae").eval()
    fast = copy.deepcopy(vae)
    convs = sum(type(m).__name__ == "WanCausalConv3d" for m in fast.modules())
    norms = sum(type(m).__name__ == "WanRMS_norm" and m.channel_first for m in fast.modules())
    assert use_fast_cpu_kernels(fast) == convs + norms > 0
    return vae, fast


@torch.no_grad()
def test_vae_decode_and_encode_unchanged_without_the_slow_kernels(vaes):
    vae, fast = vaes
    generator = torch.Generator().manual_seed(0)
    # 9 frames at 48x80: three latent frames, so the causal caches are exercised
    latents = torch.randn(1, 16, 3, 6, 10, generator=generator)
    video = torch.rand(1, 3, 9, 48, 80, generator=generator) * 2 - 1

    expected = vae.decode(latents).sample
    ops = aten_ops(lambda: fast.decode(latents))
    got = fast.decode(latents).sample
    assert "aten::slow_conv3d_forward" not in ops and "aten::linalg_vector_norm" not in ops
    assert "aten::mkldnn_convolution" in ops
    assert (got - expected).abs().max().item() < 1e-5

    expected = vae.encode(video).latent_dist.mode()
    got = fast.encode(video).latent_dist.mode()
    assert (got - expected).abs().max().item() < 1e-5


@torch.no_grad()
def test_transformer_patch_embedding_unchanged():
    model = WanTransformer3DModel.from_pretrained(ensure_tiny_model(), subfolder="transformer")
    fast = copy.deepcopy(model)
    assert use_fast_cpu_kernels(fast) == 1  # the patch embedding is its only 3-D convolution
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 36, 3, 8, 12, generator=generator)
    text = torch.randn(1, 7, model.config.text_dim, generator=generator)
    timestep = torch.tensor([500])
    expected = model(latents, timestep, text, return_dict=False)[0]
    got = fast(latents, timestep, text, return_dict=False)[0]
    assert (got - expected).abs().max().item() < 1e-5


def test_modules_off_the_cpu_or_in_other_dtypes_are_left_alone():
    conv = torch.nn.Conv3d(4, 4, 3).to(torch.bfloat16)
    assert use_fast_cpu_kernels(conv) == 0
    subclass = type("Sharded", (torch.nn.Conv3d,), {})(4, 4, 3)
    assert use_fast_cpu_kernels(subclass) == 0  # a subclass keeps its own forward
