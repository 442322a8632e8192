"""Text embeddings kept per rank: a prompt (or negative prompt) seen before is not encoded again.

One entry per text the pipeline encodes (diffusers' `_get_t5_prompt_embeds`: the prompt, and
the negative prompt only when the request uses guidance), so a request without guidance never
encodes a negative and the default negative prompt, encoded at start-up, is shared by every
request that keeps it. The key is everything the embedding depends on: the text encoder and the
tokenizer (by identity: LoRA adapters never touch them), the device the encoder runs on and the
one the embedding goes to, the dtype, the max sequence length, the videos per prompt and the
texts. Entries are clones: what a request does with its embedding never reaches the cache.
"""
from __future__ import annotations

import inspect
import threading
from collections import OrderedDict
from typing import Callable

import torch
from diffusers.utils.torch_utils import get_module_execution_device

ENTRIES = 32  # A14B: 512 x 4096 bf16 = 4 MiB an entry on the device


class PromptCache:
    def __init__(self, capacity: int = ENTRIES):
        self.capacity = capacity
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def embeds(self, pipe, encode: Callable, prompt, num_videos_per_prompt: int,
               max_sequence_length: int, device, dtype) -> torch.Tensor:
        """`encode(prompt, num_videos_per_prompt, max_sequence_length, device, dtype)`'s
        result, from the cache when it holds it."""
        device = torch.device(device or pipe._execution_device)
        dtype = dtype or pipe.text_encoder.dtype
        texts = (prompt,) if isinstance(prompt, str) else tuple(prompt)
        key = (pipe.text_encoder, pipe.tokenizer, str(get_module_execution_device(pipe.text_encoder)),
               str(device), dtype, max_sequence_length, num_videos_per_prompt, texts)
        with self._lock:
            cached = self._entries.get(key)
            if cached is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return cached.clone()
            self.misses += 1
        embeds = encode(prompt, num_videos_per_prompt, max_sequence_length, device, dtype)
        with self._lock:
            self._entries[key] = embeds.clone()
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return embeds


def attach_prompt_cache(pipe, negative_prompt: str, guidance_scale: float) -> dict:
    """Give `pipe` a prompt cache and encode the default negative prompt into it when the
    default guidance uses one (as a request's pipeline call would: its max sequence length, on
    its execution device)."""
    pipe.prompt_cache = PromptCache()
    warmed = guidance_scale > 1
    if warmed:
        call = inspect.signature(super(type(pipe), pipe).__call__)
        with torch.no_grad():
            pipe._get_t5_prompt_embeds(
                prompt=negative_prompt,
                max_sequence_length=call.parameters["max_sequence_length"].default,
                device=pipe._execution_device)
    return {"entries": pipe.prompt_cache.capacity, "default_negative_encoded": warmed}
