"""Wan2.2-I2V-A14B transformer: seconds per forward / CFG step and MFU per attention backend.

    .venv/bin/python benchmarks/gpu_step.py [--shapes 480p,720p] [--layers 40] [--steps 5]
    .venv/bin/python benchmarks/gpu_step.py --device cpu --layers 1 --tokens 256 --heads 2  # smoke

One GPU, no download: diffusers' WanTransformer3DModel with the A14B expert's shape and random
bf16 weights (meta-initialised, then allocated on the device). For each attention backend
that imports here (torch SDPA always; flash-attn 2; flash-attn 3), set through diffusers'
`set_attention_backend`, it times forwards with CUDA events (warm-up, then the median of
--steps CFG steps of two forwards each, cond and uncond, back to back) and reports the model
FLOP utilisation against a bf16 matmul peak measured in the same run (8192^3, median of 10).
FLOPs are counted analytically (printed). --layers N < 40 runs a truncated model and scales
times by 40/N (embedding and head are a negligible share). --device cpu runs the same code as
a smoke test: its numbers say nothing about a GPU. A backend that fails (an out-of-memory, a
kernel refusing the shape, a flash-attn 3 without `return_attn_probs`) is recorded as a failed
row and the rest still run; the JSON is always written.

It times diffusers' own attention path, not the served one (xfuser's processor and USP, the
expert switch, the text encoder and VAE): a figure for the kernels, not for wanserve's requests.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

A14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36,
            out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
FULL_LAYERS = 40
TEXT_TOKENS = 512
# latent (frames, height, width) for 81 frames: VAE stride 4 in time, 8 in space
SHAPES = {"480p": (21, 60, 104), "720p": (21, 90, 160)}
FORMULA = "L * (8*S*d^2 + 4*S^2*d + 4*S*d^2 + 4*T*d^2 + 4*S*T*d + 4*S*d*F)"


def forward_flops(tokens: int, d: int, ffn: int, layers: int, text: int = TEXT_TOKENS) -> float:
    """Matmul FLOPs of one forward: self-attn projections and scores, cross-attn, FFN."""
    per_layer = (8 * tokens * d * d + 4 * tokens * tokens * d        # self-attn: qkvo, QK^T + PV
                 + 4 * tokens * d * d + 4 * text * d * d             # cross-attn: q,o; k,v on text
                 + 4 * tokens * text * d + 4 * tokens * d * ffn)     # cross scores + PV; FFN
    return float(layers * per_layer)


def available_backends(device: torch.device) -> list[tuple[str, str]]:
    """(label, diffusers backend name) for each backend this machine can run."""
    found = [("sdpa", "native")]
    if device.type == "cuda":
        if importlib.util.find_spec("flash_attn") is not None:
            found.append(("flash-attn-2", "flash"))
        if importlib.util.find_spec("flash_attn_interface") is not None:
            found.append(("flash-attn-3", "_flash_3"))
    return found


def build_model(config: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    with torch.device("meta"):  # no CPU init of 14B parameters
        model = WanTransformer3DModel(**config)
    # nn.Module.to, not diffusers' to(), which warns about the float32 modules restored below
    torch.nn.Module.to(model, dtype)
    model = model.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    # as from_pretrained(torch_dtype=bf16) leaves them: these stay float32
    keep = set(model._keep_in_fp32_modules or [])
    for name, module in model.named_modules():
        if keep & set(name.split(".")):
            module.float()
    # the rotary tables are computed in __init__, not loaded: to_empty left them garbage
    model.rope = WanRotaryPosEmbed(config["attention_head_dim"], config["patch_size"],
                                   config["rope_max_seq_len"]).to(device)
    return model.eval()


def time_calls(device: torch.device, calls: list[Callable[[], object]]) -> list[float]:
    """Seconds each call took, run back to back (CUDA events on a GPU)."""
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(len(calls) + 1)]
        events[0].record()
        for call, event in zip(calls, events[1:]):
            call()
            event.record()
        events[-1].synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:])]
    marks = [time.perf_counter()]
    for call in calls:
        call()
        marks.append(time.perf_counter())
    return [b - a for a, b in zip(marks, marks[1:])]


@torch.inference_mode()
def matmul_peak(device: torch.device, n: int, repeats: int = 10) -> float:
    """Achieved bf16 FLOP/s of an n^3 matmul: the median of `repeats` after warm-up."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    mm: Callable[[], object] = lambda: torch.matmul(a, b, out=out)  # noqa: E731
    time_calls(device, [mm] * 3)
    return 2 * n**3 / statistics.median(time_calls(device, [mm] * repeats))


