"""Request and response models of the OpenAI-style Videos API (pydantic, no HTTP here)."""
from __future__ import annotations

import math
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

JobStatus = Literal["queued", "in_progress", "completed", "failed", "cancelled"]


class VideoCreateParams(BaseModel):
    """POST /v1/videos fields, from a form (strings) or JSON. Unknown fields are ignored,
    as OpenAI clients send fields a server may not use."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    prompt: str = Field(min_length=1)
    negative_prompt: Optional[str] = None
    model: Optional[str] = None
    input_reference: Optional[str] = None  # JSON only: data: URL or bare base64
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
    lora: Optional[Any] = None  # engine/adapter_choice.py says what it may be

    @field_validator("seconds", "guidance_scale", "guidance_scale_2", "boundary_ratio",
                     "flow_shift")
    @classmethod
    def _finite(cls, value: Optional[float]) -> Optional[float]:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("input_reference", mode="before")
    @classmethod
    def _image_reference_object(cls, value: Any) -> Any:
        # the OpenAI SDK's ImageInputReferenceParam: {"image_url": "data:..."} or {"file_id"}
        if isinstance(value, dict):
            if value.get("image_url"):
                return value["image_url"]
            raise ValueError("only `image_url` (a data: URL or base64) is supported; "
                             "`file_id` references are not")
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
    timings: dict[str, float] = Field(default_factory=dict)
