"""Attention backend choice (wanserve.kernels.attention.select_backend), without a GPU.

The flash-attn stand-ins carry the real parameter lists of `flash_attn_func`:
- flash-attn 3 at tag v2.8.3 / v2.8.3.post1 (hopper/flash_attn_interface.py): no
  return_attn_probs; it returns only `out`.
- flash-attn 3 on main since 203b9b3d ("[FA3] Allow returning LSE via kwarg", 2025-08-29):
  the same list plus return_attn_probs=False; returns (out, softmax_lse) when it is True.
- flash-attn 2 v2.x (flash_attn/flash_attn_interface.py).
A torch.device("cuda") can be built without a GPU; nothing here allocates on it.
"""
from __future__ import annotations

import importlib.machinery
import math
import sys
import types

import pytest
import torch

from wanserve.engine.parallel import xfuser_compat

xfuser_compat.apply()

from xfuser.core.distributed import attention_backend as ab  # noqa: E402
from xfuser.envs import PACKAGES_CHECKER  # noqa: E402

from wanserve.kernels import attention  # noqa: E402
from wanserve.kernels.attention import Kernels, select_backend  # noqa: E402

CUDA = torch.device("cuda")
HALF = [torch.bfloat16, torch.float16]


def _attend_bshd(q, k, v, causal=False, softmax_scale=None):
    scale = softmax_scale or 1 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bshd,bthd->bhst", q, k) * scale
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), -math.inf)
    lse = scores.logsumexp(-1)
    out = torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v)
    return out, lse


def fa3_v283(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None,
             k_descale=None, v_descale=None, window_size=(-1, -1), attention_chunk=0,
             softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False, sm_margin=0):
    return _attend_bshd(q, k, v, causal, softmax_scale)[0]


def fa3_main(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None,
             k_descale=None, v_descale=None, window_size=(-1, -1), attention_chunk=0,
             softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False, sm_margin=0,
             return_attn_probs=False):
    out, lse = _attend_bshd(q, k, v, causal, softmax_scale)
    return (out, lse) if return_attn_probs else out


def fa2(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    out, lse = _attend_bshd(q, k, v, causal, softmax_scale)
    return (out, lse, None) if return_attn_probs else out


def probe_of(**available):
    kernels = Kernels(**available)
    return lambda device, dtype: kernels


def no_probe(device, dtype):
    raise AssertionError("the probe must not run here")


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("ring", [1, 2])
def test_cpu_device_keeps_the_cpu_flash_kernel(dtype, ring):
    """checked with: `if device.type != "cuda"` -> `if device.type == "meta"` (fails: the probe runs)."""
    backend = select_backend(torch.device("cpu"), dtype, ring, probe=no_probe)
    assert (backend.name, backend.xfuser_backend) == ("cpu-flash", "SDPA_FLASH")
    assert "log-sum-exp" in backend.reason


def test_float32_on_cuda_runs_sdpa_even_with_every_kernel_present():
    """checked with: the `if dtype not in HALF_DTYPES` block removed (picks flash-attn-3)."""
    backend = select_backend(CUDA, torch.float32, 1,
                             probe=probe_of(flash_attn_3=fa3_main, flash_attn_2=fa2, cudnn=True))
    assert (backend.name, backend.xfuser_backend) == ("sdpa", "SDPA")
    assert "float32" in backend.reason and "float16/bfloat16 only" in backend.reason


def test_float32_ring_on_cuda_fails_at_start_up_with_the_fix():
    """checked with: the `if ring_degree > 1: raise` line removed (returns sdpa, no error)."""
    with pytest.raises(ValueError, match="--dtype bfloat16"):
        select_backend(CUDA, torch.float32, 2, probe=probe_of(cudnn=True))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("ring", [1, 2])
def test_flash_attn_3_from_main_comes_first(dtype, ring):
    """checked with: FLASH_3 moved after CUDNN in `candidates` (picks cudnn)."""
    backend = select_backend(CUDA, dtype, ring,
                             probe=probe_of(flash_attn_3=fa3_main, flash_attn_2=fa2, cudnn=True))
    assert (backend.name, backend.xfuser_backend) == ("flash-attn-3", "FLASH_3")


@pytest.mark.parametrize("ring", [1, 2])
def test_flash_attn_3_from_a_release_tag_is_passed_over(ring):
    """checked with: `_accepts(fn, "return_attn_probs")` -> `True` (picks flash-attn-3)."""
    backend = select_backend(CUDA, torch.bfloat16, ring,
                             probe=probe_of(flash_attn_3=fa3_v283, flash_attn_2=fa2))
    assert (backend.name, backend.xfuser_backend) == ("flash-attn-2", "FLASH")
    assert "flash-attn 3 lacks return_attn_probs, which xfuser 0.7.0 passes" in backend.reason
    assert backend.reason.endswith("using flash-attn-2")


def test_cudnn_ranks_above_flash_attn_2():
    """checked with: the CUDNN and FLASH entries of `candidates` swapped (picks flash-attn-2)."""
    backend = select_backend(CUDA, torch.float16, 2,
                             probe=probe_of(flash_attn_3=fa3_v283, flash_attn_2=fa2, cudnn=True))
    assert (backend.name, backend.xfuser_backend) == ("cudnn", "CUDNN")
    assert backend.reason.startswith("flash-attn 3 lacks return_attn_probs")


@pytest.mark.parametrize("ring, expected", [(1, ("sdpa", "SDPA")), (2, ("sdpa-flash", "SDPA_FLASH"))])
def test_without_kernels_torch_serves_and_the_reason_lists_each_one(ring, expected):
    """checked with: `if ring_degree > 1` -> `if ring_degree > 2` (ring 2 gets SDPA, which xfuser
    refuses for ring attention); and with `why_not.get(...)` replaced by "not usable"."""
    why = {"flash-attn-3": "not installed", "flash-attn-2": "not installed",
           "cudnn": "cuDNN not available"}
    backend = select_backend(CUDA, torch.bfloat16, ring, probe=probe_of(why_not=why))
    assert (backend.name, backend.xfuser_backend) == expected
    assert backend.reason.startswith("flash-attn 3: not installed; cuDNN attention: cuDNN not "
                                     "available; flash-attn 2: not installed; using ")


# The default probe reads xfuser's own state: PACKAGES_CHECKER's flags and the kernel names
# attention_backend.py binds at import time when those flags are set.

@pytest.fixture
def xfuser_state(monkeypatch):
    info = dict(PACKAGES_CHECKER.get_packages_info())
    monkeypatch.setattr(PACKAGES_CHECKER, "packages_info", info)
    monkeypatch.setattr(attention, "_cudnn_attention_usable", lambda device, dtype: False)
    for name in ("flash_attn_func_3", "flash_attn_func_2"):
        monkeypatch.delattr(ab, name, raising=False)

    def bind(flag, name, fn):
        info[flag] = True
        monkeypatch.setattr(ab, name, fn, raising=False)
    return info, bind


def _module_on_path(monkeypatch, name, **attrs):
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attrs)
    monkeypatch.setitem(sys.modules, name, module)


