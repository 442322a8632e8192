"""The CPU test vehicle: what makes multi-rank runs fast on a machine without a GPU.

wanserve is a GPU server that CI and a first try run on CPUs. Everything in this package exists
only for that: nothing outside it imports its modules, and the assembly calls `tune` once, on
CPU ranks only. Without that call a CPU server is still correct, only slower
(tests/test_multirank_equivalence.py runs a multi-rank case with `cpu.tuning: false`).

Each measure was kept for a gain measured on and off (BENCHMARKS.md, "The CPU test vehicle"):

- `memory`: malloc keeps the memory a request frees (no page faults for each step's
  temporaries);
- `vae_kernels`: oneDNN convolutions and a cheaper RMS norm for the Wan VAE;
- `cross_attention`: the text keys and values once per prompt, not once per step;
- `sharded_conv`, `vae_attention`: the row-sharded VAE's halos overlapped with each band's
  convolution, its mid-block attention split by rows;
- `shm_exchange`, `shm_transport`: ranks on one host exchange through /dev/shm, not gloo.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger("wanserve.engine")


def tune(pipe, settings, ctx, vae_group, blocks_compiled: bool = False
         ) -> tuple[dict, Callable[[], None] | None]:
    """Apply every CPU measure `settings` (wanserve.engine.config.CpuSettings) allows to the assembled
    pipeline on this rank. A collective when shared memory is on: every rank calls it at the
    same point. Returns what it did (for /health) and what every rank must run after each job
    (None: nothing). With `blocks_compiled` nothing runs inside the transformer blocks (the
    cross-attention memo, the attention's shared-memory exchanges): dynamo would trace that
    Python into the compiled blocks and recompile whenever its state changes."""
    if not settings.tuning:
        return {"tuning": "off"}, None
    from wanserve.engine.cpu import cross_attention, memory, vae_kernels

    report = {"allocator": "freed memory kept in the process"
              if settings.keep_freed_memory and memory.keep_freed_memory() else "system default"}
    rebound = sum(vae_kernels.use_fast_cpu_kernels(component)
                  for component in pipe.components.values()
                  if isinstance(component, torch.nn.Module))
    report["vae_kernels"] = f"oneDNN ({rebound} layers)" if rebound else "torch's defaults"
    cached = [cross_attention.cache_cross_attention(expert)
              for expert in (pipe.transformer, pipe.transformer_2)
              if expert is not None and not blocks_compiled]
    report["cross_attention_kv"] = ("computed once per prompt" if any(cached)
                                    else "recomputed each step")
    if vae_group is not None:
        from wanserve.engine.cpu import sharded_conv, vae_attention

        vae_kernels.use_onednn_in_distvae()
        sharded_conv.use_overlapped_halos(pipe.vae)
        vae_attention.shard_vae_attention(pipe.vae)
        report["sharded_vae"] = "halos overlapped, mid-block attention split by rows"
    after_job = None
    if ctx.replica_size > 1 and settings.shared_memory:
        from wanserve.engine.cpu import shm_transport

        routed = shm_transport.enable(ctx.collective_timeout_s,
                                      {**shm_transport.xfuser_groups(), "vae": vae_group},
                                      attention_exchanges=not blocks_compiled)
        report["shared_memory"] = ", ".join(routed) if routed else "none (gloo for all)"
        if routed and blocks_compiled:
            report["shared_memory"] += " (the attention's exchanges on gloo: blocks compiled)"
        if routed:
            after_job = lambda: shm_transport.resync(ctx.step_group)  # noqa: E731
    return report, after_job
