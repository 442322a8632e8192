"""The step cache: cache-dit's DBCache on both experts, the same decisions on every rank.

Written for cache-dit 1.5.3 (and xfuser 0.7.0's Wan wrapper). One transformer-only
`BlockAdapter` covers `[transformer, transformer_2]`; before every request each expert's
cache context is rebuilt (`cache_dit.refresh_context`) with that expert's own step count from
the boundary split and the request's mask, so nothing carries from one request to the next,
whatever the last one did (finished, cancelled or failed).

Policies (the `cache:` section, wanserve/engine/config.py):
- `off`: cache-dit is never attached; the transformers run as loaded.
- `static` (the default): cache-dit's `steps_computation_policy="static"` with a per-expert
  step mask. The decision is the step index alone, no collective, so every rank of a replica
  and every replica agree by construction (`--dp` included).
- `dynamic`: cache-dit's residual threshold. cache-dit 1.5.3 all-reduces the residual over the
  whole job (the default group) and takes no group, so replicas running different requests
  would pair their collectives; it is refused when dp > 1 (`check_policy`).

What cache-dit 1.5.3 cannot do by itself, done here:
- xfuser's wrapper (wanserve/engine/parallel/sp_padding.py) wires its padding mask into the
  blocks' processors on the first forward; cache-dit swaps `blocks` for its own during a
  forward, so that wiring is done before the cache is attached.
- The CFG bookkeeping is by call parity; it is set per request: separate CFG only where one
  rank runs both branches (guidance > 1 without CFG parallel).
- The counts reported per request come from `cache_dit.summary`'s cached steps per context.
- `cache_dit.steps_mask`'s named masks refuse fewer than 8 steps other than 4 and 6 (an
  expert's share of a short request): there its 28-step mask is sampled instead.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch

log = logging.getLogger("wanserve.engine")

CACHE_DIT_VERSION = "1.5.3"
POLICIES = ("off", "static", "dynamic")
MASK_POLICIES = ("slow", "medium", "fast", "ultra")  # cache_dit.steps_mask's shapes
EXPERT_NAMES = ("high", "low")  # transformer (high noise), transformer_2 (low noise)
MAX_BLOCKS = 64


class CacheChoiceError(ValueError):
    """A `cache` value that cannot be used; the message names what is wrong."""


@dataclass(frozen=True)
class ExpertCache:
    """One expert's schedule: `warmup` leading steps always computed, then `mask` (a
    cache_dit.steps_mask policy name, or a string of 1 (compute) and 0 (cache) repeated over the
    expert's steps). The expert's last step is always computed."""

    mask: str = "medium"
    warmup: int = 2
    threshold: float = 0.08  # the dynamic policy's residual threshold


@dataclass(frozen=True)
class CacheChoice:
    """What one request asks for, resolved; `preset` is its name or "custom"."""

    preset: str
    high: ExpertCache
    low: ExpertCache
    Fn: int = 1
    Bn: int = 0

    def describe(self) -> dict:
        return {"preset": self.preset, "Fn": self.Fn, "Bn": self.Bn,
                "high": vars(self.high), "low": vars(self.low)}


@dataclass(frozen=True)
class CacheSettings:
    """The `cache:` section: the policy, the presets and the default of a request without
    `cache` (a preset name or "off")."""

    policy: str = "static"
    default: str = "off"
    presets: dict[str, CacheChoice] = field(default_factory=dict)

    def describe(self) -> dict:
        return {"policy": self.policy, "default": self.default, "cache_dit": CACHE_DIT_VERSION,
                "presets": {name: choice.describe() for name, choice in self.presets.items()}}


def _expert(value, where: str, base: ExpertCache = ExpertCache()) -> ExpertCache:
    if not isinstance(value, dict):
        raise CacheChoiceError(f"{where} must be an object with mask, warmup, threshold")
    unknown = set(value) - {"mask", "warmup", "threshold"}
    if unknown:
        raise CacheChoiceError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    mask = value.get("mask", base.mask)
    if not isinstance(mask, str) or not (
            mask in MASK_POLICIES or (mask and set(mask) <= {"0", "1"} and len(mask) <= 1000)):
        raise CacheChoiceError(f"{where}.mask must be one of {', '.join(MASK_POLICIES)} or a "
                               f"string of 0 and 1, got {mask!r}")
    warmup = value.get("warmup", base.warmup)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup <= 1000:
        raise CacheChoiceError(f"{where}.warmup must be an integer in [0, 1000], got {warmup!r}")
    threshold = value.get("threshold", base.threshold)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
            or not 0.0 < float(threshold) < 1.0:
        raise CacheChoiceError(f"{where}.threshold must be in (0, 1), got {threshold!r}")
    return ExpertCache(mask, warmup, float(threshold))


def parse_choice(value: dict, name: str, base: CacheChoice | None = None) -> CacheChoice:
    """A preset or a request's object: {"high": {...}, "low": {...}, "Fn": n, "Bn": n}; keys
    left out come from `base` (the server's default preset) or the built-in defaults."""
    if not isinstance(value, dict):
        raise CacheChoiceError("must be 'off', a preset name or an object")
    unknown = set(value) - {"high", "low", "Fn", "Bn", "preset"}
    if unknown:
        raise CacheChoiceError(f"unknown key(s) {', '.join(sorted(unknown))}")
    base = base or CacheChoice(name, ExpertCache(), ExpertCache())
    blocks = {}
    for key, low in (("Fn", 1), ("Bn", 0)):
        n = value.get(key, getattr(base, key))
        if isinstance(n, bool) or not isinstance(n, int) or not low <= n <= MAX_BLOCKS:
            raise CacheChoiceError(f"{key} must be an integer in [{low}, {MAX_BLOCKS}], got {n!r}")
        blocks[key] = n
    return CacheChoice(name, _expert(value.get("high", {}), "high", base.high),
                       _expert(value.get("low", {}), "low", base.low), **blocks)


def resolve_choice(value, settings: CacheSettings) -> CacheChoice | None:
    """A request's `cache` (absent: the server's default) → its choice, or None for off."""
    if value is None:
        value = settings.default
    if isinstance(value, str):
        name = value.strip().lower()
        if name in ("off", "none", ""):
            return None
        if name not in settings.presets:
            offered = ", ".join(["off", *settings.presets])
            raise CacheChoiceError(f"unknown cache preset {value!r}; this server offers {offered}")
        choice = settings.presets[name]
    else:
        base = None
        if isinstance(value, dict) and "preset" in value:
            base = settings.presets.get(str(value["preset"]).lower())
            if base is None:
                raise CacheChoiceError(f"unknown cache preset {value['preset']!r}; this server "
                                       f"offers {', '.join(settings.presets) or 'none'}")
        choice = parse_choice(value, "custom", base)
    if settings.policy == "off":
        raise CacheChoiceError("the step cache is off on this server (cache.policy: off)")
    return choice


def _name(value) -> str:
    """YAML reads a bare `off` as false."""
    return "off" if value is False else str(value).lower()


def parse_settings(section: dict | None) -> CacheSettings:
    """The YAML `cache:` section: policy, default, presets: {name: {high, low, Fn, Bn}}."""
    section = dict(section or {})
    unknown = set(section) - {"policy", "default", "presets"}
    if unknown:
        raise SystemExit(f"unknown key(s) in the cache: section: {', '.join(sorted(unknown))}")
    presets = {}
    for name, value in (section.get("presets") or {}).items():
        name = str(name).lower()
        if name in ("off", "none", "custom"):
            raise SystemExit(f"cache.presets: {name!r} is a reserved name")
        try:
            presets[name] = parse_choice(value, name)
        except CacheChoiceError as exc:
            raise SystemExit(f"cache.presets.{name}: {exc}") from None
    default = _name(section.get("default", "off"))
    if default not in ("off", *presets):
        raise SystemExit(f"cache.default must be off or a preset ({', '.join(presets)}), "
                         f"got {default!r}")
    settings = CacheSettings(_name(section.get("policy", "static")), default, presets)
    if settings.policy == "off" and default != "off":
        raise SystemExit("cache.default must be off when cache.policy is off")
    return settings


def check_policy(settings: CacheSettings, dp: int) -> None:
    """At start-up: the dynamic policy's collective spans the whole job in cache-dit 1.5.3."""
    if settings.policy not in POLICIES:
        raise SystemExit(f"cache.policy must be one of {', '.join(POLICIES)}, got "
                         f"{settings.policy!r}")
    if settings.policy == "dynamic" and dp > 1:
        raise SystemExit(
            "cache.policy: dynamic cannot run with --dp > 1: cache-dit "
            f"{CACHE_DIT_VERSION} all-reduces its residual over the whole job, so replicas "
            "running different requests would pair their collectives and hang; use "
            "cache.policy: static (a step mask, no collective) or --dp 1")


def expert_mask(expert: ExpertCache, steps: int) -> list[int]:
    """The expert's 0/1 mask over its `steps`: warm-up first, the last step computed."""
    import cache_dit

    if steps <= 0:
        return []
    if expert.mask in MASK_POLICIES and (steps >= 8 or steps in (4, 6)):
        mask = list(cache_dit.steps_mask(total_steps=steps, mask_policy=expert.mask))
    elif expert.mask in MASK_POLICIES:  # cache-dit's masks refuse these short counts
        long = cache_dit.steps_mask(total_steps=28, mask_policy=expert.mask)
        mask = [long[i * 28 // steps] for i in range(steps)]
    else:
        pattern = [int(c) for c in expert.mask]
        mask = [pattern[i % len(pattern)] for i in range(steps)]
    for i in range(min(expert.warmup, steps)):
        mask[i] = 1
    mask[0] = mask[-1] = 1  # the first step fills the cache; the last is never skipped
    return mask


def split_steps(scheduler, num_inference_steps: int, boundary_ratio: float | None) -> tuple[int, int]:
    """(high-noise steps, low-noise steps), as xfuser's loop picks the expert: t ≥ boundary."""
    if boundary_ratio is None:
        return num_inference_steps, 0
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(num_inference_steps, device="cpu")
    boundary = boundary_ratio * scheduler.config.num_train_timesteps
    high = sum(1 for t in scheduler.timesteps if t >= boundary)
    return high, num_inference_steps - high


class StepCache:
    """cache-dit attached to the served experts (every rank, at assembly)."""

    def __init__(self, pipe, settings: CacheSettings):
        import cache_dit
        from cache_dit import BlockAdapter, ForwardPattern, ParamsModifier

        self.settings = settings
        self.experts = [e for e in (pipe.transformer, pipe.transformer_2) if e is not None]
        for expert in self.experts:
            if hasattr(expert, "_padding_kwargs"):
                expert._padding_kwargs()  # wire the SP mask before cache-dit swaps the blocks
        self.num_blocks = min(len(e.blocks) for e in self.experts)
        cache_dit.enable_cache(
            BlockAdapter(
                transformer=list(self.experts),
                blocks=[e.blocks for e in self.experts],
                forward_pattern=[ForwardPattern.Pattern_2] * len(self.experts),
                params_modifiers=[ParamsModifier(cache_config=self._config([1], False, 1, 0))
                                  for _ in self.experts],  # replaced per request
                has_separate_cfg=True,
            ),
            cache_config=self._config([1], False, 1, 0),
        )
        self.active: dict | None = None
        logging.getLogger("cache_dit").setLevel(logging.WARNING)

    def _config(self, mask: list[int] | None, separate_cfg: bool, Fn: int, Bn: int,
                expert: ExpertCache = ExpertCache()):
        """`mask` None: the dynamic policy (cache-dit decides from the residual)."""
        from cache_dit import DBCacheConfig

        return DBCacheConfig(
            Fn_compute_blocks=Fn, Bn_compute_blocks=Bn,
            residual_diff_threshold=expert.threshold, max_warmup_steps=expert.warmup,
            max_cached_steps=-1, max_continuous_cached_steps=-1,
            enable_separate_cfg=separate_cfg, cfg_compute_first=False,
            steps_computation_mask=mask,
            steps_computation_policy="dynamic" if mask is None else "static",
        )

    def prepare(self, choice: CacheChoice | None, steps: tuple[int, int], separate_cfg: bool
                ) -> None:
        """Every rank, before the request's first step: fresh contexts for each expert. A
        request without a cache gets an all-compute mask (the same arithmetic as no cache)."""
        import cache_dit

        if choice is not None and choice.Fn + choice.Bn >= self.num_blocks:
            raise CacheChoiceError(f"Fn + Bn ({choice.Fn} + {choice.Bn}) leaves none of the "
                                   f"{self.num_blocks} blocks of each expert to cache")
        self.active = {"choice": choice, "steps": {}}
        for name, expert, n in zip(EXPERT_NAMES, self.experts, steps):
            schedule = getattr(choice, name) if choice is not None else ExpertCache("1", 0)
            mask = expert_mask(schedule, n) or [1]
            if choice is not None and self.settings.policy == "dynamic":
                mask = None
            Fn, Bn = (choice.Fn, choice.Bn) if choice is not None else (1, 0)
            config = self._config(mask, separate_cfg, Fn, Bn, schedule)
            config.num_inference_steps = max(n, 1)
            cache_dit.refresh_context(expert, cache_config=config)
            self.active["steps"][name] = n

    def prepare_request(self, view, choice: CacheChoice | None, num_inference_steps: int,
                        boundary_ratio: float | None, guidance_scale: float) -> None:
        """`prepare` from a request: the boundary split on the request's own scheduler, and
        the CFG bookkeeping (two calls per step only where one rank runs both branches). At
        guidance <= 1 (the step-distilled path: one forward per step, 2 + 2 steps at 4) the
        cache does nothing and the report says so."""
        from xfuser.core.distributed import get_classifier_free_guidance_world_size

        steps = split_steps(view.scheduler, num_inference_steps,
                            boundary_ratio if len(self.experts) == 2 else None)
        note = None
        if choice is not None and guidance_scale <= 1:
            choice, note = None, "guidance <= 1 (step-distilled): the step cache does nothing"
        separate_cfg = guidance_scale > 1 and get_classifier_free_guidance_world_size() == 1
        self.prepare(choice, steps, separate_cfg)
        self.active["note"] = note

    def report(self) -> dict | None:
        """After the request: {"policy", "preset", "computed": {...}, "cached": {...}}."""
        import cache_dit

        if self.active is None:
            return None
        choice, steps = self.active["choice"], self.active["steps"]
        computed, cached = {}, {}
        for name, expert in zip(EXPERT_NAMES, self.experts):
            stats = cache_dit.summary(expert, logging=False)
            n = len(set(stats[0].cached_steps)) if stats and steps[name] else 0
            cached[name], computed[name] = n, steps[name] - n
        out = {"policy": self.settings.policy if choice else "off",
               "preset": choice.preset if choice else "off",
               "computed": computed, "cached": cached}
        if len(self.experts) == 1:
            out["computed"], out["cached"] = {"high": computed["high"]}, {"high": cached["high"]}
        if self.active.get("note"):
            out["note"] = self.active["note"]
        return out


def attach(pipe, settings: CacheSettings) -> tuple[StepCache | None, dict]:
    """The assembly step: cache-dit on the experts unless the policy is off."""
    if settings.policy == "off":
        return None, {"policy": "off"}
    with torch.no_grad():
        cache = StepCache(pipe, settings)
    return cache, settings.describe()