def test_default_probe_takes_the_kernels_xfuser_bound(xfuser_state):
    """checked with: `info.get("has_flash_attn_3")` -> `info.get("has_flash_attn_4")` (FA3 unseen)."""
    _, bind = xfuser_state
    bind("has_flash_attn_3", "flash_attn_func_3", fa3_main)
    bind("has_flash_attn", "flash_attn_func_2", fa2)
    backend = select_backend(CUDA, torch.bfloat16, 1)
    assert (backend.name, backend.xfuser_backend) == ("flash-attn-3", "FLASH_3")


def test_default_probe_checks_the_signature_of_what_xfuser_bound(xfuser_state):
    """checked with: `_accepts(fn, "return_attn_probs")` -> `True` (picks flash-attn-3)."""
    _, bind = xfuser_state
    bind("has_flash_attn_3", "flash_attn_func_3", fa3_v283)
    backend = select_backend(CUDA, torch.bfloat16, 2)
    assert (backend.name, backend.xfuser_backend) == ("sdpa-flash", "SDPA_FLASH")
    assert "flash-attn 3 lacks return_attn_probs" in backend.reason


def test_a_package_xfuser_could_not_import_is_not_chosen(xfuser_state, monkeypatch):
    """A flash-attn on disk (find_spec finds it) that xfuser's check rejected, e.g. a build for
    another torch: xfuser never bound its kernel name, so choosing it would raise NameError.

    checked with: in xfuser_kernels, `fa3 = ...` -> `sys.modules["flash_attn_interface"].flash_attn_func`
    (the find_spec-style detection; picks flash-attn-3)."""
    _module_on_path(monkeypatch, "flash_attn_interface", flash_attn_func=fa3_main)
    _module_on_path(monkeypatch, "flash_attn", flash_attn_func=fa2, __version__="2.8.3")
    backend = select_backend(CUDA, torch.bfloat16, 1)
    assert (backend.name, backend.xfuser_backend) == ("sdpa", "SDPA")
    assert "flash-attn 3: installed, but xfuser 0.7.0 rejected it" in backend.reason
    assert "flash-attn 2: installed, but xfuser 0.7.0 rejected it" in backend.reason


def test_xfuser_flash_3_call_needs_return_attn_probs(monkeypatch):
    """The premise of the signature check, on xfuser's own FLASH_3 function: the release-tag
    signature raises TypeError there, the main one runs and returns the log-sum-exp.

    checked with: fa3_v283 given `**kwargs` (no TypeError)."""
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    call = ab.ATTENTION_FUNCTION_REGISTRY[ab.AttentionBackendType.FLASH_3]
    monkeypatch.setattr(ab, "flash_attn_func_3", fa3_v283, raising=False)
    with pytest.raises(TypeError, match="return_attn_probs"):
        call(q, k, v, 0.0, False)
    monkeypatch.setattr(ab, "flash_attn_func_3", fa3_main, raising=False)
    out, lse = call(q, k, v, 0.0, False)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert lse.shape == (1, 2, 5)


def test_a_required_backend_is_taken_when_usable_and_refused_with_the_reason_when_not():
    """`--attention-backend NAME` (benchmarks/gpu_served.py times each backend through it).

    checked with: `if why_not is not None: raise` removed (an FA3 from a release tag is taken)."""
    kernels = probe_of(flash_attn_3=fa3_v283, flash_attn_2=fa2, cudnn=True)
    backend = select_backend(CUDA, torch.bfloat16, 1, probe=kernels, require="flash-attn-2")
    assert (backend.name, backend.xfuser_backend) == ("flash-attn-2", "FLASH")
    backend = select_backend(CUDA, torch.bfloat16, 2, probe=kernels, require="sdpa-flash")
    assert (backend.name, backend.xfuser_backend) == ("sdpa-flash", "SDPA_FLASH")
    with pytest.raises(ValueError, match="flash-attn-3: flash-attn 3 lacks return_attn_probs"):
        select_backend(CUDA, torch.bfloat16, 1, probe=kernels, require="flash-attn-3")
    with pytest.raises(ValueError, match="sdpa: not one of the backends for cpu"):
        select_backend(torch.device("cpu"), torch.bfloat16, 1, probe=no_probe, require="sdpa")
    with pytest.raises(ValueError, match="one of auto, flash-attn-3"):
        select_backend(CUDA, torch.bfloat16, 1, probe=kernels, require="flash")
