"""Text embeddings cached per rank (wanserve/engine/model/prompt_cache.py): a hit is the fresh
encode exactly, the cache keeps its bound, and the server counts hits and misses."""
from __future__ import annotations

import requests
import torch

from conftest import metric, png_bytes, start_server
from wanserve.engine.model.pipeline import WanServePipeline
from wanserve.engine.model.prompt_cache import PromptCache
from wanserve.engine.model.tiny_model import build_tiny_components


def _pipe(capacity: int | None) -> WanServePipeline:
    pipe = WanServePipeline(**build_tiny_components())
    pipe.stage_times = {}
    pipe.prompt_cache = PromptCache(capacity) if capacity else None
    return pipe


def _encode(pipe, prompt, negative="", guidance=True, length=512):
    with torch.no_grad():
        return pipe.encode_prompt(prompt, negative_prompt=negative,
                                  do_classifier_free_guidance=guidance,
                                  max_sequence_length=length, device=torch.device("cpu"))


def test_a_hit_is_the_fresh_encode_and_the_cache_keeps_its_bound():
    """checked with: the key without `max_sequence_length`; `move_to_end` dropped (first in,
    first out); a hit returning the stored tensor itself instead of a clone."""
    fresh, pipe = _pipe(None), _pipe(2)
    want = _encode(fresh, "a fox in the snow", "blurry")
    got = _encode(pipe, "a fox in the snow", "blurry")  # two misses
    again = _encode(pipe, "a fox in the snow", "blurry")  # two hits
    for mine in (got, again):
        assert all(torch.equal(a, b) for a, b in zip(mine, want))
    assert (pipe.prompt_cache.hits, pipe.prompt_cache.misses) == (2, 2)
    again[0].add_(1)  # what a request does to its embedding stays its own
    assert torch.equal(_encode(pipe, "a fox in the snow", "blurry")[0], want[0])
    # without guidance no negative is encoded; another length is another embedding
    assert _encode(pipe, "a fox in the snow", guidance=False)[1] is None
    short = _encode(pipe, "a fox in the snow", guidance=False, length=64)[0]
    assert short.shape[1] == 64 and torch.equal(
        short, _encode(fresh, "a fox in the snow", guidance=False, length=64)[0])
    assert len(pipe.prompt_cache) == 2
    # least recently used out: "a fox" (just used) stays, "blurry" went for the 64-token fox
    hits, misses = pipe.prompt_cache.hits, pipe.prompt_cache.misses
    _encode(pipe, "a fox in the snow", guidance=False, length=512)
    assert (pipe.prompt_cache.hits, pipe.prompt_cache.misses) == (hits + 1, misses)
    _encode(pipe, "blurry", guidance=False)
    assert pipe.prompt_cache.misses == misses + 1 and len(pipe.prompt_cache) == 2


def test_the_server_encodes_the_default_negative_at_start_up_and_counts(tmp_path):
    """A fresh server has encoded its default negative prompt (one miss); a request with
    guidance and that negative then encodes only its prompt, and the same request again
    nothing.
    checked with: `attach_prompt_cache` warming with `max_sequence_length=256`; the view of
    `for_request` without the cache (wanserve/engine/model/pipeline.py)."""
    server = start_server(tmp_path)
    try:
        count = lambda result: metric(server, f'wanserve_prompt_cache_total{{result="{result}"}}')
        assert (count("hit"), count("miss")) == (0, 1)
        for expected in ((1, 2), (3, 2)):
            resp = requests.post(server.url + "/v1/videos",
                                 data={"prompt": "a cached prompt", "size": "64x48",
                                       "num_frames": "5", "num_inference_steps": "1",
                                       "guidance_scale": "3"},
                                 files={"input_reference": ("r.png", png_bytes(), "image/png")},
                                 timeout=300)
            assert resp.status_code == 200, resp.text
            assert (count("hit"), count("miss")) == expected
    finally:
        assert server.stop() == 0
