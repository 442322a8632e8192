"""wanserve/engine/model/pipeline.py: the weights go from the checkpoint straight to the rank's device, without
a whole copy of each component in host memory first (8 ranks x 57 GB of experts on one host).

The device here is `meta` (no data, no memory): whatever loads straight to it ends up there,
and the experts kept on the host for offload stay real CPU tensors.
Checked with: the components loaded without `device_map` (they land on the CPU first).
"""
from __future__ import annotations

import torch

from wanserve.engine.model.offload import EXPERTS
from wanserve.engine.model.pipeline import load_pipeline
from wanserve.engine.model.tiny_model import ensure_tiny_model


def devices(module) -> set[str]:
    return {p.device.type for p in module.parameters()}


def test_components_load_straight_to_the_device_and_offloaded_experts_stay_on_the_host():
    pipe, report = load_pipeline(ensure_tiny_model(), torch.float32, torch.device("meta"),
                                 keep_on_host=EXPERTS)
    assert devices(pipe.vae) == devices(pipe.text_encoder) == {"meta"}
    assert devices(pipe.transformer) == devices(pipe.transformer_2) == {"cpu"}
    assert report["experts"] == 2
    pipe, _ = load_pipeline(ensure_tiny_model(), torch.float32, torch.device("meta"))
    assert devices(pipe.transformer) == devices(pipe.transformer_2) == {"meta"}
