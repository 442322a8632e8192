"""LoRA adapters: registered at start-up, chosen per request, applied the same way on every rank.

An adapter is one file loaded into both experts (or only one, `experts: high|low`), a file
whose keys name both experts (`transformer.*` and `transformer_2.*`), or a pair: `high` →
`transformer` (the high-noise expert), `low` → `transformer_2`. Key formats are whatever
diffusers' `WanLoraLoaderMixin.lora_state_dict` converts (diffusers/PEFT, original Wan
`diffusion_model.*` with alpha, `diff_b` and `head.head.diff`, musubi/kohya `lora_unet_*`).
Keys that match no layer (a Wan2.1 I2V LoRA's image attention and embedder on Wan2.2) are
dropped, logged and counted in the start-up report.

A request's choice is a tuple of `AdapterUse` (name and per-expert scale) in the
GenerationRequest; every rank sets exactly those adapters and scales before denoising, so
nothing of a previous request remains. Scales go through PEFT's adapter weights, never through
`attention_kwargs["scale"]`, which xfuser 0.7.0's Wan wrapper pops and ignores.
"""
from __future__ import annotations

import logging
import math
import os
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass

log = logging.getLogger("wanserve.engine")

EXPERTS = ("transformer", "transformer_2")
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_SCALE = 10.0
_KEY_PREFIXES = ("transformer.", "transformer_2.", "diffusion_model.", "lora_unet_")


class AdapterError(ValueError):
    """A bad adapter file or registration (start-up) or a bad request choice (400)."""


class AdapterLoadError(RuntimeError):
    """A --lora-dir file failed to load; every rank fails the same way, before any collective."""


