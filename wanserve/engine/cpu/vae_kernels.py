"""Faster CPU kernels for the two operations the Wan VAE spends most of its CPU time in.

Written for torch 2.13.0 (CPU build) and diffusers 0.42.1's `autoencoder_kl_wan`; used only when
the model runs on CPU. Both replacements compute the same function (max |diff| ~1e-6 in float32,
checked in tests/test_cpu_vae_kernels.py); only the kernel changes.

1. 3-D convolution. For a batch-1 float32 input whose N*C*D*H is at most 20480 with a kernel no
   wider than 3 (most of the VAE's convolutions, which run on one latent frame and its two cached
   frames at a time), aten chooses its native `slow_conv3d_forward` over oneDNN. On the 256x256,
   17-frame VAE decode of the benchmark model that path took 2.2 s of the decode's 7.2 s; with
   every convolution on oneDNN all of them together took 2.9 s instead of 4.9 s. The causal
   convolution's spatial zero padding is also handed to oneDNN instead of copied in with F.pad.
2. RMS norm over channels. `WanRMS_norm` calls F.normalize(x, dim=1); `linalg_vector_norm` over
   dim 1 of a contiguous NCDHW tensor took 9.8 ms where (x * x).sum(1) took 0.5 ms
   (1x32x3x128x128, one thread): the whole norm went from 15 ms to 2 ms.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def onednn_conv(x: torch.Tensor, weight, bias=None, stride=1, padding=0, dilation=1,
                groups=1) -> torch.Tensor:
    """F.conv2d's or F.conv3d's arguments (zero padding given as numbers; the number of spatial
    dimensions is x's), always on oneDNN."""
    spatial = x.dim() - 2

    def per_dim(value) -> tuple:
        return (value,) * spatial if isinstance(value, int) else tuple(value)

    return torch.mkldnn_convolution(x.contiguous(), weight, bias, per_dim(padding),
                                    per_dim(stride), per_dim(dilation), groups)


def _conv_of(conv: nn.Conv3d, x: torch.Tensor, padding) -> torch.Tensor:
    return onednn_conv(x, conv.weight, conv.bias, conv.stride, padding, conv.dilation,
                       conv.groups)


def _conv3d_forward(self: nn.Conv3d, x: torch.Tensor, weight, bias) -> torch.Tensor:
    if x.device.type != "cpu" or self.padding_mode != "zeros" or weight is not self.weight:
        return nn.Conv3d._conv_forward(self, x, weight, bias)
    return _conv_of(self, x, self.padding)


def with_causal_frames(x: torch.Tensor, cache_x: torch.Tensor | None, pad_t: int) -> torch.Tensor:
    """Wan's causal time padding: the cached frames in front of `x`, zeros for the rest."""
    if cache_x is not None and pad_t > 0:
        x = torch.cat([cache_x.to(x.device), x], dim=2)
        pad_t -= cache_x.shape[2]
    if pad_t > 0:
        x = F.pad(x, (0, 0, 0, 0, pad_t, 0))
    return x


def _causal_conv3d_forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None):
    """WanCausalConv3d.forward with the spatial padding done inside the oneDNN kernel."""
    if x.device.type != "cpu":
        return type(self).forward(self, x, cache_x)
    pad_w, _, pad_h, _, pad_t, _ = self._padding
    return _conv_of(self, with_causal_frames(x, cache_x, pad_t), (0, pad_h, pad_w))


def _rms_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    """WanRMS_norm.forward (channel-first, float32): x / max(||x||, 1e-12) * scale * gamma + bias."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return type(self).forward(self, x)
    inv_norm = torch.rsqrt((x * x).sum(1, keepdim=True).clamp_min_(1e-24))
    return x * inv_norm.mul_(self.scale) * self.gamma + self.bias


def use_fast_cpu_kernels(module: nn.Module) -> int:
    """Rebind, in place, the forward of every float32 CPU 3-D convolution and channel-first
    Wan RMS norm under `module`; returns how many were rebound. A no-op without oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return 0
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm

    def on_cpu_in_float32(param: torch.Tensor) -> bool:
        return param.device.type == "cpu" and param.dtype == torch.float32

    # Exact types only: a subclass (distvae's sharded convolutions, for one) has a forward of
    # its own that this must not replace.
    count = 0
    for sub in module.modules():
        if type(sub) is WanCausalConv3d and on_cpu_in_float32(sub.weight):
            sub.forward = types.MethodType(_causal_conv3d_forward, sub)
        elif type(sub) is nn.Conv3d and on_cpu_in_float32(sub.weight):
            sub._conv_forward = types.MethodType(_conv3d_forward, sub)
        elif type(sub) is WanRMS_norm and sub.channel_first and on_cpu_in_float32(sub.gamma):
            sub.forward = types.MethodType(_rms_norm_forward, sub)
        else:
            continue
        count += 1
    return count


def use_onednn_in_distvae() -> None:
    """Point distvae's sharded 3-D convolutions at oneDNN too (written for distvae 0.1.0).

    distvae's PatchConv3d calls `F.conv3d` from its own module, on each rank's band of rows:
    bands are smaller than the whole frame, so even more of them fall to slow_conv3d. That
    module's `F` becomes a copy of torch.nn.functional whose conv3d is oneDNN's. Idempotent.
    """
    if not torch.backends.mkldnn.is_available():
        return
    import distvae.models.layers.conv3d as distvae_conv3d

    if getattr(distvae_conv3d.F, "wanserve_onednn", False):
        return

    def conv3d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        if input.device.type != "cpu" or input.dtype != torch.float32 or isinstance(padding, str):
            return F.conv3d(input, weight, bias, stride, padding, dilation, groups)
        return onednn_conv(input, weight, bias, stride, padding, dilation, groups)

    functional = types.SimpleNamespace(**{name: getattr(F, name) for name in dir(F)
                                          if not name.startswith("__")})
    functional.conv3d = conv3d
    functional.wanserve_onednn = True
    distvae_conv3d.F = functional
