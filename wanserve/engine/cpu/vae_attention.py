"""The row-sharded Wan VAE's mid-block attention, each rank answering only its own rows.

Written for distvae 0.1.0 (`GatheredAttentionAdapter` around diffusers 0.42.1's
`WanAttentionBlock`). distvae gathers the whole frame onto every rank and runs the block on
all of it, so every rank does the whole attention and keeps 1/N of it. Here each rank
normalises and projects its own rows, gathers only the keys and values, and attends with its
own queries: the norm is per pixel and the projections are 1x1 convolutions, so its rows come
out as the same sums the whole-frame block computes (the keys in the same order: bands are
gathered in rank order), and it does 1/N of the work.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def _rows_attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    from distvae.modules.patch_utils import gather_patches

    block = self.module
    identity = x
    batch, channels, frames, height, width = x.shape
    x = x.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
    qkv = block.to_qkv(block.norm(x))  # (b*t, 3c, h, w)
    keys_values, _ = gather_patches(qkv[:, channels:].contiguous(), self.parallel_context)
    keys_values = torch.cat(keys_values, dim=-2)  # (b*t, 2c, H, w): the whole frame
    query = qkv[:, :channels].flatten(2).transpose(1, 2).unsqueeze(1)  # (b*t, 1, h*w, c)
    key, value = keys_values.flatten(2).transpose(1, 2).unsqueeze(1).chunk(2, dim=-1)
    out = F.scaled_dot_product_attention(query, key.contiguous(), value.contiguous())
    out = out.squeeze(1).transpose(1, 2).reshape(batch * frames, channels, height, width)
    out = block.proj(out).view(batch, frames, channels, height, width).permute(0, 2, 1, 3, 4)
    return out + identity


def shard_vae_attention(module: nn.Module) -> int:
    """Rebind the forward of every distvae attention adapter around a Wan VAE attention block
    under `module` (after distvae has sharded it by rows); returns how many."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock
    from distvae.modules.adapters.layers.attn_adapters import GatheredAttentionAdapter

    count = 0
    for sub in module.modules():
        if (type(sub) is GatheredAttentionAdapter and type(sub.module) is WanAttentionBlock
                and sub.parallel_context.world_size > 1):
            sub.forward = types.MethodType(_rows_attention_forward, sub)
            count += 1
    return count
