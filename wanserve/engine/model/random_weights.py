"""A published model layout (wanserve/engine/model/model_layouts.py) built with seeded random weights, the
parameters allocated straight on the target device in the target dtype.

The modules are constructed with their parameters on `meta` (no memory, no initialisation),
then each parameter is allocated on the device and filled there: norm scales 1, biases 0,
every other weight normal with std 1/sqrt(fan-in). Buffers that the constructors compute
(the rotary tables) are built normally and moved. On a CPU, whose generator makes ~80M values
a second (30 s for one full-width layer per expert and text encoder), a weight larger than
_CPU_BLOCK values repeats a block of that many: a prime, so no two rows of a matrix repeat.
The same seed gives every rank of a job the same weights. Used by `--model random:NAME` (full
size on a GPU, no disk) and by benchmarks/real_layout.py, which saves the result as a
diffusers-format checkpoint.
"""
from __future__ import annotations

import logging
import math
import time

import torch

from wanserve.engine.model.model_layouts import ModelLayout, RandomModel

log = logging.getLogger("wanserve.engine")

_CPU_BLOCK = 4_194_301  # the largest prime below 2**22
WEIGHTS_VERSION = 2  # changes whenever the values one seed gives change (caches key on it)
_FAN_IN_MODULES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
# a stand-in vocabulary: the real one is UMT5's 256k-piece sentencepiece model, which cannot
# be downloaded here; the token ids it gives stay far below the encoder's vocab_size
_ALPHABET = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
             ".,;:!?'\"-()/&%+=_@#*")


def build_tokenizer(spec: dict):
    """The published tokenizer class (UMT5's T5 tokenizer: <pad> 0, </s> 1, <unk> 2, sentinel
    `extra_ids` after the vocabulary) over a stand-in Unigram vocabulary, built offline."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(piece, -3.0) for char in _ALPHABET for piece in ("\u2581" + char, char)]
    return T5TokenizerFast(vocab=vocab, extra_ids=spec["extra_ids"])


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


def build_components(layout: ModelLayout, dtype: torch.dtype, device: torch.device,
                     seed: int = 0, transformer_class=None, keep_in_fp32: bool = True,
                     on_host: tuple[str, ...] = ()) -> dict:
    """Every component of `layout` (diffusers pipeline keyword arguments); the VAE in float32
    as the checkpoints ship it, the rest in `dtype`. Experts named in `on_host` are built in
    host memory instead of on `device`."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    transformer_class = transformer_class or WanTransformer3DModel
    parts = dict(
        tokenizer=build_tokenizer(layout.tokenizer),
        scheduler=UniPCMultistepScheduler(**layout.scheduler),
        text_encoder=materialise(lambda: UMT5EncoderModel(UMT5Config(**layout.text_encoder)),
                                 dtype, device, seed + 1, keep_in_fp32),
        vae=materialise(lambda: AutoencoderKLWan(**layout.vae), torch.float32, device,
                        seed + 2),
    )
    for index, name in enumerate(layout.experts):
        where = torch.device("cpu") if name in on_host else device
        parts[name] = materialise(lambda: transformer_class(**layout.transformer), dtype, where,
                                  seed + 10 + index, keep_in_fp32)
    return parts


def build_random_pipeline(model: RandomModel, dtype: torch.dtype, device: torch.device,
                          keep_on_host: tuple[str, ...] = ()):
    """The served pipeline of a `random:` model, the same on every rank, and what was built
    (for /health), as wanserve/engine/pipeline.load_pipeline returns for a checkpoint. The components
    named in `keep_on_host` are built in host memory (offloaded experts)."""
    from wanserve.engine.model.pipeline import WanServePipeline
    from wanserve.engine.parallel.sp_padding import WanServeTransformer

    layout = model.layout
    start = time.perf_counter()
    parts = build_components(layout, dtype, device, model.seed, WanServeTransformer,
                             on_host=keep_on_host)
    pipe = WanServePipeline(**parts, **layout.pipeline_config)
    pipe.set_progress_bar_config(disable=True)
    pipe.stage_times = {}
    seconds = time.perf_counter() - start
    params = {name: sum(p.numel() for p in module.parameters())
              for name, module in parts.items() if isinstance(module, torch.nn.Module)}
    log.info("built %s with random weights on %s in %.1fs (%s; %s)", model.spec, device,
             seconds, dtype, ", ".join(f"{k} {v / 1e9:.2f}B" for k, v in params.items()))
    return pipe, {"path": model.spec, "experts": len(layout.experts), "seconds": round(seconds, 2),
                  "random_weights": True, "parameters": params, "layers": layout.layers}
