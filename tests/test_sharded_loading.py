"""Sharded loading (wanserve/engine/parallel/sliced_loading.py): with --shard-weights and
`--text-encoder shard` each rank of a replica reads only the rows of the experts and of the text
encoder it keeps, never a whole one; the video is the one the unsharded model makes, bit for
bit, in bfloat16 (diffusers' float32-kept modules included)."""
from __future__ import annotations

import numpy as np

from conftest import run_offline
from wanserve.engine.model.tiny_model import ensure_tiny_model

REQUESTS = [{"seed": 3}]


def bytes_on_disk(*folders: str) -> int:
    """The bytes of the tensors in the tiny checkpoint's files of `folders`."""
    from safetensors import safe_open

    total = 0
    for folder in folders:
        for path in (ensure_tiny_model() / folder).glob("*.safetensors"):
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    tensor = f.get_slice(key)
                    count = int(np.prod(tensor.get_shape()))
                    total += count * (4 if tensor.get_dtype() == "F32" else 2)
    return total


def test_each_rank_reads_only_its_rows_and_the_bf16_video_equals_unsharded(tmp_path):
    """Checked with: every rank reading whole tensors, then keeping its rows (`fill_shards`
    reading rows 0 to n): each rank read the whole 1218560 bytes of the experts (the rows
    summed to twice the checkpoint's); every rank loading the whole experts with
    from_pretrained (`loaded_sliced` returning ()): the report said "whole experts on every
    rank, then sharded"; the text encoder left out of `loaded_sliced`: its report said "whole on
    every rank, then sharded"; the RoPE tables not put back after `to_empty` (`fill_shards`): the
    sharded frames were NaN."""
    flags = ("--ulysses", "2", "--dtype", "bfloat16")
    plain, _ = run_offline(tmp_path, 2, REQUESTS, *flags)
    sharded, report = run_offline(tmp_path, 2, REQUESTS, *flags, "--shard-weights",
                                  "--text-encoder", "shard")
    assert np.array_equal(sharded["frames_0"], plain["frames_0"])
    for sharding, folders in ((report["sharding"], ("transformer", "transformer_2")),
                              (report["sharding"]["text_encoder"], ("text_encoder",))):
        assert sharding["loading"] == "each rank read only its own rows", sharding
        read = sharding["checkpoint_bytes_read_per_rank"]
        on_disk = bytes_on_disk(*folders)
        print(f"{folders}: bytes read per rank {read} of {on_disk}")
        assert sum(read) == on_disk  # every row read once, by one rank
        assert all(rank_read <= 0.55 * on_disk for rank_read in read), read
