"""The served model's capabilities (wanserve/api/protocol.py ModelCapabilities), from the preset."""
from __future__ import annotations

from wanserve.api.images import size_for_aspect
from wanserve.api.protocol import ModelCapabilities, ModelDefaults, ModelLimits
from wanserve.engine.config import ServerConfig
from wanserve.engine.model.features import ModelFeatures

# landscape first: the shape most first frames have
ASPECTS = ((16, 9), (9, 16), (1, 1), (4, 3), (3, 4))


def size_choices(cfg: ServerConfig) -> list[str]:
    """The preset's `sizes:`; without them, one WxH per aspect ratio at its pixel area, those
    outside the limits left out."""
    if cfg.sizes:
        return list(cfg.sizes)
    lim = cfg.limits
    area = min(cfg.defaults.pixel_area, lim.max_pixels)
    choices = []
    for aspect_w, aspect_h in ASPECTS:
        width, height = size_for_aspect(aspect_w, aspect_h, area, lim.size_multiple)
        fits = (lim.min_side <= min(width, height) and max(width, height) <= lim.max_side
                and width * height <= lim.max_pixels)
        if fits and f"{width}x{height}" not in choices:
            choices.append(f"{width}x{height}")
    return choices


def model_capabilities(cfg: ServerConfig,
                       features: ModelFeatures = ModelFeatures()) -> ModelCapabilities:
    """`features`: the loaded model's (wanserve/engine/model/features.py; before it has loaded, A14B's)."""
    d, lim = cfg.defaults, cfg.limits
    return ModelCapabilities(
        first_frame_required=lim.require_image or not features.text_to_video,
        last_frame=features.last_frame,
        sizes=size_choices(cfg),
        defaults=ModelDefaults(size=None, num_frames=d.num_frames, fps=d.fps,
                               num_inference_steps=d.num_inference_steps,
                               guidance_scale=d.guidance_scale,
                               guidance_scale_2=d.guidance_scale_2,
                               negative_prompt=d.negative_prompt),
        limits=ModelLimits(min_side=lim.min_side, max_side=lim.max_side,
                           max_pixels=lim.max_pixels, max_frames=lim.max_frames,
                           max_fps=lim.max_fps, max_steps=lim.max_steps,
                           max_prompt_chars=lim.max_prompt_chars,
                           max_upload_bytes=lim.max_upload_bytes),
        cache_presets=list(cfg.cache.presets) if cfg.cache.policy != "off" else [],
        cache_default=cfg.cache.default)