def latent_for_tokens(tokens: int) -> tuple[int, int, int]:
    """A one-frame latent with exactly `tokens` patches, as square as the factors allow."""
    side = max(a for a in range(1, int(tokens**0.5) + 1) if tokens % a == 0)
    return 1, 2 * side, 2 * (tokens // side)


@torch.inference_mode()
def measure(model: torch.nn.Module, latent: tuple[int, int, int], device: torch.device,
            dtype: torch.dtype, warmup: int, steps: int) -> tuple[list[float], list[float]]:
    frames, height, width = latent
    x = torch.randn(1, A14B["in_channels"], frames, height, width, device=device, dtype=dtype)
    t = torch.tensor([500.0], device=device)
    cond, uncond = (torch.randn(1, TEXT_TOKENS, A14B["text_dim"], device=device, dtype=dtype)
                    for _ in range(2))
    call = lambda ctx: (lambda: model(x, t, ctx, return_dict=False))  # noqa: E731
    for _ in range(warmup):
        call(cond)()
    forwards, cfg_steps = [], []
    for _ in range(steps):
        a, b = time_calls(device, [call(cond), call(uncond)])
        forwards += [a, b]
        cfg_steps.append(a + b)
    return forwards, cfg_steps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="480p,720p", help=f"any of {', '.join(SHAPES)}")
    p.add_argument("--tokens", type=int, help="instead of --shapes: one shape of N tokens")
    p.add_argument("--layers", type=int, default=FULL_LAYERS, help="truncate; scaled to 40")
    p.add_argument("--heads", type=int, default=40,
                   help="smoke only: fewer heads of 128 (ffn scales with them)")
    p.add_argument("--steps", type=int, default=5, help="timed CFG steps (2 forwards each)")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards per backend")
    p.add_argument("--peak-n", type=int, help="matmul size for the peak (8192; 1024 on CPU)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=Path("bench-out/gpu_step.json"))
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no GPU available (torch.cuda.is_available() is False): nothing was measured")
        return 0
    smoke = device.type != "cuda"
    label = "CPU SMOKE (not GPU numbers)" if smoke else torch.cuda.get_device_name(device)
    dtype = torch.bfloat16
    config = {**A14B, "num_layers": args.layers, "num_attention_heads": args.heads,
              "ffn_dim": round(A14B["ffn_dim"] * args.heads / 40)}
    d, ffn = args.heads * A14B["attention_head_dim"], config["ffn_dim"]
    scale = FULL_LAYERS / args.layers
    shapes = ({f"{args.tokens}tok": latent_for_tokens(args.tokens)} if args.tokens else
              {name: SHAPES[name] for name in args.shapes.split(",")})

    print(f"[{label}] torch {torch.__version__}; d={d} ({args.heads} heads x 128), ffn={ffn}, "
          f"text tokens {TEXT_TOKENS}; {args.layers} layer(s)"
          + (f", times scaled x{scale:g} to {FULL_LAYERS} layers" if scale != 1 else ""))
    peak_n = args.peak_n or (1024 if smoke else 8192)
    peak = matmul_peak(device, peak_n)
    print(f"bf16 matmul peak ({peak_n}^3, median of 10): {peak / 1e12:.1f} TFLOP/s")
    model = build_model(config, device, dtype)
    print(f"built: {sum(p.numel() for p in model.parameters()) / 1e6:,.1f}M parameters")
    print(f"FLOPs per forward = {FORMULA}\n  with L={FULL_LAYERS}, d={d}, F={ffn}, T={TEXT_TOKENS}")

    rows = []
    for shape, latent in shapes.items():
        f, h, w = latent
        tokens = f * (h // 2) * (w // 2)
        flops = forward_flops(tokens, d, ffn, FULL_LAYERS)
        print(f"{shape}: latent {f}x{h}x{w} -> S={tokens} tokens, "
              f"{flops:.4e} FLOP per forward")
        for name, backend in available_backends(device):
            try:
                model.set_attention_backend(backend)
            except Exception as exc:  # a backend diffusers cannot bind here
                print(f"  {name}: skipped ({exc})")
                rows.append({"shape": shape, "tokens": tokens, "backend": name,
                             "error": f"skipped: {type(exc).__name__}: {str(exc)[:200]}"})
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                fwd, cfg = measure(model, latent, device, dtype, args.warmup, args.steps)
            except Exception as exc:  # OOM, a kernel refusing the shape, an FA3 without
                # return_attn_probs (TypeError): one row fails, the others still run
                print(f"  {name}: failed ({type(exc).__name__}: {str(exc)[:200]})")
                rows.append({"shape": shape, "tokens": tokens, "backend": name,
                             "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                continue
            s_fwd, s_cfg = statistics.median(fwd) * scale, statistics.median(cfg) * scale
            rows.append({"shape": shape, "tokens": tokens, "backend": name, "s_forward": s_fwd,
                         "s_cfg_step": s_cfg, "tflops": flops / s_fwd / 1e12,
                         "mfu": flops / s_fwd / peak, "forward_flops": flops,
                         "peak_mem_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                                          if device.type == "cuda" else None)})
            print(f"  {name}: {s_fwd:.4f} s/forward", flush=True)

    print(f"\n[{label}]" + (f" scaled from {args.layers} layer(s)" if scale != 1 else ""))
    print(f"{'shape':<8}{'tokens':>7}  {'backend':<14}{'s/forward':>10}{'s/CFG step':>11}"
          f"{'TFLOP/s':>9}{'MFU':>7}{'mem GiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<8}{r['tokens']:>7}  {r['backend']:<14}{r['error'][:60]}")
            continue
        mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        print(f"{r['shape']:<8}{r['tokens']:>7}  {r['backend']:<14}{r['s_forward']:>10.4f}"
              f"{r['s_cfg_step']:>11.4f}{r['tflops']:>9.2f}{r['mfu']:>7.1%}{mem:>9}")
    print(f"MFU against the measured bf16 matmul peak, {peak / 1e12:.1f} TFLOP/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": label, "smoke": smoke, "layers_run": args.layers,
                                    "time_scale": scale, "config": config, "formula": FORMULA,
                                    "matmul_peak_flops": peak, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
