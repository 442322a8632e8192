"""Request and response models of the OpenAI-style Videos API (pydantic, no HTTP here)."""
from __future__ import annotations

import math
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

JobStatus = Literal["queued", "in_progress", "completed", "failed", "cancelled"]
Quality = Literal["high", "lossless"]


class VideoCreateParams(BaseModel):
    """POST /v1/videos fields, from a form (strings) or JSON. Unknown fields are ignored,
    as OpenAI clients send fields a server may not use."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    prompt: str = Field(min_length=1)
    negative_prompt: Optional[str] = None
    model: Optional[str] = None
    input_reference: Optional[str] = None  # JSON only: data: URL or bare base64
    last_frame: Optional[str] = Field(
        default=None, description="the frame the video ends on (first+last frame; models "
        "that take it): a file part in multipart; in JSON a data: URL, bare base64 or "
        "{\"image_url\": ...}; fitted to the size like `input_reference`")
    size: Optional[str] = None
    width: Optional[int] = Field(default=None, ge=1)
    height: Optional[int] = Field(default=None, ge=1)
    num_frames: Optional[int] = Field(default=None, ge=1)
    seconds: Optional[float] = Field(default=None, gt=0)
    fps: Optional[int] = Field(default=None, ge=1)
    num_inference_steps: Optional[int] = Field(default=None, ge=1)
    guidance_scale: Optional[float] = Field(default=None, ge=0)
    guidance_scale_2: Optional[float] = Field(default=None, ge=0)
    boundary_ratio: Optional[float] = Field(default=None, ge=0, le=1)
    flow_shift: Optional[float] = Field(default=None, gt=0)
    seed: Optional[int] = Field(default=None, ge=0, le=2**63 - 1)
    sample_solver: Optional[Literal["unipc", "euler"]] = None
    lora: Optional[Any] = None  # wanserve/engine/adapters/choice.py says what it may be
    cache: Optional[Any] = None  # wanserve/engine/model/step_cache.py says what it may be
    quality: Optional[Quality] = Field(
        default=None, description="`high` (H.264 yuv420p, the default) or `lossless` (H.264 RGB "
        "at qp 0: the decoded frames are the generated ones, bit for bit)")
    stream: Optional[bool] = Field(
        default=None, description="`true`: the MP4 is fragmented (a fragment per decoded "
        "chunk) and `GET /v1/videos/{id}/content` sends it while it is decoded; "
        "`POST /v1/videos/sync` then answers it so. Default `false`: one MP4 with its index up "
        "front (`+faststart`)")
    extra_params: Optional[Union[dict[str, Any], str]] = Field(
        default=None, description="more fields as a JSON object, or its JSON text, merged "
        "under the top-level ones: a top-level field wins, unknown keys are ignored")

    @field_validator("seconds", "guidance_scale", "guidance_scale_2", "boundary_ratio",
                     "flow_shift")
    @classmethod
    def _finite(cls, value: Optional[float]) -> Optional[float]:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("input_reference", "last_frame", mode="before")
    @classmethod
    def _image_reference_object(cls, value: Any) -> Any:
        # the OpenAI SDK's ImageInputReferenceParam: {"image_url": "data:..."} or {"file_id"}
        if isinstance(value, dict):
            if value.get("image_url"):
                return value["image_url"]
            raise ValueError("only {\"image_url\": ...} (a data: URL or base64) is supported; "
                             "`file_id` references are not, as this server has no Files API")
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_absent(cls, value: Any) -> Any:
        # an empty form field means "not given", as browsers and curl -F send them
        return None if isinstance(value, str) and value.strip() == "" else value


class VideoError(BaseModel):
    code: str
    message: str


class VideoJob(BaseModel):
    """The OpenAI `Video` object plus wanserve's own fields (seed, timings, parameters)."""

    id: str
    object: Literal["video"] = "video"
    status: JobStatus
    progress: int = 0
    created_at: int
    completed_at: Optional[int] = None
    expires_at: Optional[int] = None
    model: str
    prompt: str
    seconds: str
    size: str
    error: Optional[VideoError] = None
    remixed_from_video_id: Optional[str] = None
    seed: int
    num_frames: int
    fps: int
    num_inference_steps: Optional[int] = None
    quality: Quality = "high"
    timings: dict[str, float] = Field(default_factory=dict)
    inference_time_s: Optional[float] = Field(default=None, description="generation time, "
                                              "without the MP4 encode")
    stage_durations: dict[str, float] = Field(default_factory=dict,
                                              description="seconds per stage")
    peak_memory_mb: Optional[float] = Field(default=None, description="rank 0's peak memory "
                                            "during the job, of the kind `peak_memory_kind` says")
    peak_memory_kind: Optional[Literal["cuda_max_allocated", "cpu_rss_high_water"]] = None
    attempts: int = Field(default=0, description="times the engine started the job: a restart "
                          "runs an interrupted job again, at most `server.max_attempts` times")
    cache: Optional[dict[str, Any]] = Field(
        default=None, description="the step cache: {policy, preset, computed: {high, low}, "
        "cached: {high, low}} (steps per expert; one-expert models: high only)")
    extended_from: Optional[str] = Field(
        default=None, description="an extension of a stored video: that video's id")
    source_frames: Optional[int] = Field(
        default=None, description="an extension: the frames that come from the source video "
        "(the new part starts after them; `num_frames` and `seconds` are the whole video's)")
    stream: bool = Field(default=False, description="created with `stream: true`: its MP4 is "
                         "fragmented and can be read while it is decoded")


class VideoEvent(BaseModel):
    """One `data:` line of GET /v1/videos/{id}/events."""

    id: str
    status: JobStatus
    progress: int
    step: Optional[int] = None
    total_steps: Optional[int] = None
    error: Optional[VideoError] = None


class ModelDefaults(BaseModel):
    """What a request gets for a field it leaves out."""

    size: Optional[str] = Field(description="null: the first frame's aspect ratio at the "
                                "preset's pixel area")
    num_frames: int
    fps: int
    num_inference_steps: int
    guidance_scale: float
    guidance_scale_2: Optional[float] = None  # one expert: none
    negative_prompt: str


class ModelLimits(BaseModel):
    min_side: int
    max_side: int
    max_pixels: int
    max_frames: int
    max_fps: int
    max_steps: int
    max_prompt_chars: int
    max_upload_bytes: int


class ModelCapabilities(BaseModel):
    """`capabilities` of the served model's `/v1/models` entry: what a client needs to build
    a request form (the playground at `/` builds its own from it)."""

    first_frame_required: bool
    last_frame: bool = Field(description="whether a `last_frame` image is accepted")
    sizes: list[str] = Field(description="WxH choices within the limits, at the preset's "
                             "pixel area")
    defaults: ModelDefaults
    limits: ModelLimits
    cache_presets: list[str] = Field(default_factory=list, description="the step cache's "
                                     "presets a request's `cache` may name (with `off`)")
    cache_default: str = Field(default="off", description="the `cache` of a request without one")
