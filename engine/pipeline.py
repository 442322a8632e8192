"""Loading the Wan2.2-I2V pipeline with xfuser's wrappers, the same way on every rank."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from engine import xfuser_compat

xfuser_compat.apply()

from diffusers import (  # noqa: E402
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from transformers import UMT5EncoderModel  # noqa: E402
from engine.sp_padding import WanServeTransformer  # noqa: E402
from xfuser.model_executor.pipelines.pipeline_wan_i2v import (  # noqa: E402
    xFuserWanImageToVideoPipeline,
)

log = logging.getLogger("wanserve.engine")


class WanServePipeline(xFuserWanImageToVideoPipeline):
    """xfuser's I2V pipeline, recording how long text and image encoding take (by `clock`,
    which engine/generate.py sets to one that waits for the device)."""

    stage_times: dict
    clock = staticmethod(time.perf_counter)

    def encode_prompt(self, *args, **kwargs):
        start = self.clock()
        out = super().encode_prompt(*args, **kwargs)
        self.stage_times["text_encode"] = self.clock() - start
        return out

    def prepare_latents(self, *args, **kwargs):
        """Noise latents and the VAE-encoded condition video."""
        start = self.clock()
        out = super().prepare_latents(*args, **kwargs)
        self.stage_times["image_encode"] = self.clock() - start
        return out

    def for_request(self, boundary_ratio: float, flow_shift: float,
                    solver: str = "unipc") -> "WanServePipeline":
        """A view sharing every module but with its own boundary and a fresh scheduler, so a
        request's values never leak into the next one."""
        if solver == "euler":
            scheduler = DistilledEulerScheduler(num_train_timesteps=1000, shift=flow_shift)
        else:
            scheduler = UniPCMultistepScheduler.from_config(self.scheduler.config,
                                                            flow_shift=flow_shift)
        components = dict(self.components, scheduler=scheduler)
        view = WanServePipeline(**components, boundary_ratio=boundary_ratio,
                                expand_timesteps=self.config.expand_timesteps)
        view.set_progress_bar_config(disable=True)
        view.stage_times = {}
        return view


class DistilledEulerScheduler(FlowMatchEulerDiscreteScheduler):
    """Flow-matching Euler on the grid the step-distilled Wan2.2 LoRAs were trained for:
    `shift` applied to N evenly spaced sigmas from 1 (N=4, shift 5: 1, .9375, .8333, .625, then
    0). diffusers' own spacing ends at 1/1000 instead, which is not that grid."""

    def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
        sigmas = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1]
        super().set_timesteps(device=device, sigmas=sigmas.tolist())


SOLVERS = ("unipc", "euler")


def load_pipeline(model_path: Path, dtype: torch.dtype, device: torch.device,
                  keep_on_host: tuple[str, ...] = ()) -> tuple[WanServePipeline, dict]:
    """Load a diffusers-format Wan2.2-I2V checkpoint (the tiny model is one too); returns it and
    what was loaded (for /health). The weights go straight from the files to `device` (no
    whole-model copy in host memory per rank), except the components named in `keep_on_host`."""
    start = time.perf_counter()

    def where(name: str) -> dict:
        return {} if name in keep_on_host else {"device_map": device}

    experts = {
        name: WanServeTransformer.from_pretrained(model_path, subfolder=name, dtype=dtype,
                                                  **where(name))
        for name in ("transformer", "transformer_2")
        if (Path(model_path) / name).is_dir()
    }
    # the VAE is small next to the experts; float32 keeps encode and decode precise
    vae = AutoencoderKLWan.from_pretrained(model_path, subfolder="vae", dtype=torch.float32,
                                           **where("vae"))
    text_encoder = UMT5EncoderModel.from_pretrained(model_path, subfolder="text_encoder",
                                                    dtype=dtype, **where("text_encoder"))
    pipe = WanServePipeline.from_pretrained(model_path, dtype=dtype, vae=vae,
                                            text_encoder=text_encoder, **experts)
    pipe.set_progress_bar_config(disable=True)
    pipe.stage_times = {}
    seconds = time.perf_counter() - start
    log.info("loaded %s in %.1fs (%s)", model_path, seconds, dtype)
    return pipe, {"path": str(model_path), "experts": len(experts), "seconds": round(seconds, 2)}


def num_attention_heads(model_path: Path) -> int:
    import json

    with open(Path(model_path) / "transformer" / "config.json") as f:
        return int(json.load(f)["num_attention_heads"])
