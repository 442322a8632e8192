"""Loading a Wan2.2 pipeline (I2V-A14B or TI2V-5B) with xfuser's wrappers, the same way on every
rank."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from wanserve.engine.parallel import xfuser_compat

xfuser_compat.apply()

from diffusers import (  # noqa: E402
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from transformers import UMT5EncoderModel  # noqa: E402
from wanserve.engine.model.prompt_cache import PromptCache  # noqa: E402
from wanserve.engine.parallel.sp_padding import WanServeTransformer  # noqa: E402
from xfuser.model_executor.pipelines.pipeline_wan_i2v import (  # noqa: E402
    xFuserWanImageToVideoPipeline,
)

log = logging.getLogger("wanserve.engine")


class WanServePipeline(xFuserWanImageToVideoPipeline):
    """xfuser's I2V pipeline (its CFG-parallel loop), recording how long text and image encoding
    take (by `clock`, which wanserve/engine/serving/generate.py sets to one that waits for the device), and on
    Wan2.2-TI2V also text-to-video: `image=None`."""

    stage_times: dict
    clock = staticmethod(time.perf_counter)
    text_only = False
    prompt_cache: PromptCache | None = None

    def __call__(self, image=None, **kwargs):
        """Without `image` (TI2V only) this is diffusers' WanPipeline: every latent frame starts
        as noise and every token gets the step's timestep (`prepare_latents` below)."""
        self.text_only = image is None
        if self.text_only:
            if not self.config.expand_timesteps:
                raise ValueError("this image-to-video model needs a first frame")
            # xfuser's __call__ preprocesses an image before prepare_latents, which reads
            # none when text_only
            image = torch.zeros(1, 3, kwargs["height"], kwargs["width"])
        return super().__call__(image, **kwargs)

    def encode_prompt(self, *args, **kwargs):
        start = self.clock()
        out = super().encode_prompt(*args, **kwargs)
        self.stage_times["text_encode"] = self.clock() - start
        return out

    def _get_t5_prompt_embeds(self, prompt=None, num_videos_per_prompt: int = 1,
                              max_sequence_length: int = 512, device=None, dtype=None):
        """One text's embedding, from the prompt cache when it has it
        (wanserve/engine/model/prompt_cache.py)."""
        encode = super()._get_t5_prompt_embeds
        if self.prompt_cache is None:
            return encode(prompt, num_videos_per_prompt, max_sequence_length, device, dtype)
        return self.prompt_cache.embeds(self, encode, prompt, num_videos_per_prompt,
                                        max_sequence_length, device, dtype)

    def prepare_latents(self, *args, **kwargs):
        """Noise latents and the VAE-encoded condition video."""
        start = self.clock()
        if self.text_only:
            out = self._text_only_latents(*args, **kwargs)
        else:
            out = super().prepare_latents(*args, **kwargs)
        self.stage_times["image_encode"] = self.clock() - start
        return out

    def _text_only_latents(self, image, batch_size, num_channels_latents, height, width,
                           num_frames, dtype, device, generator, latents=None, last_image=None):
        """The `expand_timesteps` triple (latents, condition, frame mask) with no frame given:
        the mask is 1 everywhere, so the loop's `(1 - mask) * condition + mask * latents` is the
        latents and each token's timestep `mask * t` is t, as in WanPipeline; the same noise
        draw as WanPipeline.prepare_latents."""
        frames = (num_frames - 1) // self.vae_scale_factor_temporal + 1
        shape = (batch_size, num_channels_latents, frames,
                 height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        no_frame_given = torch.ones((1, 1, *shape[2:]), dtype=dtype, device=device)
        return latents, torch.zeros_like(latents[:, :, :1]), no_frame_given

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
        view.prompt_cache = self.prompt_cache
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
                  keep_on_host: tuple[str, ...] = (), on_meta: tuple[str, ...] = ()
                  ) -> tuple[WanServePipeline, dict]:
    """Load a diffusers-format Wan2.2 checkpoint (the tiny models are too); returns it and
    what was loaded (for /health). The weights go straight from the files to `device` (no
    whole-model copy in host memory per rank), except the components named in `keep_on_host`.
    The components named in `on_meta` (the experts, the text encoder) are built without
    weights, for sharded loading (wanserve/engine/parallel/sliced_loading.py)."""
    from wanserve.engine.parallel.sliced_loading import build_on_meta, build_text_encoder_on_meta

    start = time.perf_counter()

    def where(name: str) -> dict:
        return {} if name in keep_on_host else {"device_map": device}

    def expert(name: str) -> torch.nn.Module:
        if name in on_meta:
            return build_on_meta(WanServeTransformer, Path(model_path) / name, dtype)
        return WanServeTransformer.from_pretrained(model_path, subfolder=name, dtype=dtype,
                                                   **where(name))

    experts = {name: expert(name) for name in ("transformer", "transformer_2")
               if (Path(model_path) / name).is_dir()}
    # the VAE is small next to the experts; float32 keeps encode and decode precise
    vae = AutoencoderKLWan.from_pretrained(model_path, subfolder="vae", dtype=torch.float32,
                                           **where("vae"))
    # use_kernels=False: transformers 5.25 swaps in Hugging Face hub kernels by default, fetched
    # at load time (no network on most serving boxes; `meta` and other devices refused); the
    # encoder runs as written, as on every other transformers release we support
    if "text_encoder" in on_meta:
        text_encoder = build_text_encoder_on_meta(Path(model_path) / "text_encoder", dtype)
    else:
        text_encoder = UMT5EncoderModel.from_pretrained(model_path, subfolder="text_encoder",
                                                        dtype=dtype, use_kernels=False,
                                                        **where("text_encoder"))
    pipe = WanServePipeline.from_pretrained(model_path, dtype=dtype, vae=vae,
                                            text_encoder=text_encoder, **experts)
    pipe.set_progress_bar_config(disable=True)
    pipe.stage_times = {}
    seconds = time.perf_counter() - start
    log.info("loaded %s in %.1fs (%s)", model_path, seconds, dtype)
    return pipe, {"path": str(model_path), "experts": len(experts), "seconds": round(seconds, 2)}
