"""--shard-weights loading: each rank reads only the rows of each expert weight it keeps.

Written for torch 2.13's FSDP2 `fully_shard`, which splits each parameter along dim 0 as
`torch.chunk` does: rank r of a replica of N ranks holds rows [r * ceil(n / N), ...).

Every rank builds the experts with their parameters on `meta` (no memory), shards them
(wanserve/engine/parallel/sharding.py), allocates its shards empty and fills them from the
checkpoint's safetensors files. The rows are read with plain file reads at their offsets (the
format: an 8-byte header length, a JSON header of dtype, shape and byte offsets, then the row-
major data): not through a memory map, whose touched pages would count in the rank's resident
set as long as the file stays open. So a rank holds its shards plus one tensor's rows at a
time, never a whole expert, and no collective is needed (each rank reads its own rows; a node
reads the checkpoint once in all).

The dtypes are the ones from_pretrained gives (`dtype`, the class's `_keep_in_fp32_modules`
in float32), cast from the file's the same way, so the sharded model equals the unsharded one.
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

SINGLE_FILE = "diffusion_pytorch_model.safetensors"
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
FILE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
               "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32}


def build_on_meta(transformer_class, folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """`folder`'s expert with its parameters on `meta` in from_pretrained's dtypes; the
    computed buffers (RoPE tables) built for real on the host."""
    from wanserve.engine.model.materialise import materialise

    config = transformer_class.load_config(folder)
    return materialise(lambda: transformer_class.from_config(config), dtype,
                       torch.device("meta"), seed=0, keep_buffers=True)


def files_by_key(folder: Path) -> dict[str, Path]:
    """Which safetensors file of `folder` holds each tensor."""
    index = folder / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: folder / name for key, name in weight_map.items()}
    return dict.fromkeys(read_header(folder / SINGLE_FILE)[0], folder / SINGLE_FILE)


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


def fill_shards(expert: torch.nn.Module, folder: Path, device: torch.device) -> int:
    """Allocate `expert`'s shards on `device` and read them from `folder`'s files; returns the
    bytes this rank read from the checkpoint (its rows only)."""
    from torch.distributed.tensor import DTensor

    computed = {(path, name): buffer for path, module in expert.named_modules()
                for name, buffer in module.named_buffers(recurse=False)
                if name in module._non_persistent_buffers_set}
    expert.to_empty(device=device)
    modules = dict(expert.named_modules())
    for (path, name), buffer in computed.items():
        modules[path]._buffers[name] = buffer.to(device)
    where = files_by_key(folder)
    wanted = expert.state_dict()
    missing = sorted(set(wanted) - set(where))
    unexpected = sorted(set(where) - set(wanted))
    if missing or unexpected:
        raise RuntimeError(f"{folder}: checkpoint keys differ from the model's "
                           f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
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
