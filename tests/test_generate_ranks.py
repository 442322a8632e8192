"""wanserve/engine/serving/generate.py on several ranks: with the VAE sharded every rank decodes, but only rank 0
turns the decoded video into frames, and no rank holds the whole decoded video as one tensor;
stage times wait for the GPU's queued work.

The rank check runs as this file under torchrun (Ulysses 2, the VAE sharded over both ranks).
Checked with: `frames=True` on every rank in wanserve/engine/serving/worker.py (rank 1 post-processes too), and
`stage_clock` returning `time.perf_counter` for CUDA (no synchronize).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

REPO = Path(__file__).resolve().parent.parent
FRAMES = 9  # 3 latent frames: decoder calls of 1, 4 and 4 frames; 9 is no size inside them
SIDE = 64


def test_only_rank_0_postprocesses_the_decoded_video():
    """Two requests (float frames, then uint8 frames), 3 decoder calls each, on both ranks.
    "whole_video_tensors" counts every tensor made during the decode, on each rank, with the
    video's frame count among its sizes and at least the video's elements: the whole decoded
    video in any layout, (B, C, F, H, W) as diffusers' decode concatenates it or a stack of
    frames. On the CPU the device is the host, so none there means none on the host; the frame
    post-processing, the other way onto the host, runs on rank 0 alone ("postprocessed").
    checked with: `decode_latents` decoding through `vae.decode` with the frame hooks, as before
    (wanserve/engine/serving/generate.py): 4 whole-video tensors on rank 1 (diffusers'
    concatenation and its clamp, two requests) and on rank 0."""
    from conftest import torchrun_script

    rank_0, rank_1 = torchrun_script(__file__, 2)
    assert rank_1 == {"decoder_calls": 6, "postprocessed": 0, "whole_video_tensors": 0,
                      "frames": [None, None], "uint8_is_the_encoders_rounding": None}
    # rank 0 post-processes each decoder call's frames as they come
    assert rank_0 == {"decoder_calls": 6, "postprocessed": 6, "whole_video_tensors": 0,
                      "frames": [[FRAMES, SIDE, SIDE, 3, "float32"],
                                 [FRAMES, SIDE, SIDE, 3, "uint8"]],
                      "uint8_is_the_encoders_rounding": True}


def test_stage_clock_waits_for_the_gpu(monkeypatch):
    from wanserve.engine.serving.generate import stage_clock

    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    gpu = torch.device("cuda", 3)
    clock = stage_clock(gpu)
    before = time.perf_counter()
    assert clock() >= before and waited == [gpu]
    assert stage_clock(torch.device("cpu")) is time.perf_counter


class _WholeVideoWatch(TorchDispatchMode):
    """Counts the tensors made while it is on that hold the whole decoded video."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if (isinstance(value, torch.Tensor) and value.dim() >= 4 and FRAMES in value.shape
                    and value.numel() >= FRAMES * SIDE * SIDE * 3):
                self.seen += 1
        return out


def _ranks() -> list:
    import numpy as np
    import torch.distributed as dist

    from wanserve.api.video import _to_uint8
    from wanserve.engine.assembly import assemble
    from wanserve.engine.config import load_config
    from wanserve.engine.parallel.distributed import init_distributed, shutdown
    from wanserve.engine.serving import generate
    from wanserve.engine.serving.offline import request_from_spec
    from wanserve.engine.startup import resolve_model_path
    from wanserve.engine.serving.worker import end_of_job, run_request

    cfg = load_config(["--ulysses", "2"])
    ctx = init_distributed(cfg.layout, cfg.collective_timeout_s)
    try:
        model = assemble(cfg, ctx, resolve_model_path(cfg))
        counts = {"decoder_calls": 0, "postprocessed": 0}
        # each request's pipeline view makes its own video processor: count on the class
        processor = type(model.pipe.video_processor)
        postprocess = processor.postprocess_video

        def counted(*args, **kwargs):
            counts["postprocessed"] += 1
            return postprocess(*args, **kwargs)

        processor.postprocess_video = counted
        model.pipe.vae.decoder.register_forward_pre_hook(
            lambda *_: counts.__setitem__("decoder_calls", counts["decoder_calls"] + 1))
        watch, decode_latents = _WholeVideoWatch(), generate.decode_latents

        def watched(*args, **kwargs):
            with watch:
                return decode_latents(*args, **kwargs)

        generate.decode_latents = watched
        spec = {"width": SIDE, "height": SIDE, "num_frames": FRAMES, "num_inference_steps": 2}
        results = []
        for as_uint8 in (False, True):
            request = request_from_spec(f"ranks-{as_uint8}", spec, cfg)
            results.append(run_request(ctx, model, request, as_uint8=as_uint8))
            end_of_job(ctx, model)
        float_frames, uint8_frames = (r.frames if r else None for r in results)
        mine = {**counts, "whole_video_tensors": watch.seen,
                "frames": [[*r.frames.shape, r.frames.dtype.name] if r else None
                           for r in results],
                "uint8_is_the_encoders_rounding": (
                    bool(np.array_equal(uint8_frames, _to_uint8(float_frames)))
                    if ctx.is_leader else None)}
        everyone = [None] * ctx.world_size
        dist.all_gather_object(everyone, mine)
        return everyone
    finally:
        shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    result = _ranks()
    if int(os.environ["RANK"]) == 0:
        print(json.dumps(result), flush=True)
