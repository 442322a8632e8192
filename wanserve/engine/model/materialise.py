"""A module built with its parameters allocated straight on a device in a dtype, seeded
random values filled there (or none, on `meta`): the building block of `--model random:NAME`
(wanserve/engine/model/random_weights.py) and of sliced loading's empty expert
(wanserve/engine/parallel/sliced_loading.py).

The modules are constructed with their parameters on `meta` (no memory, no initialisation),
then each parameter is allocated on the device and filled there: norm scales 1, biases 0,
every other weight normal with std 1/sqrt(fan-in). Buffers that the constructors compute
(the rotary tables) are built normally and moved. On a CPU, whose generator makes ~80M values
a second (30 s for one full-width layer per expert and text encoder), a weight larger than
_CPU_BLOCK values repeats a block of that many: a prime, so no two rows of a matrix repeat.
The same seed gives every rank of a job the same weights.
"""
from __future__ import annotations

import math

import torch

_CPU_BLOCK = 4_194_301  # the largest prime below 2**22
WEIGHTS_VERSION = 2  # changes whenever the values one seed gives change (caches key on it)
_FAN_IN_MODULES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def _fill(tensor: torch.Tensor, module: torch.nn.Module, name: str, generator) -> None:
    if "norm" in type(module).__name__.lower() or name == "gamma":
        tensor.fill_(0.0 if name in ("bias", "beta") else 1.0)
    elif name == "bias":
        tensor.zero_()
    else:
        fan_in = (math.prod(tensor.shape[1:]) if isinstance(module, _FAN_IN_MODULES)
                  else tensor.shape[-1])
        if tensor.device.type != "cpu" or tensor.numel() <= _CPU_BLOCK:
            tensor.normal_(0.0, fan_in ** -0.5, generator=generator)
            return
        block = torch.empty(_CPU_BLOCK, dtype=tensor.dtype).normal_(0.0, fan_in ** -0.5,
                                                                    generator=generator)
        flat = tensor.view(-1)
        whole = flat.numel() // _CPU_BLOCK * _CPU_BLOCK
        flat[:whole].view(-1, _CPU_BLOCK).copy_(block.expand(whole // _CPU_BLOCK, -1))
        flat[whole:].copy_(block[:flat.numel() - whole])


@torch.no_grad()
def materialise(factory, dtype: torch.dtype, device: torch.device, seed: int,
                keep_in_fp32: bool = True, keep_buffers: bool = False) -> torch.nn.Module:
    """`factory()`'s module with random weights on `device`. With `keep_in_fp32` the
    submodules the class names in `_keep_in_fp32_modules` stay float32, as from_pretrained
    leaves them. With `keep_buffers` the buffers stay where the constructors built them (the
    host)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        module = factory()
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ()) if keep_in_fp32 else set()
    on_meta = torch.device(device).type == "meta"  # shapes only: counting, not running
    generator = None if on_meta else torch.Generator(device).manual_seed(seed)
    made: dict[int, torch.nn.Parameter] = {}  # tied parameters stay tied
    for path, sub in module.named_modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            fp32 = bool(keep & set(f"{path}.{name}".split(".")))
            if id(param) not in made:
                data = torch.empty(param.shape, dtype=torch.float32 if fp32 else dtype,
                                   device=device)
                if not on_meta:
                    _fill(data, sub, name, generator)
                made[id(param)] = torch.nn.Parameter(data, requires_grad=False)
            sub._parameters[name] = made[id(param)]
    if hasattr(module, "tie_weights"):  # transformers: the input embeddings are shared
        module.tie_weights()
    if not keep_buffers:
        torch.nn.Module.to(module, device)  # the buffers; parameters are there already
    return module.eval()
