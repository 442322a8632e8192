"""Regional compilation: `torch.compile` on each repeated transformer block of both experts.

Written for torch 2.13 and diffusers 0.42.1: diffusers' `compile_repeated_blocks` compiles
every `WanTransformerBlock` (the class named in the model's `_repeated_blocks`) in place with
`module.compile(...)`. The blocks share their compiled graphs (dynamo treats a module's
parameters as inputs), so the compile is paid once for every block of both experts, and
whatever runs the blocks (xfuser's sequence-parallel wrapper, cache-dit's cached blocks) runs
the compiled ones. Measured on the tiny model: two graphs, one for the first block (its input
is a view of the patch embedding) and one for the rest; under sequence parallelism a size
whose tokens xfuser pads (not a multiple of the SP degree) adds its own graphs, once (under
ring attention more of them: the masked ring loop is a graph break, and every function on the
stack above it resumes in a graph of its own). With `dynamic: true` any other new size reuses
them instead of compiling again.

Compiling happens on the first forward; the engine runs warm-up requests through it before
the ready barrier (wanserve/engine/serving/warmup.py: the default size, and under sequence
parallelism a padded one), so no client pays for it. Every compile dynamo makes in this process is
counted (torch._dynamo's compile callbacks), split into those of the warm-up and those after
it (`recompiles`), and reported in `/health`.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch
import torch.fx.experimental._config

TORCH_VERSION = "2.13"
POLICIES = ("off", "regional")
RECOMPILE_LIMIT = 64
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class CompileSettings:
    """The `compile:` section."""

    policy: str = "off"  # "regional": torch.compile each repeated block
    backend: str = "inductor"  # any torch.compile backend ("aot_eager": dynamo without codegen)
    mode: str = "default"  # torch.compile's mode
    dynamic: bool = True  # one graph for every size (false: a compile per new shape)

    def describe(self) -> dict:
        return {"policy": self.policy, "backend": self.backend, "mode": self.mode,
                "dynamic": self.dynamic}


def parse_settings(section, flag: str | None = None) -> CompileSettings:
    """The YAML `compile:` section (or a bare `compile: regional`), `--compile` over it."""
    if section is None or isinstance(section, (str, bool)):
        section = {} if section is None else {"policy": section}
    section = dict(section)
    unknown = set(section) - set(CompileSettings.__dataclass_fields__)
    if unknown:
        raise SystemExit(f"unknown key(s) in the compile: section: {', '.join(sorted(unknown))}")
    if flag is not None:
        section["policy"] = flag
    policy = "off" if section.get("policy") is False else str(section.get("policy", "off")).lower()
    if policy not in POLICIES:
        raise SystemExit(f"compile.policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    mode = str(section.get("mode", "default"))
    if mode not in MODES:
        raise SystemExit(f"compile.mode must be one of {', '.join(MODES)}, got {mode!r}")
    dynamic = section.get("dynamic", True)
    if not isinstance(dynamic, bool):
        raise SystemExit(f"compile.dynamic must be true or false, got {dynamic!r}")
    return CompileSettings(policy, str(section.get("backend", "inductor")), mode, dynamic)


def check_combination(settings: CompileSettings, shard_weights: bool) -> None:
    """At start-up: what the compiled blocks cannot run with."""
    if settings.policy != "off" and shard_weights:
        raise SystemExit(
            "compile.policy: regional cannot run with --shard-weights: FSDP2 (torch "
            f"{TORCH_VERSION}) turns each block into an FSDP class that diffusers' "
            "compile_repeated_blocks does not find, and its all-gather hooks would run inside "
            "the compiled blocks; choose one (--compile off or no --shard-weights)")


class CompileCounter:
    """Every dynamo compile in this process: how many, and the seconds they took."""

    def __init__(self):
        from torch._dynamo.callback import callback_handler

        self.compiles = 0
        self.seconds = 0.0
        self._started: float | None = None
        self._lock = threading.Lock()
        callback_handler.register_start_callback(self._start)
        callback_handler.register_end_callback(self._end)

    def _start(self, _args) -> None:
        with self._lock:
            self.compiles += 1
            self._started = time.perf_counter()

    def _end(self, _args) -> None:
        with self._lock:
            if self._started is not None:
                self.seconds += time.perf_counter() - self._started
                self._started = None


class CompiledBlocks:
    """The experts' blocks compiled (every rank, at assembly); `report` is what /health shows,
    kept up to date by `refresh` after every job."""

    def __init__(self, pipe, settings: CompileSettings):
        self.settings = settings
        self.counter = CompileCounter()
        experts = [e for e in (pipe.transformer, pipe.transformer_2) if e is not None]
        options = {"backend": settings.backend, "dynamic": settings.dynamic}
        if settings.mode != "default":
            options["mode"] = settings.mode
        # dynamo's duck sizing makes equal sizes one symbol: a square warm-up would then guard
        # on width == height and recompile at the first other shape
        torch.fx.experimental._config.use_duck_shape = False
        # every block runs one code object (WanTransformerBlock.forward), so all its graphs
        # count against one limit: first block and the rest, times each size class (padded or
        # not) and adapter set. Past the limit dynamo would run the blocks eagerly, unreported.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                                   RECOMPILE_LIMIT)
        for expert in experts:
            expert.compile_repeated_blocks(**options)
        self.blocks = sum(len(e.blocks) for e in experts)
        self.report = {**settings.describe(), "torch": torch.__version__,
                       "blocks": self.blocks, "recompile_limit": RECOMPILE_LIMIT,
                       "warmup": None, "recompiles": 0}
        self._at_warmup: int | None = None

    def warmed_up(self, seconds: float, ran: dict) -> None:
        """After the warm-up requests (`ran`: their sizes and adapter sets): their compiles
        are the baseline of `recompiles`."""
        self._at_warmup = self.counter.compiles
        self.report["warmup"] = {"seconds": round(seconds, 2), **ran,
                                 "compiles": self.counter.compiles,
                                 "compile_seconds": round(self.counter.seconds, 2)}

    def refresh(self) -> None:
        """Compiles since the warm-up (a new shape or guard: each is one more graph)."""
        self.report["recompiles"] = self.counter.compiles - (self._at_warmup or 0)


def attach(pipe, settings: CompileSettings) -> tuple[CompiledBlocks | None, dict]:
    """The assembly step: the blocks compiled (lazily: the warm-up compiles them) unless off."""
    if settings.policy == "off":
        return None, {"policy": "off"}
    compiled = CompiledBlocks(pipe, settings)
    return compiled, compiled.report
