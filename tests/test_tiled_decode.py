"""The tiled VAE decode (`memory.vae_tiling`) one latent frame at a time
(wanserve/engine/serving/tiled_decode.py): the frames diffusers' `tiled_decode` makes from the
whole video, handed on per latent frame, so no rank holds the whole float video."""
from __future__ import annotations

import torch

from wanserve.engine.serving.tiled_decode import decode_tiled_frames


def test_tiled_frames_one_latent_frame_at_a_time_equal_diffusers_tiled_decode():
    """A 3-latent-frame video over 3 x 3 tiles (32 pixels, 24 apart: blends on both axes, a
    cropped last row and column): each handed-on chunk is one latent frame's (1, then 4 video
    frames), and together, clamped, they equal `vae.decode` with tiling bit for bit.
    checked with: a fresh causal cache for every decoder call (`feat_cache=caches[(i, j)]` →
    `[None] * len(caches[(i, j)])` in `decode_tiled_frames`): chunks of [1, 1, 1] frames; the
    horizontal blend skipped (`if j > 0:` → `if j > 0 and False:` in `_blended`): max |diff|
    1.12."""
    from diffusers import AutoencoderKLWan

    from wanserve.engine.model.tiny_model import ensure_tiny_model

    vae = AutoencoderKLWan.from_pretrained(ensure_tiny_model(), subfolder="vae").eval()
    vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32,
                      tile_sample_stride_height=24, tile_sample_stride_width=24)
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(1, vae.config.z_dim, 3, 8, 9, generator=generator)
    with torch.no_grad():
        expected = vae.decode(z, return_dict=False)[0]
        chunks, stops = [], []
        decode_tiled_frames(vae, z, lambda: stops.append(1), chunks.append)
    assert vae.config.patch_size is None  # the Wan2.1 VAE: no unpatchify between
    assert [chunk.shape[2] for chunk in chunks] == [1, 4, 4] and len(stops) == 3
    got = torch.clamp(torch.cat(chunks, dim=2), min=-1.0, max=1.0)
    assert got.shape == expected.shape == (1, 3, 9, 64, 72)
    diff = float((got - expected).abs().max())
    assert torch.equal(got, expected), f"max |diff| {diff:.2e}"
