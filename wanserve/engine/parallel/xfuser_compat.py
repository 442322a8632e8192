"""Make xfuser 0.7.0 import and run on the CPU (gloo): a CPU build of torch, or a CUDA build
with no usable GPU.

Written for xfuser==0.7.0 (yunchang 0.6.4, torch 2.13). Where a GPU is usable nothing here
runs: the GPU path is xfuser exactly as shipped. Every workaround is one function below,
each named after the xfuser behaviour it gets past:

1. `import xfuser` reads `envs.CUDA_VERSION`, which raises on a CPU build: present a CUDA
   version string in `torch.version.cuda` only while xfuser's modules are first imported.
2. xfuser gates sequence parallelism on `has_long_ctx_attn`, which it sets False without
   CUDA: switch the copied module flags on and point `usp.PROCESS_GROUP` at yunchang's groups.
3. Ring attention needs an attention that returns the log-sum-exp; the CUDA flash kernels
   have no CPU kernel. Register `wanserve.kernels.attention.cpu_attention_with_lse` as SDPA_FLASH.

Callers pass `backend="gloo"` to xfuser's distributed init themselves (its own guess raises).
"""
from __future__ import annotations

import contextlib
import importlib

import torch

from wanserve.engine.parallel.device import gpu_usable

XFUSER_VERSION = "0.7.0"
_applied = False


def needed() -> bool:
    return not gpu_usable()


@contextlib.contextmanager
def _pretend_cuda_version():
    saved = torch.version.cuda
    torch.version.cuda = "12.4"
    try:
        yield
    finally:
        torch.version.cuda = saved


def _as_cpu_build():
    torch.version.cuda = None
    torch.version.hip = None


def _import_xfuser():
    with _pretend_cuda_version():
        import xfuser  # noqa: F401
        import xfuser.envs
        import xfuser.config.config
        import xfuser.core.distributed.parallel_state
        import xfuser.core.distributed.group_coordinator
        import xfuser.model_executor.layers.usp
        import xfuser.model_executor.models.transformers.transformer_wan  # noqa: F401
        import xfuser.model_executor.pipelines.pipeline_wan_i2v  # noqa: F401


def _enable_long_ctx_attn():
    import xfuser.envs as envs

    envs.PACKAGES_CHECKER.packages_info["has_long_ctx_attn"] = True
    for name in (
        "xfuser.config.config",
        "xfuser.core.distributed.parallel_state",
        "xfuser.core.distributed.group_coordinator",
        "xfuser.model_executor.layers.attention_processor",
        "xfuser.model_executor.models.transformers.transformer_wan",
    ):
        module = importlib.import_module(name)
        if hasattr(module, "HAS_LONG_CTX_ATTN"):
            module.HAS_LONG_CTX_ATTN = True


def bind_yunchang_groups():
    """After `initialize_model_parallel`: USP reads the module-level PROCESS_GROUP, which
    xfuser only imports from yunchang when CUDA is present."""
    if not needed():
        return
    import yunchang.globals
    import xfuser.model_executor.layers.usp as usp

    usp.PROCESS_GROUP = yunchang.globals.PROCESS_GROUP


def _register_cpu_flash_attention():
    from xfuser.core.distributed import attention_backend as ab

    from wanserve.kernels.attention import cpu_attention_with_lse

    ab.ATTENTION_FUNCTION_REGISTRY[ab.AttentionBackendType.SDPA_FLASH] = cpu_attention_with_lse


def apply() -> None:
    """Idempotent; call before importing anything from xfuser."""
    global _applied
    if _applied:
        return
    if needed():
        _as_cpu_build()
        _import_xfuser()
        _enable_long_ctx_attn()
        _register_cpu_flash_attention()
    else:
        import xfuser  # noqa: F401
    import xfuser as _x

    installed = getattr(_x, "__version__", None)
    if installed is not None and installed != XFUSER_VERSION and needed():
        raise RuntimeError(
            f"wanserve's CPU workarounds were written for xfuser {XFUSER_VERSION}, found {installed}"
        )
    _applied = True
