"""Exact sequence parallelism when the token count does not divide by the SP degree.

Written for xfuser 0.7.0. Its Wan wrapper zero-pads the token sequence to a multiple of the
SP degree and lets the padded keys take part in self-attention, so the output drifts
(~2e-4 on the tiny model). This module masks them:

- Ulysses only: after the all-to-all every rank holds the whole (padded) sequence, so
  `valid_kv_len` (which xfuser's USP already honours) trims the trailing padded keys.
- Ring (any Ulysses degree): each ring rank holds one contiguous block of keys, and only the
  trailing blocks contain padding. When there is padding, `ring_attn` is replaced by a plain
  ring loop that slices each block to its valid keys and merges by log-sum-exp; without
  padding xfuser's own ring attention runs unchanged, except where a transport for the ring
  group was handed in (`use_ring_channels`; the CPU test vehicle's shared memory): there the
  same loop passes the blocks through it.

Layout facts used (yunchang's `use_ulysses_low` groups inside xfuser's contiguous SP group):
sp_rank = ring_rank * ulysses_degree + ulysses_rank, and xfuser chunks the sequence by
sp_rank, so ring rank j holds tokens [j*U*s, (j+1)*U*s) with s = padded_len / sp_degree.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from wanserve.engine.parallel import xfuser_compat

xfuser_compat.apply()

import xfuser.model_executor.layers.usp as usp  # noqa: E402
from xfuser.core.distributed import (  # noqa: E402
    get_ring_parallel_world_size,
    get_sequence_parallel_world_size,
    get_ulysses_parallel_world_size,
)
from xfuser.model_executor.models.transformers.transformer_wan import (  # noqa: E402
    xFuserWanTransformer3DWrapper,
)

RING_VALID_KEY = "wanserve_ring_valid"
_xfuser_ring_attn = usp.ring_attn
# (group, tensor) -> a channel with `post_shift(kv)` for passing ring blocks, or None
_ring_channel_for = None


def use_ring_channels(channel_for) -> None:
    """Pass ring attention's key/value blocks through `channel_for(group, tensor)`'s channel
    where it gives one (torch.distributed elsewhere)."""
    global _ring_channel_for
    _ring_channel_for = channel_for


def _ring_channel(group, tensor):
    return _ring_channel_for(group, tensor) if _ring_channel_for is not None else None


def ring_block_valid_lengths(seq_len: int, ulysses: int, ring: int) -> list[int]:
    sp = ulysses * ring
    block = -(-seq_len // sp) * ulysses  # keys per ring rank after the Ulysses exchange
    return [max(0, min(block, seq_len - j * block)) for j in range(ring)]


class WanServeTransformer(xFuserWanTransformer3DWrapper):
    """xfuser's Wan transformer with the sequence padding masked out of self-attention."""

    _sp_kwargs: dict | None = None

    def _padding_kwargs(self) -> dict:
        """One dict shared by every self-attention processor, refreshed each forward."""
        if self._sp_kwargs is None:
            self._sp_kwargs = {}
            for block in self.blocks:
                block.attn1.processor.attention_kwargs = self._sp_kwargs
        return self._sp_kwargs

    def forward(self, hidden_states, *args, **kwargs):
        sp_kwargs = self._padding_kwargs()
        _, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        seq_len = (frames // p_t) * (height // p_h) * (width // p_w)
        sp = get_sequence_parallel_world_size()
        sp_kwargs.clear()
        if seq_len % sp:
            ring = get_ring_parallel_world_size()
            if ring == 1:
                sp_kwargs["valid_kv_len"] = seq_len
            else:
                sp_kwargs[RING_VALID_KEY] = ring_block_valid_lengths(
                    seq_len, get_ulysses_parallel_world_size(), ring)
        return super().forward(hidden_states, *args, **kwargs)


def _merge(out, lse, block_out, block_lse):
    block_out, block_lse = block_out.float(), block_lse.float()
    if out is None:
        return block_out, block_lse
    new_lse = torch.logaddexp(lse, block_lse)
    out = out * torch.exp(lse - new_lse).unsqueeze(-1) + block_out * torch.exp(block_lse - new_lse).unsqueeze(-1)
    return out, new_lse


@torch.compiler.disable
def _masked_ring_attention(attention_function, query, key, value, valid, group):
    ring = dist.get_world_size(group)
    me = dist.get_rank(group)
    send_to = dist.get_global_rank(group, (me + 1) % ring)
    recv_from = dist.get_global_rank(group, (me - 1) % ring)
    kv = torch.stack([key, value]).contiguous()
    channel = _ring_channel(group, kv)
    out = lse = None
    for step in range(ring):
        receive = None
        if step < ring - 1:
            receive = (channel.post_shift(kv) if channel is not None
                       else _post_gloo_shift(kv, send_to, recv_from, group))
        n = valid[(me - step) % ring]
        if n > 0:
            block_out, block_lse = attention_function(
                query, kv[0][:, :, :n], kv[1][:, :, :n], dropout_p=0.0, is_causal=False)
            out, lse = _merge(out, lse, block_out, block_lse.reshape(block_out.shape[:-1]))
        if receive is not None:
            kv = receive()
    return out.to(query.dtype)


def _post_gloo_shift(kv, send_to, recv_from, group):
    incoming = torch.empty_like(kv)
    pending = dist.batch_isend_irecv([
        dist.P2POp(dist.isend, kv, send_to, group),
        dist.P2POp(dist.irecv, incoming, recv_from, group),
    ])

    def wait():
        for work in pending:
            work.wait()
        return incoming

    return wait


def ring_attn(attention_function, query, key, value, dropout_p=0.0, is_causal=False,
              joint_attn_kwargs=None, attention_kwargs=None):
    valid = (attention_kwargs or {}).get(RING_VALID_KEY)
    group = usp.PROCESS_GROUP.RING_PG
    if valid is None and _ring_channel(group, key) is not None:
        valid = [key.shape[-2]] * dist.get_world_size(group)  # no padding: every key counts
    if valid is None or joint_attn_kwargs is not None or is_causal or dropout_p:
        return _xfuser_ring_attn(attention_function, query, key, value, dropout_p, is_causal,
                                 joint_attn_kwargs, attention_kwargs)
    return _masked_ring_attention(attention_function, query, key, value, valid, group)


usp.ring_attn = ring_attn
