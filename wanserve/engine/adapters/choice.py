"""A request's `lora` field → the adapters and scales every rank applies (rank 0, before queuing).

Accepted: a name; `name:scale`; `name:scale_high:scale_low`; several of those separated by
commas; a JSON object `{"name", "scale"}` or `{"name", "scale_high", "scale_low"}`; vLLM-Omni's
`{"name", "path", "scale"}` with `path` under --lora-dir; a list of any of these (or its JSON
text); `"none"` or `[]` for the base model. Absent: the server's default (its fused adapters,
else none).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from wanserve.engine.adapters.lora import AdapterError, AdapterUse, check_file, check_scale


def lora_dir_file(path: str, lora_dir: str | None) -> str:
    """`path` resolved (relative to --lora-dir) and checked to lie under it."""
    if not lora_dir:
        raise AdapterError("LoRA paths are not accepted here: the server has no --lora-dir")
    root = Path(lora_dir).resolve()
    resolved = (root / path).resolve()
    if root not in resolved.parents:
        raise AdapterError(f"LoRA path {path!r} is outside the server's --lora-dir")
    if resolved.suffix != ".safetensors":
        raise AdapterError(f"LoRA path {path!r}: only .safetensors files are loaded")
    check_file(str(resolved))
    return str(resolved)


def dynamic_name(path: str) -> str:
    """The name every rank gives a --lora-dir file: changes when the file does."""
    st = os.stat(path)
    digest = hashlib.sha1(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    return f"dir-{digest[:16]}"


def _items(value) -> list:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(("[", "{")):
            try:
                value = json.loads(text)
            except ValueError as exc:
                raise AdapterError(f"`lora` is not valid JSON: {exc}") from None
        elif text.lower() == "none":
            return []
        else:
            return [part.strip() for part in text.split(",") if part.strip()] or [None]
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return value
    raise AdapterError(f"`lora` must be a name, an object or a list, got {type(value).__name__}")


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        raise AdapterError(f"the LoRA scale must be a number, got {text!r}") from None


def _one(item, cfg) -> AdapterUse:
    registered = {spec.name: spec for spec in cfg.adapters}
    path = None
    if isinstance(item, str):
        name, *scales = item.split(":")
        if len(scales) > 2:
            raise AdapterError(f"`{item}`: use name, name:scale or name:scale_high:scale_low")
        given = {}
        if len(scales) == 1:
            given["scale"] = _number(scales[0])
        elif len(scales) == 2:
            given["scale_high"], given["scale_low"] = map(_number, scales)
    elif isinstance(item, dict):
        name, path = item.get("name"), item.get("path")
        given = {k: item[k] for k in ("scale", "scale_high", "scale_low") if item.get(k) is not None}
        if not isinstance(name, str):
            raise AdapterError("a LoRA object needs a `name` (and `path` for a --lora-dir file)")
    else:
        raise AdapterError(f"a LoRA entry must be a name or an object, got {item!r}")
    if path is not None:
        if not isinstance(path, str):
            raise AdapterError("the LoRA `path` must be a string")
        spec = registered.get(name)
        if spec is None or path not in (spec.high, spec.low):
            resolved = lora_dir_file(path, cfg.lora_dir)
            scale = check_scale(given.get("scale", 1.0))
            return AdapterUse(dynamic_name(resolved), check_scale(given.get("scale_high", scale)),
                              check_scale(given.get("scale_low", scale)), resolved)
    spec = registered.get(name)
    if spec is None:
        known = ", ".join(sorted(registered)) or "none are registered"
        raise AdapterError(f"unknown LoRA {name!r} (registered: {known})")
    high = low = None
    if "scale" in given:
        high = low = check_scale(given["scale"])
    high = check_scale(given.get("scale_high", spec.scale_high if high is None else high))
    low = check_scale(given.get("scale_low", spec.scale_low if low is None else low))
    return AdapterUse(spec.name, high, low)


def resolve_lora(value, cfg) -> tuple[AdapterUse, ...]:
    fused = tuple(AdapterUse(s.name, s.scale_high, s.scale_low) for s in cfg.adapters if s.fuse)
    if value is None:
        return fused
    uses = tuple(_one(item, cfg) for item in _items(value))
    if len({u.name for u in uses}) != len(uses):
        raise AdapterError("a LoRA is named twice in `lora`")
    if fused and set(uses) != set(fused) and not cfg.lora_unfuse_per_request:
        raise AdapterError(f"this server runs with {', '.join(u.name for u in fused)} fused into "
                           "the weights at its default scales; other adapters or scales are not "
                           "available (the operator can allow them with "
                           "lora_unfuse_per_request)")
    return uses
