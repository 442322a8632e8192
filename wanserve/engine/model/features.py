"""What the loaded checkpoint can be asked for, read off its pipeline as diffusers 0.42.1 runs it.

The API refuses what the model cannot do by name (a 400 naming the field) instead of letting
the pipeline ignore it. Defaults describe Wan2.2-I2V-A14B.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFeatures:
    # two experts switched at `boundary_ratio` (A14B), or one (TI2V-5B): then `boundary_ratio`
    # and `guidance_scale_2` mean nothing
    experts: int = 2
    # Wan2.2-TI2V (`expand_timesteps`): the first frame, if any, replaces the first latent frame
    # and its tokens get timestep 0; without one every latent frame is noise (diffusers'
    # WanPipeline). A model that takes the condition video as extra input channels cannot.
    text_to_video: bool = False
    # diffusers' `last_image` is encoded into the condition video's last frame, which only the
    # channel-concatenated condition has; the `expand_timesteps` path drops it
    last_frame: bool = True
    # transformer blocks per expert: a step cache's Fn + Bn blocks must fit in them
    blocks: int = 40


def features_of(pipe) -> ModelFeatures:
    expand = bool(pipe.config.expand_timesteps)
    return ModelFeatures(experts=1 + (pipe.transformer_2 is not None),
                         text_to_video=expand, last_frame=not expand,
                         blocks=min(len(e.blocks) for e in (pipe.transformer, pipe.transformer_2)
                                    if e is not None))
