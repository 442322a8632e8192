"""wanserve/engine/parallel/sliced_loading.py at the unit level, under torchrun on 3 ranks (uneven
shards: the tiny model's dims are not multiples of 3): an expert saved as several safetensors
files with an index, as the published checkpoints are, built on meta, sharded, filled, gathered
back: every parameter and buffer equals from_pretrained's, value and dtype, in float32 and in
bfloat16 (the float32-kept modules stay float32).

Checked with: `files_by_key` ignoring the index: the job failed (FileNotFoundError: no
diffusion_pytorch_model.safetensors); `per_rank = param.shape[0] // ranks` in `rows_of` (rows
rounded down): float32 parameters differed from blocks.0.attn1.to_k.bias on.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from conftest import torchrun_script


def test_a_multi_file_expert_on_three_ranks_equals_from_pretrained(tmp_path):
    from wanserve.engine.model.tiny_model import ensure_tiny_model
    from wanserve.engine.parallel.sp_padding import WanServeTransformer

    expert = WanServeTransformer.from_pretrained(ensure_tiny_model(), subfolder="transformer")
    expert.save_pretrained(tmp_path / "transformer", max_shard_size="200KB")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    result = torchrun_script(__file__, 3, str(tmp_path / "transformer"))
    assert result == {"float32": [], "bfloat16": []}, result


def main(folder: Path) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from wanserve.engine.parallel.distributed import exit_without_teardown
    from wanserve.engine.parallel.sliced_loading import build_on_meta, fill_shards
    from wanserve.engine.parallel.sp_padding import WanServeTransformer

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    differing = {}
    for dtype in (torch.float32, torch.bfloat16):
        reference = WanServeTransformer.from_pretrained(folder, dtype=dtype)
        expert = build_on_meta(WanServeTransformer, folder, dtype).requires_grad_(False)
        for block in expert.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(expert, mesh=mesh)
        fill_shards(expert, folder, torch.device("cpu"))
        ours = {**{k: v.full_tensor() for k, v in expert.state_dict().items()},
                **dict(expert.named_buffers())}
        theirs = {**reference.state_dict(), **dict(reference.named_buffers())}
        differing[str(dtype).removeprefix("torch.")] = sorted(
            key for key, value in theirs.items()
            if ours[key].dtype != value.dtype or not torch.equal(ours[key], value))
    dist.barrier()
    if dist.get_rank() == 0:
        print(json.dumps(differing), flush=True)
    dist.destroy_process_group()
    # past this point the interpreter's teardown once aborted a rank ("terminate called without
    # an active exception", a C++ thread still joinable): nothing is left to release
    exit_without_teardown(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
