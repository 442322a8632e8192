"""wanserve/engine/cpu/cross_attention.py: the engine's transformer computes each prompt's
cross-attention keys and values once, and returns exactly what an uncached transformer returns.

The check runs in a child process (this file as a script) because xfuser's parallel state is
process-global: a one-rank gloo group, the tiny model, the engine's own assembly.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_keys_and_values_computed_once_per_prompt_and_outputs_unchanged():
    from conftest import free_port

    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    blocks = result["blocks"]
    assert result["cached_blocks"] == blocks > 0
    assert result["health"] == "computed once per prompt"
    # 3 steps x (prompt, negative prompt), then the changed prompt: the uncached model
    # projects on all 7 forwards, the cached one once per prompt and once for the change
    assert result["reference_kv_projections"] == 7 * blocks
    assert result["reference_text_embeddings"] == 7
    assert result["cached_kv_projections"] == 3 * blocks
    assert result["cached_text_embeddings"] == 3
    assert result["max_abs_diff"] == 0.0


def _check() -> dict:
    """Alternate two prompts over three steps, as the pipeline's sequential CFG does, then
    change one prompt in place; compare with a transformer loaded without the cache."""
    import torch

    from wanserve.engine.assembly import assemble
    from wanserve.engine.config import load_config
    from wanserve.engine.parallel.distributed import init_distributed, shutdown
    from wanserve.engine.parallel.sp_padding import WanServeTransformer
    from wanserve.engine.startup import resolve_model_path
    from wanserve.engine.cpu.vae_kernels import use_fast_cpu_kernels

    # the step cache off: this calls the transformer outside any request, where a step mask
    # (refreshed per request) would skip blocks and their projections
    cfg = load_config(["--model", "tiny", "--set", "cache.policy=off"])
    ctx = init_distributed(cfg.layout, cfg.collective_timeout_s)
    try:
        model_path = resolve_model_path(cfg)
        served = assemble(cfg, ctx, model_path)
        cached = served.pipe.transformer
        reference = WanServeTransformer.from_pretrained(model_path, subfolder="transformer")
        use_fast_cpu_kernels(reference)

        counts = {}

        def count(name):
            def hook(*_):
                counts[name] = counts.get(name, 0) + 1
            return hook

        for tag, model in (("cached", cached), ("reference", reference)):
            model.condition_embedder.text_embedder.linear_1.register_forward_hook(
                count(f"{tag}_text_embeddings"))
            for block in model.blocks:
                block.attn2.to_k.register_forward_hook(count(f"{tag}_kv_projections"))

        g = torch.Generator().manual_seed(0)
        config = cached.config
        text_dim = config.text_dim
        prompt = torch.randn(1, 512, text_dim, generator=g)
        negative = torch.randn(1, 512, text_dim, generator=g)
        diff = 0.0
        with torch.no_grad():
            for step in range(4):
                if step == 3:
                    prompt.mul_(0.5)  # same tensor, new contents: must not hit the cache
                latents = torch.randn(1, config.in_channels, 2, 16, 16, generator=g)
                timestep = torch.tensor([900.0 - 200 * step])
                for context in ((prompt, negative) if step < 3 else (prompt,)):
                    got = cached(latents, timestep, context, return_dict=False)[0]
                    want = reference(latents, timestep, context, return_dict=False)[0]
                    diff = max(diff, (got - want).abs().max().item())
        from wanserve.engine.cpu.cross_attention import CachedCrossAttnProcessor

        return {
            **counts, "max_abs_diff": diff, "blocks": len(cached.blocks),
            "cached_blocks": sum(isinstance(b.attn2.processor, CachedCrossAttnProcessor)
                                 for b in cached.blocks),
            "health": served.info["cpu_tuning"]["cross_attention_kv"],
        }
    finally:
        shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    print(json.dumps(_check()))
