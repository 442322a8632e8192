"""A published model layout (wanserve/engine/model/model_layouts.py) built with seeded random
weights (wanserve/engine/model/materialise.py), the parameters allocated straight on the target
device in the target dtype. The same seed gives every rank of a job the same weights. Used by
`--model random:NAME` (full size on a GPU, no disk) and by benchmarks/real_layout.py, which
saves the result as a diffusers-format checkpoint.
"""
from __future__ import annotations

import logging
import time

import torch

from wanserve.engine.model.materialise import materialise
from wanserve.engine.model.model_layouts import ModelLayout, RandomModel

log = logging.getLogger("wanserve.engine")

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
