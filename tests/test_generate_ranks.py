"""wanserve/engine/serving/generate.py on several ranks: with the VAE sharded every rank decodes, but only rank 0
turns the decoded video into frames; stage times wait for the GPU's queued work.

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

REPO = Path(__file__).resolve().parent.parent


def test_only_rank_0_postprocesses_the_decoded_video():
    from conftest import torchrun_script

    per_rank = torchrun_script(__file__, 2)
    # rank 0 post-processes each decoder call's frames as they come: 5 frames, 2 calls (1 + 4)
    assert per_rank == [{"decodes": 1, "postprocessed": 2, "frames": [5, 64, 64, 3]},
                        {"decodes": 1, "postprocessed": 0, "frames": None}]


def test_stage_clock_waits_for_the_gpu(monkeypatch):
    from wanserve.engine.serving.generate import stage_clock

    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    gpu = torch.device("cuda", 3)
    clock = stage_clock(gpu)
    before = time.perf_counter()
    assert clock() >= before and waited == [gpu]
    assert stage_clock(torch.device("cpu")) is time.perf_counter


def _ranks() -> list:
    import torch.distributed as dist

    from wanserve.engine.assembly import assemble
    from wanserve.engine.config import load_config
    from wanserve.engine.parallel.distributed import init_distributed, shutdown
    from wanserve.engine.serving.offline import request_from_spec
    from wanserve.engine.startup import resolve_model_path
    from wanserve.engine.serving.worker import end_of_job, run_request

    cfg = load_config(["--ulysses", "2"])
    ctx = init_distributed(cfg.layout, cfg.collective_timeout_s)
    try:
        model = assemble(cfg, ctx, resolve_model_path(cfg))
        counts = {"decodes": 0, "postprocessed": 0}
        # each request's pipeline view makes its own video processor: count on the class
        processor, vae = type(model.pipe.video_processor), model.pipe.vae
        postprocess, decode = processor.postprocess_video, vae.decode

        def counted(name, fn):
            def call(*args, **kwargs):
                counts[name] += 1
                return fn(*args, **kwargs)
            return call

        processor.postprocess_video = counted("postprocessed", postprocess)
        vae.decode = counted("decodes", decode)
        spec = {"width": 64, "height": 64, "num_frames": 5, "num_inference_steps": 2}
        result = run_request(ctx, model, request_from_spec("ranks", spec, cfg))
        end_of_job(ctx, model)
        mine = {**counts, "frames": list(result.frames.shape) if result else None}
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
