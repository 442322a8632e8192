"""From request fields to one fully resolved GenerationRequest, against the preset's limits.

Every refusal is an InvalidRequest naming the offending `param`.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from dataclasses import dataclass

import PIL.Image
from pydantic import ValidationError

from wanserve.api.errors import InvalidRequest
from wanserve.api.images import decode_image, fit_to_size, size_for_aspect
from wanserve.api.protocol import VideoCreateParams
from wanserve.engine.adapters.choice import resolve_lora
from wanserve.engine.adapters.lora import AdapterError
from wanserve.engine.config import ServerConfig
from wanserve.engine.model.features import ModelFeatures
from wanserve.engine.model.step_cache import CacheChoice, CacheChoiceError, resolve_choice
from wanserve.engine.serving.request import GenerationRequest

SIZE_RE = re.compile(r"^\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*$")
DATA_URL_RE = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?:;[^,]*)?;base64,(?P<data>.*)$", re.S)


def merge_extra_params(fields: dict) -> dict:
    """`extra_params` (a JSON object, or its text in a form) under the top-level fields: a
    top-level field wins unless it is absent or empty; unknown keys fall to the model's
    extra="ignore" like any unknown field."""
    fields = dict(fields)
    extra = fields.pop("extra_params", None)
    if extra is None or (isinstance(extra, str) and not extra.strip()):
        return fields
    if isinstance(extra, str):
        try:
            extra = json.loads(extra, parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:
            raise InvalidRequest(f"`extra_params` is not valid JSON: {exc}", param="extra_params",
                                 code="invalid_value") from None
    if not isinstance(extra, dict):
        raise InvalidRequest("`extra_params` must be a JSON object", param="extra_params",
                             code="invalid_value")
    given = {k: v for k, v in fields.items()
             if v is not None and not (isinstance(v, str) and not v.strip())}
    return {**extra, **given}


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def parse_params(fields: dict) -> VideoCreateParams:
    fields = merge_extra_params(fields)
    try:
        return VideoCreateParams.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = str(first["loc"][0]) if first.get("loc") else None
        if first["type"] == "missing":
            raise InvalidRequest(f"`{param}` is required", param=param, code="missing_required_parameter")
        raise InvalidRequest(f"invalid `{param}`: {first['msg']}", param=param,
                             code="invalid_value") from None


def decode_base64_image(value: str, param: str = "input_reference") -> bytes:
    """An image field in JSON: a data: URL or bare base64. Remote URLs are not fetched."""
    if value.startswith(("http://", "https://")):
        raise InvalidRequest(f"remote `{param}` URLs are not fetched by this server; "
                             "send the image as a file part or a data: URL",
                             param=param, code="remote_url_not_allowed")
    match = DATA_URL_RE.match(value)
    payload = match.group("data") if match else value
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"`{param}` is not valid base64", param=param,
                             code="invalid_image") from None


@dataclass
class ResolvedSize:
    width: int
    height: int


def _parse_size(text: str) -> tuple[int, int]:
    match = SIZE_RE.match(text)
    if not match:
        raise InvalidRequest(f"`size` must look like '832x480' (width x height), got {text!r}",
                             param="size", code="invalid_value")
    return int(match.group(1)), int(match.group(2))


def _resolve_size(p: VideoCreateParams, cfg: ServerConfig, image: PIL.Image.Image | None) -> ResolvedSize:
    lim = cfg.limits
    multiple = lim.size_multiple
    if p.size is not None:
        if p.width is not None or p.height is not None:
            raise InvalidRequest("give either `size` or `width`/`height`, not both", param="size",
                                 code="conflicting_parameters")
        (width, height), param = _parse_size(p.size), "size"
    elif p.width is not None or p.height is not None:
        if p.width is None or p.height is None:
            missing = "height" if p.height is None else "width"
            raise InvalidRequest(f"`width` and `height` go together; `{missing}` is missing",
                                 param=missing, code="missing_required_parameter")
        width, height, param = p.width, p.height, None
    elif image is None and cfg.defaults.size:  # text-to-video: the preset's size
        (width, height), param = _parse_size(cfg.defaults.size), None
    else:
        area = min(cfg.defaults.pixel_area, lim.max_pixels)
        if image is None:
            side = int(area ** 0.5) // multiple * multiple
            return ResolvedSize(side, side)
        width, height = size_for_aspect(image.width, image.height, area, multiple)
        width = min(max(width, lim.min_side), lim.max_side) // multiple * multiple
        height = min(max(height, lim.min_side), lim.max_side) // multiple * multiple
        return ResolvedSize(width, height)
    for name, value in (("width", width), ("height", height)):
        where = param or name
        if value % multiple:
            raise InvalidRequest(f"`{name}` has to be a multiple of {multiple}, got {value}",
                                 param=where, code="invalid_value")
        if not lim.min_side <= value <= lim.max_side:
            raise InvalidRequest(f"`{name}` must be between {lim.min_side} and {lim.max_side}, "
                                 f"got {value}", param=where, code="invalid_value")
    if width * height > lim.max_pixels:
        raise InvalidRequest(f"{width}x{height} has {width * height} pixels; this model allows at "
                             f"most {lim.max_pixels}", param=param or "width", code="invalid_value")
    return ResolvedSize(width, height)


def _resolve_frames(p: VideoCreateParams, cfg: ServerConfig, fps: int) -> int:
    lim = cfg.limits
    if p.num_frames is not None and p.seconds is not None:
        raise InvalidRequest("give either `num_frames` or `seconds`, not both", param="seconds",
                             code="conflicting_parameters")
    if p.seconds is not None:
        # the nearest 4k+1 to seconds × fps (81 frames for 5 s at 16 fps)
        # capped first: a huge `seconds` makes seconds × fps inf, which round() refuses
        exact = min(p.seconds * fps, 4 * lim.max_frames)
        frames, param = 4 * max(0, round((exact - 1) / 4)) + 1, "seconds"
    elif p.num_frames is not None:
        frames, param = p.num_frames, "num_frames"
        if frames % 4 != 1:
            raise InvalidRequest(f"`num_frames` must be 4k+1 (1, 5, 9, ..., 81), got {frames}",
                                 param=param, code="invalid_value")
    else:
        return cfg.defaults.num_frames
    if not 1 <= frames <= lim.max_frames:
        raise InvalidRequest(f"this model makes at most {lim.max_frames} frames "
                             f"({lim.max_frames / fps:.2f}s at {fps} fps), asked for {frames}",
                             param=param, code="invalid_value")
    return frames


def _in_range(value, name: str, low, high):
    if not low <= value <= high:
        raise InvalidRequest(f"`{name}` must be between {low} and {high}, got {value}", param=name,
                             code="invalid_value")
    return value


def _image_of(p: VideoCreateParams, param: str, upload: bytes | None,
              cfg: ServerConfig) -> PIL.Image.Image | None:
    """The decoded image of field `param`: the file part if there is one, else its JSON text."""
    text = getattr(p, param)
    if upload is None and text is not None:
        upload = decode_base64_image(text, param)
    if upload is None:
        return None
    return decode_image(upload, max_bytes=cfg.limits.max_upload_bytes,
                        max_pixels=cfg.limits.max_image_pixels, param=param)


def _refuse_unused(p: VideoCreateParams, features: ModelFeatures, last_frame: bool) -> None:
    """Fields this model cannot use: a 400 naming them, never a silent drop."""
    if last_frame and not features.last_frame:
        raise InvalidRequest("this model cannot take `last_frame`: it conditions on the first "
                             "frame alone (per-token timesteps, as Wan2.2-TI2V)",
                             param="last_frame", code="unsupported_parameter")
    if features.experts == 1:
        for name in ("guidance_scale_2", "boundary_ratio"):
            if getattr(p, name) is not None:
                raise InvalidRequest(f"this model has one expert: `{name}`, which is for a "
                                     "second (low-noise) expert, does not apply", param=name,
                                     code="unsupported_parameter")


def _cache_of(p: VideoCreateParams, cfg: ServerConfig, features: ModelFeatures
              ) -> CacheChoice | None:
    """`cache`: "off", a preset name, or an object (in a form: its JSON text); absent: the
    server's default."""
    value = p.cache
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            value = json.loads(value, parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:
            raise InvalidRequest(f"`cache` is not valid JSON: {exc}", param="cache",
                                 code="invalid_value") from None
    try:
        choice = resolve_choice(value, cfg.cache)
        if choice is not None and choice.Fn + choice.Bn >= features.blocks:
            raise CacheChoiceError(f"Fn + Bn ({choice.Fn} + {choice.Bn}) must leave a block to "
                                   f"cache; each expert has {features.blocks}")
    except CacheChoiceError as exc:
        raise InvalidRequest(f"invalid `cache`: {exc}", param="cache",
                             code="invalid_value") from None
    return choice


def _guidance_2(p: VideoCreateParams, cfg: ServerConfig, features: ModelFeatures) -> float | None:
    if features.experts == 1:
        return None
    value = p.guidance_scale_2 if p.guidance_scale_2 is not None else (
        p.guidance_scale if p.guidance_scale is not None else cfg.defaults.guidance_scale_2)
    return _in_range(value, "guidance_scale_2", 0.0, 50.0)


def resolve_request(job_id: str, p: VideoCreateParams, image_bytes: bytes | None,
                    cfg: ServerConfig, features: ModelFeatures = ModelFeatures(),
                    last_frame_bytes: bytes | None = None) -> GenerationRequest:
    """`features`: what the served model can take (wanserve/engine/model/features.py); the default is
    Wan2.2-I2V-A14B's."""
    lim, d = cfg.limits, cfg.defaults
    if p.model is not None and p.model != cfg.served_model_name:
        raise InvalidRequest(f"the model `{p.model}` is not served here; this server serves "
                             f"`{cfg.served_model_name}`", param="model", code="model_not_found",
                             status=404)
    if len(p.prompt) > lim.max_prompt_chars:
        raise InvalidRequest(f"`prompt` is {len(p.prompt)} characters; the limit is "
                             f"{lim.max_prompt_chars}", param="prompt", code="invalid_value")
    if p.negative_prompt and len(p.negative_prompt) > lim.max_prompt_chars:
        raise InvalidRequest(f"`negative_prompt` is longer than {lim.max_prompt_chars} characters",
                             param="negative_prompt", code="invalid_value")
    _refuse_unused(p, features, last_frame_bytes is not None or p.last_frame is not None)
    image = _image_of(p, "input_reference", image_bytes, cfg)
    last_frame = _image_of(p, "last_frame", last_frame_bytes, cfg)
    if image is None and (lim.require_image or not features.text_to_video or last_frame):
        what = ("a video that ends on `last_frame` needs its first frame too" if last_frame
                else "`input_reference` (the first frame) is required by this image-to-video "
                "model" if not features.text_to_video else
                "`input_reference` (the first frame) is required by this server's preset")
        raise InvalidRequest(what, param="input_reference", code="missing_required_parameter")
    try:
        lora = resolve_lora(p.lora, cfg)
    except AdapterError as exc:
        raise InvalidRequest(str(exc), param="lora", code="invalid_lora") from None
    cache = _cache_of(p, cfg, features)
    fps = _in_range(p.fps if p.fps is not None else d.fps, "fps", 1, lim.max_fps)
    num_frames = _resolve_frames(p, cfg, fps)
    if last_frame is not None and num_frames < 5:
        # the condition video holds the first frame, num_frames - 2 empty ones, the last
        raise InvalidRequest(f"a video with a `last_frame` needs at least 5 frames, asked for "
                             f"{num_frames}", param="last_frame", code="invalid_value")
    size = _resolve_size(p, cfg, image)
    guidance_scale = p.guidance_scale if p.guidance_scale is not None else d.guidance_scale

    def fitted(frame: PIL.Image.Image | None):
        return None if frame is None else fit_to_size(frame, size.width, size.height)

    return GenerationRequest(
        job_id=job_id,
        prompt=p.prompt,
        negative_prompt=p.negative_prompt if p.negative_prompt is not None else d.negative_prompt,
        image=fitted(image),  # None: text-to-video
        last_frame=fitted(last_frame),
        width=size.width,
        height=size.height,
        num_frames=num_frames,
        fps=fps,
        num_inference_steps=_in_range(p.num_inference_steps or d.num_inference_steps,
                                      "num_inference_steps", 1, lim.max_steps),
        guidance_scale=_in_range(guidance_scale, "guidance_scale", 0.0, 50.0),
        guidance_scale_2=_guidance_2(p, cfg, features),
        boundary_ratio=None if features.experts == 1 else (
            p.boundary_ratio if p.boundary_ratio is not None else d.boundary_ratio),
        flow_shift=_in_range(p.flow_shift if p.flow_shift is not None else d.flow_shift,
                             "flow_shift", 0.01, 100.0),
        seed=p.seed if p.seed is not None else secrets.randbelow(2**31),
        sample_solver=p.sample_solver or d.sample_solver,
        lora=lora,
        cache=cache,
    )
