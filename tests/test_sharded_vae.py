"""The tiny model's VAE sharded by rows over two real ranks decodes and encodes exactly what
diffusers' own unsharded VAE does (none of our kernels on that side, so a kernel bug shows),
including bands of different heights and a band one latent row high: the overlapped halo
exchange (wanserve/engine/cpu/sharded_conv.py) and the row-sharded mid-block attention
(wanserve/engine/cpu/vae_attention.py), with the ranks exchanging over gloo and over shared memory
(wanserve/engine/cpu/shm_transport.py: our halos, distvae's halos and all-gathers).

The check runs as this file under torchrun (two processes); rank 0 prints the result.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# (latent frames, latent rows, latent columns): rows 6 split 3+3; 5 split 3+2; 3 split 2+1
SHAPES = [(2, 6, 8), (3, 5, 6), (2, 3, 4)]
TOLERANCE = 1e-5  # measured at most 2.7e-6 (decode), 7.2e-7 (encode)


@pytest.fixture(scope="module")
def results():
    """Both transports in one torchrun job: gloo first, then shared memory switched on."""
    from conftest import torchrun_script

    return torchrun_script(__file__, 2)


@pytest.mark.parametrize("transport", ["gloo", "shm"])
def test_sharded_vae_matches_the_unsharded_vae(results, transport):
    """checked with: the CPU causal-conv kernel ignoring its cached frames
    (wanserve/engine/cpu/vae_kernels.py with_causal_frames)."""
    result = results[transport]
    assert result["rebound"] > 0
    assert result["attention_blocks"] == 2  # the encoder's and the decoder's mid block
    assert result["routed"] == (["vae"] if transport == "shm" else [])
    assert len(result["decode_diffs"]) == len(result["encode_diffs"]) == len(SHAPES)
    print("decode", result["decode_diffs"], "encode", result["encode_diffs"])
    assert max(result["decode_diffs"]) <= TOLERANCE, result["decode_diffs"]
    assert max(result["encode_diffs"]) <= TOLERANCE, result["encode_diffs"]


def _check() -> dict:
    import copy

    import torch
    import torch.distributed as dist

    from wanserve.engine.parallel import xfuser_compat

    xfuser_compat.apply()
    from diffusers import AutoencoderKLWan
    from distvae.vae import parallel as distvae_parallel

    from wanserve.engine.model.tiny_model import ensure_tiny_model
    from wanserve.engine.cpu.vae_kernels import use_fast_cpu_kernels, use_onednn_in_distvae
    from wanserve.engine.cpu.sharded_conv import use_overlapped_halos
    from wanserve.engine.cpu.vae_attention import shard_vae_attention

    dist.init_process_group("gloo")
    try:
        vae = AutoencoderKLWan.from_pretrained(ensure_tiny_model(), subfolder="vae").eval()
        unsharded = copy.deepcopy(vae)  # diffusers' own: none of our kernels
        use_fast_cpu_kernels(vae)
        use_onednn_in_distvae()
        distvae_parallel.parallelize_decoder(vae, dist.group.WORLD)
        distvae_parallel.parallelize_encoder(vae, dist.group.WORLD)
        rebound = use_overlapped_halos(vae)
        attention_blocks = shard_vae_attention(vae)
        results = {}
        for transport in ("gloo", "shm"):
            routed = []
            if transport == "shm":
                from wanserve.engine.cpu import shm_transport

                routed = shm_transport.enable(60.0, {"vae": dist.group.WORLD})
            generator = torch.Generator().manual_seed(0)
            decode_diffs, encode_diffs = [], []
            with torch.no_grad():
                for frames, rows, columns in SHAPES:
                    latents = torch.randn(1, 16, frames, rows, columns, generator=generator)
                    video = torch.rand(1, 3, 4 * frames - 3, 8 * rows, 8 * columns,
                                       generator=generator) * 2 - 1
                    decoded = vae.decode(latents).sample
                    encoded = vae.encode(video).latent_dist.mode()
                    decode_diffs.append(
                        (decoded - unsharded.decode(latents).sample).abs().max().item())
                    encode_diffs.append(
                        (encoded - unsharded.encode(video).latent_dist.mode()).abs().max().item())
            results[transport] = {"rebound": rebound, "attention_blocks": attention_blocks,
                                  "routed": routed, "decode_diffs": decode_diffs,
                                  "encode_diffs": encode_diffs}
        return results
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    result = _check()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
