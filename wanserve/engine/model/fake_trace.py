"""The peak bytes a computation allocates, found by running it on fake tensors (no memory used).

Written for torch 2.13. `torch.distributed._tools.mem_tracker.MemTracker` does this with module
bookkeeping, but refuses a module called twice in one pass ("does not support memory tracking
for multiple iterative calls"), and the Wan VAE calls its decoder once per latent frame. So this
counts storages directly: every storage an op creates is added to the live bytes when it
appears and taken off when Python frees it, and the highest total is the peak. Parameters made
before the trace are not counted.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: weakref.WeakSet = weakref.WeakSet()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            if storage in self._seen:  # a view, or an op that wrote in place
                continue
            self._seen.add(storage)
            size = storage.nbytes()
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, size)
        return out

    def _free(self, size: int) -> None:
        self.live -= size


def fake_module(build: Callable[[], torch.nn.Module], fake: FakeTensorMode) -> torch.nn.Module:
    """`build()` on the meta device (it may set dtypes there), then given fake CPU storage."""
    with torch.device("meta"):
        module = build()
    with fake:
        return module.to_empty(device="cpu").eval()


def peak_bytes(run: Callable[[], object], fake: FakeTensorMode,
               calls_of: torch.nn.Module | None = None) -> tuple[int, list[int]]:
    """The most bytes alive at once while `run()` runs under `fake` (inputs made inside `run`
    are counted from their creation), and that peak so far after each call of `calls_of`."""
    tracker = _LiveBytes()
    after_calls: list[int] = []
    hook = calls_of and calls_of.register_forward_hook(
        lambda *_: after_calls.append(tracker.peak))
    try:
        with fake, tracker, torch.no_grad():
            run()
    finally:
        if hook:
            hook.remove()
    return tracker.peak, after_calls
