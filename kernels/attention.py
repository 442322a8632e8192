"""Attention backends: which one runs, and the CPU kernel that makes ring attention exact.

On CUDA the order is flash-attn 3, flash-attn 2, then torch SDPA. On a CPU build the backend
is torch's CPU flash kernel, which returns the log-sum-exp that ring attention needs to merge
partial results exactly (xfuser's SDPA/SDPA_MATH paths do not).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionBackend:
    name: str  # what we report: "flash-attn-3", "flash-attn-2", "sdpa", "cpu-flash"
    xfuser_backend: str  # the xfuser AttentionBackendType member name


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def select_backend(device: torch.device, ring_degree: int = 1) -> AttentionBackend:
    if device.type != "cuda":
        return AttentionBackend("cpu-flash", "SDPA_FLASH")
    if _installed("flash_attn_interface"):
        return AttentionBackend("flash-attn-3", "FLASH_3")
    if _installed("flash_attn"):
        return AttentionBackend("flash-attn-2", "FLASH")
    # torch's own flash kernel returns the log-sum-exp, so it also serves ring attention.
    if ring_degree > 1:
        return AttentionBackend("sdpa-flash", "SDPA_FLASH")
    return AttentionBackend("sdpa", "SDPA")


def cpu_attention_with_lse(query, key, value, dropout_p=0.0, is_causal=False, attention_kwargs=None):
    """xfuser attention-function signature: (B, H, S, D) tensors in, (out, lse) out.

    `attention_kwargs["kv_mask"]`, when present, is a boolean (S_kv,) mask of the keys to
    attend to; masked-out keys get zero weight (used for sequence-parallel padding).
    """
    attn_mask = None
    kv_mask = (attention_kwargs or {}).get("kv_mask")
    if kv_mask is not None and kv_mask.shape[-1] == key.shape[-2]:
        if not bool(kv_mask.all()):
            attn_mask = torch.zeros(kv_mask.shape, dtype=query.dtype, device=query.device)
            attn_mask.masked_fill_(~kv_mask, float("-inf"))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask
    )
    return out, lse