@dataclass(frozen=True)
class AdapterSpec:
    """One registered adapter (`--lora NAME=PATH[,LOW]` or the YAML `loras:` section)."""

    name: str
    high: str | None  # file loaded into `transformer`
    low: str | None  # file loaded into `transformer_2`
    scale_high: float = 1.0
    scale_low: float = 1.0
    fuse: bool = False

    def public(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class AdapterUse:
    """One adapter of a request: the name every rank knows it by and its scale per expert.
    `path` is set for a --lora-dir file, which every rank loads on first use."""

    name: str
    scale_high: float
    scale_low: float
    path: str | None = None


def check_scale(value, what: str = "scale") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AdapterError(f"the LoRA {what} must be a number, got {value!r}")
    if not math.isfinite(value) or abs(value) > MAX_SCALE:
        raise AdapterError(f"the LoRA {what} must be finite and within ±{MAX_SCALE:g}, got {value}")
    return float(value)


def check_file(path: str) -> str:
    """The file exists and its safetensors header names LoRA keys of a known format (the
    tensors are read later, at load)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise AdapterError(f"LoRA file {path}: not found")
    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:
        raise AdapterError(f"LoRA file {path}: not a readable safetensors file ({exc})") from None
    if not any(k.startswith(_KEY_PREFIXES) and ("lora" in k or k.endswith(".alpha"))
               for k in keys):
        raise AdapterError(f"LoRA file {path}: no LoRA key of a known Wan format "
                           f"(first keys: {keys[:3]})")
    return path


def parse_specs(section: dict | None, flags: list[str]) -> tuple[AdapterSpec, ...]:
    """The YAML `loras:` section, then `--lora NAME=PATH[,LOW]` flags (a flag gives a YAML
    entry of the same name its files, keeping its scales and `fuse`). Every file is checked
    here, before any weight loads."""
    entries = dict(section or {})
    for flag in flags:
        name, sep, paths = flag.partition("=")
        if not sep or not paths:
            raise AdapterError(f"--lora expects NAME=PATH or NAME=HIGH,LOW, got {flag!r}")
        files = paths.split(",")
        entry = {k: v for k, v in (entries.get(name) or {}).items()
                 if k not in ("path", "high", "low", "experts")}
        entry.update({"path": files[0]} if len(files) == 1
                     else {"high": files[0], "low": files[1]})
        entries[name] = entry
    specs = []
    for name, entry in entries.items():
        if not NAME_RE.match(str(name)):
            raise AdapterError(f"LoRA name {name!r}: use letters, digits, '_' or '-'")
        entry = dict(entry or {})
        unknown = set(entry) - {"path", "high", "low", "experts", "scale", "scale_high",
                                "scale_low", "fuse"}
        if unknown:
            raise AdapterError(f"LoRA {name}: unknown key(s) {', '.join(sorted(unknown))}")
        if "path" in entry:
            experts = entry.get("experts", "both")
            if experts not in ("both", "high", "low"):
                raise AdapterError(f"LoRA {name}: experts must be both, high or low")
            high = entry["path"] if experts in ("both", "high") else None
            low = entry["path"] if experts in ("both", "low") else None
        else:
            high, low = entry.get("high"), entry.get("low")
        if not high and not low:
            raise AdapterError(f"LoRA {name}: give `path`, or `high` and/or `low`")
        for path in {p for p in (high, low) if p}:
            check_file(str(path))
        scale = entry.get("scale", 1.0)
        specs.append(AdapterSpec(
            name=str(name), high=str(high) if high else None, low=str(low) if low else None,
            scale_high=check_scale(entry.get("scale_high", scale)),
            scale_low=check_scale(entry.get("scale_low", scale)), fuse=bool(entry.get("fuse"))))
    return tuple(specs)


def _split_experts(state_dict: dict) -> dict[str, dict]:
    """{expert: state dict with `transformer.` keys} for a file whose keys name both experts."""
    low = {"transformer." + k[len("transformer_2."):]: v for k, v in state_dict.items()
           if k.startswith("transformer_2.")}
    high = {k: v for k, v in state_dict.items() if not k.startswith("transformer_2.")}
    return {"transformer": high, "transformer_2": low}


def _zero_missing_bias_deltas(state_dict: dict) -> dict:
    """Once one layer of a file has a bias delta (original Wan `diff_b`), diffusers 0.42.1
    gives every layer of the adapter a `lora_B.bias` and leaves those the file lacks on the
    meta device; a missing bias delta is zero, so give it one."""
    if not any(k.endswith(".lora_B.bias") for k in state_dict):
        return state_dict
    out = dict(state_dict)
    for key, value in state_dict.items():
        if key.endswith(".lora_B.weight"):
            out.setdefault(key.removesuffix("weight") + "bias", value.new_zeros(value.shape[0]))
    return out


def _check_runnable(expert, name: str, expert_name: str, path: str) -> None:
    """Every tensor of adapter `name` holds data on its layer's device, or the adapter is
    refused now: PEFT leaves a tensor the file lacks (a `lora_A` without its `lora_B`) on the
    meta device, and every request using it would fail."""
    modules = dict(expert.named_modules())
    bad = []
    for key, tensor in expert.named_parameters():
        layer, sep, rest = key.partition(".lora_")
        if not sep or rest.split(".")[1:2] != [name]:
            continue
        device = modules[layer].get_base_layer().weight.device
        if tensor.is_meta or tensor.device != device:
            bad.append(f"{key} on {tensor.device}")
    if bad:
        raise AdapterError(f"LoRA file {path}: {len(bad)} tensor(s) of {expert_name} hold no "
                           f"data on the layer's device ({', '.join(bad[:3])}"
                           f"{' …' if len(bad) > 3 else ''}); the file lacks them")


class Adapters:
    """The adapters loaded on this rank and the per-request switch between them."""

    def __init__(self, pipe, cfg, offload=None):
        self.pipe = pipe
        self.offload = offload  # ExpertOffload: told after each change of the experts' tensors
        self.on_expert: dict[str, set[str]] = {e: set() for e in EXPERTS}
        self.unmatched: dict[str, int] = {}
        self.dynamic: OrderedDict[str, None] = OrderedDict()
        self.cache_size = cfg.lora_cache
        self.unfuse_per_request = cfg.lora_unfuse_per_request
        self.fused: tuple[AdapterUse, ...] = ()  # the default, merged into the weights
        self.merged = False

    # --- loading ---------------------------------------------------------------------
    def load(self, name: str, high: str | None, low: str | None) -> None:
        from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

        try:
            files = {}
            for path in {p for p in (high, low) if p}:
                files[path] = WanLoraLoaderMixin.lora_state_dict(path)
            for expert_name, path in (("transformer", high), ("transformer_2", low)):
                if path:
                    state_dict = files[path]
                    if any(k.startswith("transformer_2.") for k in state_dict):
                        state_dict = _split_experts(state_dict)[expert_name]
                    self._load_into(name, expert_name, state_dict, path)
        except AdapterError:
            self._forget(name)
            raise
        except Exception as exc:
            self._forget(name)
            raise AdapterError(f"LoRA {name} ({high or low}): {exc}") from exc
        self._tensors_changed()

    def _load_into(self, name: str, expert_name: str, state_dict: dict, path: str) -> None:
        expert = getattr(self.pipe, expert_name)
        modules = dict(expert.named_modules())
        kept, unmatched = {}, []
        for key, value in state_dict.items():
            module = key.removeprefix("transformer.").split(".lora_")[0]
            if module in modules:
                kept[key] = value
            else:
                unmatched.append(module)  # e.g. a Wan2.1 I2V LoRA's k_img/v_img on Wan2.2
        if unmatched:
            names = sorted(set(unmatched))
            log.warning("LoRA %s: %d key(s) of %s match no layer of %s, ignored (%s%s)", name,
                        len(unmatched), path, expert_name, ", ".join(names[:3]),
                        f" and {len(names) - 3} more layers" if len(names) > 3 else "")
            self.unmatched[name] = self.unmatched.get(name, 0) + len(unmatched)
        if not kept:
            raise AdapterError(f"LoRA file {path}: no key matches a layer of the Wan transformer")
        self.pipe.load_lora_weights(_zero_missing_bias_deltas(kept), adapter_name=name,
                                    load_into_transformer_2=expert_name == "transformer_2")
        if name not in (getattr(expert, "peft_config", None) or {}):
            raise AdapterError(f"LoRA file {path}: nothing was loaded into {expert_name}")
        self.on_expert[expert_name].add(name)
        _check_runnable(expert, name, expert_name, path)

    def _forget(self, name: str) -> None:
        for expert_name in EXPERTS:
            if name in self.on_expert[expert_name]:
                getattr(self.pipe, expert_name).delete_adapters(name)
                self.on_expert[expert_name].discard(name)
        self._tensors_changed()

    def _tensors_changed(self) -> None:
        if self.offload is not None:
            self.offload.refresh()

    def fuse_default(self, uses: tuple[AdapterUse, ...]) -> None:
        """Merge `uses` into both experts' weights. Without unfuse-per-request the LoRA layers
        are removed afterwards: the fused model runs at the base model's speed."""
        self.fused = uses
        self._merge()
        if not self.unfuse_per_request:
            for expert_name in EXPERTS:
                expert = getattr(self.pipe, expert_name)
                if getattr(expert, "_hf_peft_config_loaded", False):
                    expert.unload_lora()
                self.on_expert[expert_name].clear()
            self._tensors_changed()

    def _merge(self) -> None:
        self._activate(self.fused)
        for expert_name in EXPERTS:
            names = [u.name for u in self.fused if u.name in self.on_expert[expert_name]]
            if names:
                getattr(self.pipe, expert_name).fuse_lora(adapter_names=names)
        self.merged = True
        self._tensors_changed()

    # --- per request -----------------------------------------------------------------
    def apply(self, uses: tuple[AdapterUse, ...]) -> None:
        """Make exactly `uses` active on this rank (every rank calls it with the same)."""
        for use in uses:
            if use.path:
                self._ensure_dynamic(use)
        if self.fused and set(uses) == set(self.fused):
            if not self.merged:
                self._merge()
            return
        if self.merged:
            if not self.unfuse_per_request:
                raise AdapterError("the fused default adapter cannot be changed")
            for expert_name in EXPERTS:
                getattr(self.pipe, expert_name).unfuse_lora()
            self.merged = False
            self._tensors_changed()
        self._activate(uses)

    def _activate(self, uses: tuple[AdapterUse, ...]) -> None:
        # PeftAdapterMixin.set_adapters looks the model's class name up in a table
        # (_SET_ADAPTER_SCALE_FN_MAPPING, diffusers 0.42.1) that has no entry for xfuser's
        # wrapper; for transformers that entry is the identity, so call what it calls.
        from diffusers.utils.peft_utils import set_weights_and_activate_adapters

        for expert_name in EXPERTS:
            expert = getattr(self.pipe, expert_name)
            if not getattr(expert, "_hf_peft_config_loaded", False):
                continue
            high = expert_name == "transformer"
            chosen = [(u.name, u.scale_high if high else u.scale_low) for u in uses
                      if u.name in self.on_expert[expert_name]]
            if chosen:
                set_weights_and_activate_adapters(expert, [n for n, _ in chosen],
                                                  [s for _, s in chosen])
                # peft's set_adapter makes the active adapter trainable; nothing here trains,
                # and compiled blocks guard on requires_grad (a switch would recompile)
                expert.requires_grad_(False)
                expert.enable_lora()
            else:
                expert.disable_lora()

    def _ensure_dynamic(self, use: AdapterUse) -> None:
        if use.name in self.dynamic:
            self.dynamic.move_to_end(use.name)
            return
        try:
            self.load(use.name, use.path, use.path)
        except AdapterError as exc:
            raise AdapterLoadError(str(exc)) from exc
        log.info("LoRA %s loaded from %s into the --lora-dir cache", use.name, use.path)
        self.dynamic[use.name] = None
        while len(self.dynamic) > self.cache_size:
            oldest, _ = self.dynamic.popitem(last=False)
            self._forget(oldest)
            log.info("LoRA %s evicted from the --lora-dir cache", oldest)

    def report(self) -> dict:
        out = {"loaded": {e: sorted(n for n in names if n not in self.dynamic)
                          for e, names in self.on_expert.items()},
               "fused": [u.name for u in self.fused]}
        if self.unmatched:
            out["unmatched_keys"] = dict(self.unmatched)
        return out


def load_adapters(pipe, cfg, offload=None) -> tuple[Adapters | None, dict | str]:
    """The assembly's adapters step: every registered adapter loaded on this rank (and the
    fused default merged), the offloaded expert's host copy kept up to date. Returns the
    per-request switch and what it did, for /health."""
    if not cfg.adapters and not cfg.lora_dir:
        return None, "none"
    fused_names = [s.name for s in cfg.adapters if s.fuse]
    if fused_names and not cfg.lora_unfuse_per_request and (
            len(fused_names) < len(cfg.adapters) or cfg.lora_dir):
        raise AdapterError(f"{', '.join(fused_names)} is fused into the weights, so no request "
                           "could use the other adapters or --lora-dir: set "
                           "lora_unfuse_per_request: true, or register only fused ones")
    adapters = Adapters(pipe, cfg, offload)
    for spec in cfg.adapters:
        adapters.load(spec.name, spec.high, spec.low)
    fused = tuple(AdapterUse(s.name, s.scale_high, s.scale_low) for s in cfg.adapters if s.fuse)
    if fused:
        adapters.fuse_default(fused)
    log.info("LoRA adapters: %s", adapters.report())
    return adapters, adapters.report()
