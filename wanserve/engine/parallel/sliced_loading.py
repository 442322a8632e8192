"""Sharded loading (--shard-weights, `memory.text_encoder: shard`): each rank reads only the
rows of each weight it keeps, of the experts and of the text encoder.

Written for torch 2.13's FSDP2 `fully_shard`, which splits each parameter along dim 0 as
`torch.chunk` does: rank r of a replica of N ranks holds rows [r * ceil(n / N), ...).

Every rank builds the module with its parameters on `meta` (no memory), shards it
(wanserve/engine/parallel/sharding.py), allocates its shards empty and fills them from the
checkpoint's safetensors files. The rows are read with plain file reads at their offsets (the
format: an 8-byte header length, a JSON header of dtype, shape and byte offsets, then the row-
major data): not through a memory map, whose touched pages would count in the rank's resident
set as long as the file stays open. So a rank holds its shards plus one tensor's rows at a
time, never a whole module, and no collective is needed (each rank reads its own rows; a node
reads the checkpoint once in all).

The dtypes are the ones from_pretrained gives, cast from the file's the same way, so the
sharded model equals the unsharded one: diffusers keeps a class's `_keep_in_fp32_modules` in
float32 whatever the dtype, transformers (5.25) only under float16. Tied parameters (UMT5's
token embedding is its `shared`) are one tensor that the checkpoint holds under one key.
`to_empty` also empties the buffers the constructors compute and the checkpoints do not hold
(the RoPE tables: `persistent=False`): they are put back as built, else the output is not
finite.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

# (index, single file): diffusers' names, then transformers'
CHECKPOINT_FILES = (("diffusion_pytorch_model.safetensors.index.json",
                     "diffusion_pytorch_model.safetensors"),
                    ("model.safetensors.index.json", "model.safetensors"))
FILE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
               "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32}


def build_on_meta(transformer_class, folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """`folder`'s expert with its parameters on `meta` in from_pretrained's dtypes; the
    computed buffers (RoPE tables) built for real on the host."""
    from wanserve.engine.model.materialise import materialise

    config = transformer_class.load_config(folder)
    return materialise(lambda: transformer_class.from_config(config), dtype,
                       torch.device("meta"), seed=0, keep_buffers=True)


def build_text_encoder_on_meta(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """`folder`'s UMT5 encoder with its parameters on `meta` in from_pretrained's dtypes."""
    from transformers import UMT5Config, UMT5EncoderModel

    from wanserve.engine.model.materialise import materialise

    config = UMT5Config.from_pretrained(folder)
    return materialise(lambda: UMT5EncoderModel(config), dtype, torch.device("meta"), seed=0,
                       keep_in_fp32=dtype == torch.float16, keep_buffers=True)


def files_by_key(folder: Path) -> dict[str, Path]:
    """Which safetensors file of `folder` holds each tensor."""
    for index_name, single_name in CHECKPOINT_FILES:
        if (index := folder / index_name).exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {key: folder / name for key, name in weight_map.items()}
        if (single := folder / single_name).exists():
            return dict.fromkeys(read_header(single)[0], single)
    raise FileNotFoundError(f"{folder}: no safetensors weights "
                            f"({', '.join(name for pair in CHECKPOINT_FILES for name in pair)})")


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's tensor entries and the offset where its data starts."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        entries = json.loads(f.read(length))
    entries.pop("__metadata__", None)
    return entries, 8 + length


def read_rows(f, entry: dict, data_start: int, first: int, count: int) -> torch.Tensor:
    """Rows [first, first + count) of one tensor of an open safetensors file (all of a 0-d)."""
    shape = entry["shape"]
    rows = torch.empty((count, *shape[1:]) if shape else (), dtype=FILE_DTYPES[entry["dtype"]])
    row_bytes = math.prod(shape[1:]) * rows.element_size()
    f.seek(data_start + entry["data_offsets"][0] + first * row_bytes)
    f.readinto(rows.reshape(-1).view(torch.uint8).numpy())
    return rows


def rows_of(param) -> tuple[int, int]:
    """(first row, row count) of the global tensor that this rank's shard of `param` holds."""
    from torch.distributed.tensor import Shard

    if tuple(param.placements) != (Shard(0),):
        raise RuntimeError(f"expected a dim-0 shard, got {param.placements}")
    ranks = param.device_mesh.size()
    rank = param.device_mesh.get_local_rank()
    per_rank = -(-param.shape[0] // ranks)
    first = min(rank * per_rank, param.shape[0])
    return first, param.to_local().shape[0]


def fill_shards(module: torch.nn.Module, folder: Path, device: torch.device) -> int:
    """Allocate `module`'s shards on `device` and read them from `folder`'s files; returns the
    bytes this rank read from the checkpoint (its rows only)."""
    from torch.distributed.tensor import DTensor

    computed = {(path, name): buffer for path, sub in module.named_modules()
                for name, buffer in sub.named_buffers(recurse=False)
                if name in sub._non_persistent_buffers_set}
    module.to_empty(device=device)
    modules = dict(module.named_modules())
    for (path, name), buffer in computed.items():
        modules[path]._buffers[name] = buffer.to(device)
    where = files_by_key(folder)
    # a tied parameter is one tensor under several names, of which the checkpoint holds one
    # or more (the same values): it is read once
    names: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for key, tensor in module.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), (tensor, []))[1].append(key)
    wanted, known = {}, set()
    for tensor, keys in names.values():
        stored = [key for key in keys if key in where]
        if not stored:
            raise RuntimeError(f"{folder}: the checkpoint holds none of {keys}")
        wanted[stored[0]] = tensor
        known.update(keys)
    unexpected = sorted(set(where) - known)
    if unexpected:
        raise RuntimeError(f"{folder}: checkpoint keys the model does not have: {unexpected[:5]}")
    read = 0
    by_file: dict[Path, list[str]] = {}
    for key in wanted:
        by_file.setdefault(where[key], []).append(key)
    with torch.no_grad():
        for path, keys in by_file.items():
            entries, data_start = read_header(path)
            with open(path, "rb", buffering=0) as f:
                for key in keys:
                    target = wanted[key]
                    if isinstance(target, DTensor):
                        first, count = rows_of(target)
                        target = target.to_local()
                    else:  # not sharded: a persistent buffer
                        first, count = 0, target.shape[0] if target.dim() else 1
                    rows = read_rows(f, entries[key], data_start, first, count)
                    read += rows.numel() * rows.element_size()
                    target.copy_(rows.to(target.dtype))
    return read
