"""Placing the model on the device, with the inactive Wan2.2 expert optionally kept in CPU memory.

Wan2.2-I2V-A14B runs its high-noise expert (`transformer`) for the steps above the boundary
and its low-noise expert (`transformer_2`) after it: never both at once. Two 14B experts in
bf16 are ~57 GB; with offload on, one is resident (~28.6 GB) and the switch costs one move of
each expert per request (and one back at the start of the next), so 480p fits one 80 GB card.

The move happens in a forward pre-hook on each expert, so whichever expert the pipeline calls
is made resident first, whatever the boundary or step count. Inference never changes a weight,
so each expert keeps one host copy of its tensors (pinned on CUDA, for fast copies): making an
expert resident copies them to the device, and sending it back only points its parameters at
that copy again, without copying or allocating anything.

LoRA adapters are the exception: loading one adds tensors, fusing one changes weights in place
(on the device, for the resident expert). After each such change `refresh` takes host copies
of the new tensors and copies the changed layers of the resident expert back to theirs, so a
swap neither loses an adapter nor brings back the weights from before a fuse.
"""
from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger("wanserve.engine")

EXPERTS = ("transformer", "transformer_2")


class ExpertOffload:
    def __init__(self, pipe, compute_device: torch.device, copy_to_device=None):
        self.compute_device = torch.device(compute_device)
        self._copy_to_device = copy_to_device or (
            lambda t: t.to(self.compute_device, non_blocking=True))
        self.experts = {name: getattr(pipe, name) for name in EXPERTS if getattr(pipe, name, None)}
        self.pin = self.compute_device.type == "cuda"
        self.host = {name: [(t, self._host_copy(t)) for t in _tensors(module)]
                     for name, module in self.experts.items()}
        for name, tensors in self.host.items():
            for tensor, copy in tensors:
                tensor.data = copy
        self.resident: str | None = None
        self.swaps = 0
        for name, module in self.experts.items():
            module.register_forward_pre_hook(lambda _m, _a, name=name: self.make_resident(name))
        self.make_resident("transformer")

    def make_resident(self, name: str) -> None:
        if self.resident == name:
            return
        start = time.perf_counter()
        if self.resident is not None:
            for tensor, copy in self.host[self.resident]:
                tensor.data = copy
        for tensor, copy in self.host[name]:
            tensor.data = self._copy_to_device(copy)
        if self.compute_device.type == "cuda":
            torch.cuda.synchronize(self.compute_device)
        if self.resident is not None:
            self.swaps += 1
            log.info("expert swap: %s resident (%.2fs)", name, time.perf_counter() - start)
        self.resident = name


    def _host_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        copy = tensor.data.to("cpu")
        return copy.pin_memory() if self.pin else copy

    def refresh(self) -> None:
        """Host copies for what adapters changed (every rank, after a load, fuse or unfuse)."""
        for name, module in self.experts.items():
            known = {id(tensor): copy for tensor, copy in self.host[name]}
            changed = _adapter_layer_tensors(module) if name == self.resident else set()
            host = []
            for tensor in _tensors(module):
                copy = known.get(id(tensor))
                if copy is None or (name != self.resident and
                                    tensor.data_ptr() != copy.data_ptr()):
                    copy = self._host_copy(tensor)  # new, or replaced while on the host
                    if name != self.resident:
                        tensor.data = copy
                elif id(tensor) in changed:
                    copy.copy_(tensor.data)  # fused or unfused in place on the device
                host.append((tensor, copy))
            self.host[name] = host


def _adapter_layer_tensors(module: torch.nn.Module) -> set[int]:
    """The tensors of the layers PEFT wrapped: the only ones an adapter change touches."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {id(t) for layer in module.modules() if isinstance(layer, BaseTunerLayer)
            for t in _tensors(layer)}


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def place_on_device(pipe, device: torch.device, offload_inactive_expert: bool,
                    text_encoder_on_host: bool = False, filled_later: tuple[str, ...] = ()
                    ) -> tuple[dict, ExpertOffload | None]:
    """Every component on `device` (most were loaded there already); with offload, the experts
    are left to ExpertOffload, which keeps only the one in use there; the text encoder on the
    host stays there (it encodes there: diffusers 0.42.1 runs it where its weights are and moves
    the embeddings to the device). The components named in `filled_later` are left alone
    (experts still on `meta`, filled after sharding). Returns what it did (for /health) and the
    offload."""
    on_host = (EXPERTS if offload_inactive_expert else ()) + (
        ("text_encoder",) if text_encoder_on_host else ()) + filled_later
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module) and name not in on_host:
            component.to(device)
    placed = {"device": str(device),
              "text_encoder": "cpu" if text_encoder_on_host else str(device)}
    if not offload_inactive_expert:
        placed["experts"] = "both resident" if pipe.transformer_2 is not None else "resident"
        return placed, None
    placed["experts"] = "one resident, the other in CPU memory"
    return placed, ExpertOffload(pipe, device)
