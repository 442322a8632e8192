"""What crosses ranks: one small picklable object per request, and the control messages."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from wanserve.engine.adapters.lora import AdapterUse
from wanserve.engine.model.step_cache import CacheChoice


@dataclass
class GenerationRequest:
    """Every parameter resolved, the images already decoded and fitted to (height, width) as
    HxWx3 uint8. None only where the model has no such input: `image` on a text-to-video
    request (TI2V), `guidance_scale_2` and `boundary_ratio` on a one-expert model."""

    job_id: str
    prompt: str
    image: np.ndarray | None  # the first frame
    width: int
    height: int
    num_frames: int
    fps: int
    num_inference_steps: int
    guidance_scale: float
    guidance_scale_2: float | None
    boundary_ratio: float | None
    flow_shift: float
    seed: int
    negative_prompt: str = ""
    sample_solver: str = "unipc"  # wanserve.engine.model.pipeline.SOLVERS
    lora: tuple[AdapterUse, ...] = ()  # exactly these adapters, at these scales; () = none
    last_frame: np.ndarray | None = None  # first+last frame: the video ends on it
    cache: CacheChoice | None = None  # the step cache's schedule; None: every step computed


@dataclass
class GenerationResult:
    """Rank 0's output: frames (F, H, W, 3), uint8 for the server's MP4 encoder or float32 in
    [0, 1] for the offline runner, stage timings (s) and rank 0's peak memory during the job
    (wanserve/engine/model/peak_memory.py)."""

    frames: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    forwards: list[int] = field(default_factory=list)  # transformer forwards in each step
    peak_memory_mb: float | None = None
    peak_memory_kind: str | None = None
    cache: dict | None = None  # the step cache's report (StepCache.report); None: no cache


@dataclass(frozen=True)
class Shutdown:
    """Broadcast by rank 0 so that the other ranks leave their loop and exit cleanly."""

    reason: str = "shutdown"


class JobCancelled(Exception):
    """Raised on every rank at the same step when rank 0 says the job was cancelled."""

    def __init__(self, job_id: str, step: int, total: int):
        super().__init__(f"job {job_id} cancelled at step {step}/{total}")
        self.job_id, self.step, self.total = job_id, step, total
