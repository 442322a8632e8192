"""Attention backends: which one runs, and the CPU kernel that makes ring attention exact.

On a CPU build the backend is torch's CPU flash kernel, which returns the log-sum-exp that
ring attention needs to merge partial results exactly (xfuser's SDPA/SDPA_MATH paths do not).

On CUDA the choice follows what xfuser itself can run; written for xfuser 0.7.0, whose
kernel bindings (core/distributed/attention_backend.py) and calls this module checks:

- flash-attn 3 and 2 count only when xfuser's own check bound their `flash_attn_func`
  (envs.PACKAGES_CHECKER imports the package, applies its version floor and GPU-name test);
  a package that is on disk but fails that import would raise NameError on the first call.
- xfuser calls both with `return_attn_probs=True`. FA3 from release tags (v2.8.3.post1 and
  older) has no such keyword, so the function's signature is checked too.
- flash-attn, cuDNN attention and torch's flash kernel take fp16/bf16 only: float32 runs SDPA.

Order for fp16/bf16: flash-attn 3, cuDNN attention, flash-attn 2 (xfuser's own ranking),
then torch SDPA, or torch's flash kernel when ring attention needs the log-sum-exp.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch

XFUSER_VERSION = "0.7.0"
HALF_DTYPES = (torch.float16, torch.bfloat16)
RING_NEEDS_HALF = (
    "ring attention on CUDA needs bfloat16 or float16: set --dtype bfloat16 (or --ring 1). "
    "In float32 no xfuser {} backend returns a usable log-sum-exp: SDPA returns none, "
    "SDPA_MATH returns the attention weights, and SDPA_EFFICIENT pads it to a multiple of 32 "
    "tokens, which the ring merge cannot take"
).format(XFUSER_VERSION)


@dataclass(frozen=True)
class AttentionBackend:
    name: str  # what we report: "flash-attn-3", "cudnn", "flash-attn-2", "sdpa", "sdpa-flash", "cpu-flash"
    xfuser_backend: str  # the xfuser AttentionBackendType member name
    reason: str = ""  # why this one, in words (start-up log and /health)


@dataclass(frozen=True)
class Kernels:
    """What xfuser could run on this GPU for one dtype.

    flash_attn_3 / flash_attn_2: the `flash_attn_func` xfuser bound (None where its own check
    failed). cudnn: torch accepts its cuDNN attention for this GPU and dtype. why_not: for a
    kernel that is not usable, why (keys "flash-attn-3", "flash-attn-2", "cudnn").
    """
    flash_attn_3: Optional[Callable] = None
    flash_attn_2: Optional[Callable] = None
    cudnn: bool = False
    why_not: Mapping[str, str] = field(default_factory=dict)


def _accepts(fn: Callable, keyword: str) -> bool:
    try:
        return keyword in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _not_bound(module: str, checks: str) -> str:
    try:
        on_disk = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        on_disk = False
    if not on_disk:
        return "not installed"
    return f"installed, but xfuser {XFUSER_VERSION} rejected it ({checks})"


def _cudnn_attention_usable(device: torch.device, dtype: torch.dtype) -> bool:
    if not torch.backends.cudnn.is_available():
        return False
    q = torch.empty(1, 2, 64, 128, device=device, dtype=dtype)  # 128: Wan's head size
    params = torch.backends.cuda.SDPAParams(q, q, q, None, 0.0, False, False)
    return bool(torch.backends.cuda.can_use_cudnn_attention(params))


def xfuser_kernels(device: torch.device, dtype: torch.dtype) -> Kernels:
    """The default probe: xfuser's own flags and bindings, and torch's cuDNN check."""
    from xfuser.core.distributed import attention_backend as ab
    from xfuser.envs import PACKAGES_CHECKER

    info = PACKAGES_CHECKER.get_packages_info()
    fa3 = getattr(ab, "flash_attn_func_3", None) if info.get("has_flash_attn_3") else None
    fa2 = getattr(ab, "flash_attn_func_2", None) if info.get("has_flash_attn") else None
    cudnn = _cudnn_attention_usable(device, dtype)
    why_not = {}
    if fa3 is None:
        why_not["flash-attn-3"] = _not_bound(
            "flash_attn_interface", "its import failed, e.g. a build for another torch")
    if fa2 is None:
        why_not["flash-attn-2"] = _not_bound(
            "flash_attn", "an import error, e.g. a build for another torch, a version below "
            "its floor, or a Tesla/T4/Turing GPU")
    if not cudnn:
        why_not["cudnn"] = ("torch refuses it for this GPU or dtype"
                            if torch.backends.cudnn.is_available() else "cuDNN not available")
    return Kernels(fa3, fa2, cudnn, why_not)


BACKEND_NAMES = ("flash-attn-3", "cudnn", "flash-attn-2", "sdpa", "sdpa-flash", "cpu-flash")
_USING = {"sdpa": "using torch SDPA", "sdpa-flash": "using torch's flash kernel, which returns "
          "the log-sum-exp ring attention needs"}
_CPU_REASON = ("CPU: torch's CPU flash kernel, which returns the log-sum-exp ring attention "
               "merges with")


def select_backend(device: torch.device, dtype: torch.dtype, ring_degree: int = 1,
                   probe: Optional[Callable[[torch.device, torch.dtype], Kernels]] = None,
                   require: str = "auto") -> AttentionBackend:
    """The first usable backend in the order above, or with `require` (a BACKEND_NAMES entry,
    `--attention-backend`) that one, refused with the reason when it cannot run here."""
    if require != "auto" and require not in BACKEND_NAMES:
        raise ValueError(f"attention backend {require!r}: one of auto, {', '.join(BACKEND_NAMES)}")
    if device.type != "cuda":
        candidates = [("cpu-flash", "SDPA_FLASH", None)]
    elif dtype not in HALF_DTYPES:
        if ring_degree > 1:
            raise ValueError(RING_NEEDS_HALF)
        candidates = [("sdpa", "SDPA", None)]
    else:
        candidates = _half_candidates((probe or xfuser_kernels)(device, dtype), ring_degree)
    if require != "auto":
        found = [c for c in candidates if c[0] == require]
        why_not = found[0][2] if found else (
            f"not one of the backends for {device.type}, {_name(dtype)}, ring {ring_degree}: "
            + ", ".join(c[0] for c in candidates))
        if why_not is not None:
            raise ValueError(f"--attention-backend {require}: {why_not}")
        return AttentionBackend(require, found[0][1], f"{require}, as --attention-backend asks")
    if device.type != "cuda":
        return AttentionBackend("cpu-flash", "SDPA_FLASH", _CPU_REASON)
    if dtype not in HALF_DTYPES:
        return AttentionBackend("sdpa", "SDPA", f"{_name(dtype)} needs SDPA: flash-attn, cuDNN "
                                "and torch's flash kernel take float16/bfloat16 only")
    skipped = []
    for name, xfuser_backend, why_not in candidates:
        if why_not is None:
            return AttentionBackend(name, xfuser_backend,
                                    "; ".join(skipped + [_USING.get(name, f"using {name}")]))
        skipped.append(why_not)
    raise AssertionError("torch's kernels are always usable")


def _half_candidates(kernels: Kernels, ring_degree: int) -> list[tuple[str, str, Optional[str]]]:
    """(name, xfuser backend, why it cannot run here or None) in order of preference."""
    torch_kernel = (("sdpa-flash", "SDPA_FLASH", None) if ring_degree > 1
                    else ("sdpa", "SDPA", None))
    return [
        ("flash-attn-3", "FLASH_3", _flash_unusable("flash-attn 3", kernels.flash_attn_3,
                                                    kernels.why_not, "flash_attn_3")),
        ("cudnn", "CUDNN", None if kernels.cudnn else
         f"cuDNN attention: {kernels.why_not.get('cudnn', 'not usable')}"),
        ("flash-attn-2", "FLASH", _flash_unusable("flash-attn 2", kernels.flash_attn_2,
                                                  kernels.why_not, "flash-attn")),
        torch_kernel,
    ]


def _flash_unusable(label: str, fn: Optional[Callable], why_not: Mapping[str, str],
                    distribution: str) -> Optional[str]:
    """None when xfuser bound `fn` and it takes the keyword xfuser passes; else why not."""
    if fn is None:
        return f"{label}: {why_not.get(label.replace(' ', '-'), 'not usable')}"
    if _accepts(fn, "return_attn_probs"):
        return None
    version = _dist_version(distribution)
    return (f"{label}{' ' + version if version else ''} lacks return_attn_probs, which xfuser "
            f"{XFUSER_VERSION} passes (flash-attn 3 from a release tag up to v2.8.3.post1)")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
