"""The row-sharded VAE's causal convolutions on CPU, without copying each rank's band.

Written for distvae 0.1.0 (`WanCausalConv3dAdapter` around a `PatchConv3d`) and torch 2.13.0;
used only on CPU, where shared memory (kernels/shm_exchange.py) or gloo moves the halos.
distvae's convolution concatenates the neighbours' rows onto the band (a copy of the whole
activation), zero-pads it (another copy), convolves two rows more than it keeps and crops them
off (a third copy), and waits for the halos before it starts. The path below makes the 2-rank
decode of the benchmark model 4-28 % faster (benchmarks/cpu_components.py, BENCHMARKS.md).

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

from kernels import shm_exchange
from kernels.cpu_kernels import onednn_conv3d, with_causal_frames

ROWS = -2  # distvae's normalised patch axis for H in a 5-D tensor


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
    pad_w = conv.padding[2]

    def convolve(rows: torch.Tensor, pad_h: int) -> torch.Tensor:
        return onednn_conv3d(rows, conv.weight, conv.bias, conv.stride, (0, pad_h, pad_w), 1,
                             conv.groups)

    if conv.kernel_size[1] == 1:  # no neighbouring rows needed
        return convolve(x, 0)
    wait_for_halos = _post_halo_exchange(x, conv.parallel_context)
    height = x.shape[-2]
    out = convolve(x, 1) if height > 1 else None  # border rows as if the image ended here
    top, bottom = wait_for_halos()
    if height == 1:
        zero = torch.zeros_like(x[..., :1, :])
        rows = [top if top is not None else zero, x, bottom if bottom is not None else zero]
        return convolve(torch.cat(rows, dim=-2), 0)
    # the band's edge rows saw a zero row past the band: add what the halo row gives instead
    if top is not None:
        out[..., :1, :] += _halo_term(self, top, 0, pad_w)
    if bottom is not None:
        out[..., -1:, :] += _halo_term(self, bottom, 2, pad_w)
    return out


def _halo_term(adapter, halo: torch.Tensor, kernel_row: int, pad_w: int) -> torch.Tensor:
    """The halo row's part of the edge output row: the halo convolved with the one kernel row
    that reaches it (no bias: the band's convolution added it)."""
    conv = adapter.conv3d
    weight = conv.weight
    key = (weight.data_ptr(), weight._version)
    cached = getattr(adapter, "_wanserve_kernel_rows", None)
    if cached is None or cached[0] != key:
        cached = (key, [weight[:, :, :, row:row + 1, :].contiguous() for row in range(3)])
        adapter._wanserve_kernel_rows = cached
    return onednn_conv3d(halo, cached[1][kernel_row], None, conv.stride, (0, 0, pad_w), 1,
                         conv.groups)


def _eligible(conv, x: torch.Tensor) -> bool:
    """Zero-padded convolutions split by rows, with a 1- or 3-row kernel padded to keep the
    size and no spatial stride (all of the Wan VAE's causal convolutions: some stride in time),
    in float32 on CPU."""
    kernel_h = conv.kernel_size[1]
    return (x.device.type == "cpu" and x.dtype == torch.float32 and conv.padding_mode == "zeros"
            and tuple(conv.stride[1:]) == (1, 1) and tuple(conv.dilation) == (1, 1, 1)
            and conv.patch_dim == ROWS and kernel_h in (1, 3) and conv.padding[1] == kernel_h // 2
            and conv.padding[0] == 0)


def use_overlapped_halos(module: nn.Module) -> int:
    """Rebind the forward of every distvae Wan causal-convolution adapter under `module`
    (after distvae has sharded it); returns how many. A no-op without oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return 0
    from distvae.modules.adapters.layers.conv_adapters import WanCausalConv3dAdapter

    count = 0
    for sub in module.modules():
        if type(sub) is WanCausalConv3dAdapter and sub.conv3d.parallel_context.world_size > 1:
            sub.forward = types.MethodType(_sharded_causal_conv3d_forward, sub)
            count += 1
    return count
