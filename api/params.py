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

from api.errors import InvalidRequest
from api.images import decode_image, fit_to_size, size_for_aspect
from api.protocol import VideoCreateParams
from engine.adapter_choice import resolve_lora
from engine.adapters import AdapterError
from engine.config import ServerConfig
from engine.request import GenerationRequest

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


def decode_base64_image(value: str) -> bytes:
    """`input_reference` in JSON: a data: URL or bare base64. Remote URLs are not fetched."""
    if value.startswith(("http://", "https://")):
        raise InvalidRequest("remote `input_reference` URLs are not fetched by this server; "
                             "send the image as a file part or a data: URL",
                             param="input_reference", code="remote_url_not_allowed")
    match = DATA_URL_RE.match(value)
    payload = match.group("data") if match else value
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("`input_reference` is not valid base64", param="input_reference",
                             code="invalid_image") from None


@dataclass
class ResolvedSize:
    width: int
    height: int


def _resolve_size(p: VideoCreateParams, cfg: ServerConfig, image: PIL.Image.Image | None) -> ResolvedSize:
    lim = cfg.limits
    if p.size is not None:
        if p.width is not None or p.height is not None:
            raise InvalidRequest("give either `size` or `width`/`height`, not both", param="size",
                                 code="conflicting_parameters")
        match = SIZE_RE.match(p.size)
        if not match:
            raise InvalidRequest(f"`size` must look like '832x480' (width x height), got {p.size!r}",
                                 param="size", code="invalid_value")
        width, height, param = int(match.group(1)), int(match.group(2)), "size"
    elif p.width is not None or p.height is not None:
        if p.width is None or p.height is None:
            missing = "height" if p.height is None else "width"
            raise InvalidRequest(f"`width` and `height` go together; `{missing}` is missing",
                                 param=missing, code="missing_required_parameter")
        width, height, param = p.width, p.height, None
    else:
        area = min(cfg.defaults.pixel_area, lim.max_pixels)
        if image is None:
            side = int(area ** 0.5) // 16 * 16
            return ResolvedSize(side, side)
        width, height = size_for_aspect(image.width, image.height, area)
        width = min(max(width, lim.min_side), lim.max_side) // 16 * 16
        height = min(max(height, lim.min_side), lim.max_side) // 16 * 16
        return ResolvedSize(width, height)
    for name, value in (("width", width), ("height", height)):
        where = param or name
        if value % 16:
            raise InvalidRequest(f"`{name}` has to be a multiple of 16, got {value}", param=where,
                                 code="invalid_value")
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


def resolve_request(job_id: str, p: VideoCreateParams, image_bytes: bytes | None,
                    cfg: ServerConfig) -> GenerationRequest:
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
    if image_bytes is None and p.input_reference is not None:
        image_bytes = decode_base64_image(p.input_reference)
    image = None
    if image_bytes is not None:
        image = decode_image(image_bytes, max_bytes=lim.max_upload_bytes,
                             max_pixels=lim.max_image_pixels)
    elif lim.require_image:
        raise InvalidRequest("`input_reference` (the first frame) is required by this "
                             "image-to-video model", param="input_reference",
                             code="missing_required_parameter")
    try:
        lora = resolve_lora(p.lora, cfg)
    except AdapterError as exc:
        raise InvalidRequest(str(exc), param="lora", code="invalid_lora") from None
    fps = _in_range(p.fps if p.fps is not None else d.fps, "fps", 1, lim.max_fps)
    num_frames = _resolve_frames(p, cfg, fps)
    size = _resolve_size(p, cfg, image)
    if image is None:
        image = PIL.Image.new("RGB", (size.width, size.height), (127, 127, 127))
    guidance_scale = p.guidance_scale if p.guidance_scale is not None else d.guidance_scale
    guidance_scale_2 = p.guidance_scale_2 if p.guidance_scale_2 is not None else (
        p.guidance_scale if p.guidance_scale is not None else d.guidance_scale_2)
    return GenerationRequest(
        job_id=job_id,
        prompt=p.prompt,
        negative_prompt=p.negative_prompt if p.negative_prompt is not None else d.negative_prompt,
        image=fit_to_size(image, size.width, size.height),
        width=size.width,
        height=size.height,
        num_frames=num_frames,
        fps=fps,
        num_inference_steps=_in_range(p.num_inference_steps or d.num_inference_steps,
                                      "num_inference_steps", 1, lim.max_steps),
        guidance_scale=_in_range(guidance_scale, "guidance_scale", 0.0, 50.0),
        guidance_scale_2=_in_range(guidance_scale_2, "guidance_scale_2", 0.0, 50.0),
        boundary_ratio=p.boundary_ratio if p.boundary_ratio is not None else d.boundary_ratio,
        flow_shift=_in_range(p.flow_shift if p.flow_shift is not None else d.flow_shift,
                             "flow_shift", 0.01, 100.0),
        seed=p.seed if p.seed is not None else secrets.randbelow(2**31),
        sample_solver=p.sample_solver or d.sample_solver,
        lora=lora,
    )
