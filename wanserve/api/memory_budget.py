"""`memory.budget_gib`: a request whose planned peak per rank is over the budget is refused
with a 400 naming what to change, before it is queued (it would otherwise run out of memory)."""
from __future__ import annotations

from wanserve.api.capabilities import size_choices
from wanserve.api.errors import InvalidRequest
from wanserve.engine.config import ServerConfig
from wanserve.engine.model.memory_plan import GIB, MemoryPlan
from wanserve.engine.serving.request import GenerationRequest

PHASES = ("denoise", "vae_encode", "vae_decode", "text_encode")


def _gib(value: float) -> str:
    return f"{value / GIB:.2f} GiB"


def check_budget(request: GenerationRequest, plan: MemoryPlan | None, cfg: ServerConfig) -> None:
    if plan is None or cfg.memory_budget_gib is None:
        return
    budget = round(cfg.memory_budget_gib * GIB)
    need = plan.request(request.width, request.height, request.num_frames)
    if need["peak"] <= budget:
        return
    size = f"{request.width}x{request.height}"
    phase = max(PHASES, key=need.get)
    frames = plan.max_frames(request.width, request.height, budget, cfg.limits.max_frames)
    if frames:
        param, advice = "num_frames", f"at {size} at most {frames} frames fit"
    else:
        param, advice = "size", f"no number of frames fits at {size}: ask for a smaller `size`"
    raise InvalidRequest(
        f"{size} with {request.num_frames} frames needs an estimated {_gib(need['peak'])} per "
        f"rank (weights {_gib(need['weights'])} + {phase} {_gib(need[phase])}), over this "
        f"server's memory budget of {cfg.memory_budget_gib:g} GiB (memory.budget_gib); {advice}",
        param=param, code="over_memory_budget")


def plan_report(plan: MemoryPlan, cfg: ServerConfig) -> dict:
    """For /health: the plan, and with a budget the most frames that fit at each offered size."""
    report = plan.report()
    report["budget_gib"] = cfg.memory_budget_gib
    if cfg.memory_budget_gib is not None:
        budget = round(cfg.memory_budget_gib * GIB)
        report["max_frames"] = {
            size: plan.max_frames(*map(int, size.lower().split("x")), budget,
                                  cfg.limits.max_frames)
            for size in size_choices(cfg)}
    return report
