"""The row-sharded VAE's convolutions on CPU, without copying each rank's band.

Written for distvae 0.1.0 (`WanCausalConv3dAdapter` around a `PatchConv3d`, `Conv2dAdapter`
around a `PatchConv2d`) and torch 2.13.0; used only on CPU, where shared memory
(wanserve/engine/cpu/shm_exchange.py) or gloo moves the halos. distvae's convolution concatenates the
neighbours' rows onto the band (a copy of the whole activation), zero-pads it (another copy),
convolves two rows more than it keeps and crops them off (a third copy), and waits for the
halos before it starts. The path below made the 2-rank decode of the benchmark model faster in
every comparison so far (4-28 % at 617af4d, 2.6-6.3 % at f8afd3d; benchmarks/cpu_components.py,
BENCHMARKS.md).

Here each rank posts its edge rows to its neighbours, convolves its band with zero padding while
they travel, then adds to its first and last output row what the received halo row contributes
(the halo convolved with the one kernel row that reaches it: a third of recomputing the row, and
no copy). Interior rows are the same sums as before; edge rows are summed in two parts, so the
video matches the one-rank decode to float rounding (~1e-6; tests/test_sharded_vae.py and
tests/test_multirank_equivalence.py compare). Every rank takes the same path for the
same convolution: the choice depends only on the layer and the dtype, never on a band's height.
"""
from __future__ import annotations

import types
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from wanserve.engine.cpu import shm_exchange
from wanserve.engine.cpu.vae_kernels import onednn_conv, with_causal_frames

ROWS = -2  # distvae's normalised patch axis for H (5-D and 4-D tensors alike)


def _post_halo_exchange(x: torch.Tensor, context) -> Callable[[], tuple]:
    """Send the first row up and the last row down; returns a wait that gives the rows just
    outside the band (None at the image's top or bottom)."""
    rank, world = context.rank, context.world_size
    edge = x[..., :1, :]
    channel = shm_exchange.channel_for(context.group, edge)
    if channel is not None and channel.fits(2 * edge.numel() * edge.element_size()):
        posted = channel.post_neighbours(edge if rank > 0 else None,
                                         x[..., -1:, :] if rank < world - 1 else None)
        return lambda: posted.wait(edge if rank > 0 else None, edge if rank < world - 1 else None)
    ops, top, bottom = [], None, None
    if rank > 0:
        top = torch.empty_like(edge)
        ops.append(dist.P2POp(dist.isend, edge.contiguous(), context.global_rank(rank - 1),
                              context.group))
        ops.append(dist.P2POp(dist.irecv, top, context.global_rank(rank - 1), context.group))
    if rank < world - 1:
        bottom = torch.empty_like(edge)
        ops.append(dist.P2POp(dist.isend, x[..., -1:, :].contiguous(),
                              context.global_rank(rank + 1), context.group))
        ops.append(dist.P2POp(dist.irecv, bottom, context.global_rank(rank + 1), context.group))
    pending = dist.batch_isend_irecv(ops) if ops else []

    def wait():
        for work in pending:
            work.wait()
        return top, bottom

    return wait


def _sharded_causal_conv3d_forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None):
    conv = self.conv3d
    if not _eligible(conv, x):
        return type(self).forward(self, x, cache_x)
    x = with_causal_frames(x, cache_x, self._padding[4])
    if conv.kernel_size[1] == 1:  # no neighbouring rows needed
        return _onednn(conv, x, conv.weight, conv.bias, (0, 0, conv.padding[2]))
    return _band_conv_with_halos(self, conv, x)


def _sharded_conv2d_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The resample blocks' 3x3 convolution (after the upsampling) the same way."""
    conv = self.conv2d
    if not _eligible(conv, x):
        return type(self).forward(self, x)
    return _band_conv_with_halos(self, conv, x)


def _band_conv_with_halos(adapter, conv, x: torch.Tensor) -> torch.Tensor:
    """`conv` (3-row kernel, 1 row of zero padding) over this rank's band of rows `x`, as the
    whole image would give it: halos posted first, the band convolved while they travel."""
    pad_w = conv.padding[-1]

    def padding(pad_h: int) -> tuple:
        return (0, pad_h, pad_w) if x.dim() == 5 else (pad_h, pad_w)

    wait_for_halos = _post_halo_exchange(x, conv.parallel_context)
    height = x.shape[-2]
    # border rows as if the image ended here
    out = _onednn(conv, x, conv.weight, conv.bias, padding(1)) if height > 1 else None
    top, bottom = wait_for_halos()
    if height == 1:
        zero = torch.zeros_like(x[..., :1, :])
        rows = [top if top is not None else zero, x, bottom if bottom is not None else zero]
        return _onednn(conv, torch.cat(rows, dim=-2), conv.weight, conv.bias, padding(0))
    # the band's edge rows saw a zero row past the band: add what the halo row gives instead
    if top is not None:
        out[..., :1, :] += _onednn(conv, top, _kernel_row(adapter, conv, 0), None, padding(0))
    if bottom is not None:
        out[..., -1:, :] += _onednn(conv, bottom, _kernel_row(adapter, conv, 2), None, padding(0))
    return out


def _onednn(conv, x: torch.Tensor, weight, bias, padding: tuple) -> torch.Tensor:
    return onednn_conv(x, weight, bias, conv.stride, padding, conv.dilation, conv.groups)


def _kernel_row(adapter, conv, row: int) -> torch.Tensor:
    """Row `row` of the convolution's kernel (the one that reaches a halo row), contiguous;
    kept on the adapter until the weight changes."""
    weight = conv.weight
    key = (weight.data_ptr(), weight._version)
    cached = getattr(adapter, "_wanserve_kernel_rows", None)
    if cached is None or cached[0] != key:
        cached = (key, [weight[..., r:r + 1, :].contiguous() for r in range(3)])
        adapter._wanserve_kernel_rows = cached
    return cached[1][row]


def _eligible(conv, x: torch.Tensor) -> bool:
    """Zero-padded convolutions split by rows, with a 1- or 3-row kernel padded to keep the
    size and no spatial stride (all of the Wan VAE's causal convolutions: some stride in time;
    the 3x3 convolution after each upsampling), in float32 on CPU."""
    kernel_h, pad_h = conv.kernel_size[-2], conv.padding[-2]
    return (x.device.type == "cpu" and x.dtype == torch.float32 and conv.padding_mode == "zeros"
            and tuple(conv.stride[-2:]) == (1, 1) and set(conv.dilation) == {1}
            and conv.patch_dim == ROWS and kernel_h in (1, 3) and pad_h == kernel_h // 2
            and (x.dim() == 4 or conv.padding[0] == 0))


def use_overlapped_halos(module: nn.Module) -> int:
    """Rebind the forward of every distvae Wan causal-convolution adapter and 2-D convolution
    adapter under `module` (after distvae has sharded it); returns how many. A no-op without
    oneDNN. The 2-D ones not eligible (the encoder's strided downsampling) keep distvae's path."""
    if not torch.backends.mkldnn.is_available():
        return 0
    from distvae.modules.adapters.layers.conv_adapters import (
        Conv2dAdapter,
        WanCausalConv3dAdapter,
    )

    forwards = {WanCausalConv3dAdapter: ("conv3d", _sharded_causal_conv3d_forward),
                Conv2dAdapter: ("conv2d", _sharded_conv2d_forward)}
    count = 0
    for sub in module.modules():
        if type(sub) not in forwards:
            continue
        attr, forward = forwards[type(sub)]
        if getattr(sub, attr).parallel_context.world_size > 1:
            sub.forward = types.MethodType(forward, sub)
            count += 1
    return count
