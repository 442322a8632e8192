"""The tiled VAE decode (`memory.vae_tiling`), one latent frame at a time.

Written for diffusers 0.42.1's `AutoencoderKLWan.tiled_decode`, which decodes each spatial tile
through every latent frame (clearing the causal cache between tiles), keeps every tile of the
whole video, then blends and crops them into one tensor: the whole float video on the decoding
rank. Here the loops are turned around: every tile keeps a causal cache of its own, and for
each latent frame all tiles are decoded, blended and cropped as diffusers does, and that frame's
output (B, C, f, H, W) is handed on and dropped. Blending and cropping act on each frame alone,
so the frames are diffusers' bit for bit.
"""
from __future__ import annotations

from typing import Callable

import torch


def tile_grid(vae, height: int, width: int) -> dict:
    """Where the latent tiles start, their latent size, and the sample blend and stride, as
    `tiled_decode` computes them."""
    ratio = vae.spatial_compression_ratio
    stride_h, stride_w = vae.tile_sample_stride_height, vae.tile_sample_stride_width
    min_h, min_w = vae.tile_sample_min_height, vae.tile_sample_min_width
    sample_h, sample_w = height * ratio, width * ratio
    patch = vae.config.patch_size
    if patch is not None:
        sample_h, sample_w = sample_h // patch, sample_w // patch
        stride_h, stride_w = stride_h // patch, stride_w // patch
        min_h, min_w = min_h // patch, min_w // patch
    return {"rows": range(0, height, vae.tile_sample_stride_height // ratio),
            "cols": range(0, width, vae.tile_sample_stride_width // ratio),
            "latent_h": vae.tile_sample_min_height // ratio,
            "latent_w": vae.tile_sample_min_width // ratio,
            "blend_h": min_h - stride_h, "blend_w": min_w - stride_w,
            "stride_h": stride_h, "stride_w": stride_w,
            "sample_h": sample_h, "sample_w": sample_w}


def decode_tiled_frames(vae, z: torch.Tensor, before_each_frame: Callable[[], None],
                        after_each_frame: Callable[[torch.Tensor], None]) -> None:
    """`z`: the unnormalised latents (B, C, F, h, w). Each latent frame's decoded, blended video
    frames (B, C, f, H, W, before unpatchify and clamp) to `after_each_frame`."""
    grid = tile_grid(vae, z.shape[3], z.shape[4])
    tiles = [(i, j) for i in grid["rows"] for j in grid["cols"]]
    caches = {tile: [None] * vae._cached_conv_counts["decoder"] for tile in tiles}
    for k in range(z.shape[2]):
        before_each_frame()
        rows = []
        for i in grid["rows"]:
            row = []
            for j in grid["cols"]:
                tile = z[:, :, k:k + 1, i:i + grid["latent_h"], j:j + grid["latent_w"]]
                row.append(vae.decoder(vae.post_quant_conv(tile), feat_cache=caches[(i, j)],
                                       feat_idx=[0], first_chunk=k == 0))
            rows.append(row)
        after_each_frame(_blended(vae, rows, grid))


def _blended(vae, rows: list[list[torch.Tensor]], grid: dict) -> torch.Tensor:
    """`tiled_decode`'s blend and crop, on one frame's tiles."""
    result_rows = []
    for i, row in enumerate(rows):
        result_row = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = vae.blend_v(rows[i - 1][j], tile, grid["blend_h"])
            if j > 0:
                tile = vae.blend_h(row[j - 1], tile, grid["blend_w"])
            result_row.append(tile[:, :, :, :grid["stride_h"], :grid["stride_w"]])
        result_rows.append(torch.cat(result_row, dim=-1))
    return torch.cat(result_rows, dim=3)[:, :, :, :grid["sample_h"], :grid["sample_w"]]
