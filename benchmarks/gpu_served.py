"""Wan2.2-I2V-A14B at full size on a GPU, through the served path: s/step per attention backend,
encode and decode times, peak memory per rank and MFU, in one run of at most --budget-s.

    .venv/bin/python benchmarks/gpu_served.py [--budget-s 480] [--out bench-out/gpu_served.json]
    .venv/bin/python benchmarks/gpu_served.py --smoke    # CPU, cut size: the code, no GPU figure

1. The bf16 matmul peak (8192^3, median of 10) measured in this process on the device.
2. The attention backends found: each of flash-attn 3, cuDNN, flash-attn 2 and torch SDPA that
   wanserve.kernels.attention.select_backend would run here (the others are listed with the reason).
3. Per backend, one server: ./launch.sh --config configs/wan2.2-i2v-a14b-480p.yaml --model
   random:wan2.2-i2v-a14b --attention-backend NAME. The weights are random bf16, built on the
   GPU (no checkpoint, no disk), through the real assembly, xfuser's pipeline and the HTTP
   server. Over HTTP, one 832x480 x 81-frame request with 4 steps at guidance 1 (the distilled
   settings: one forward per step) and, on the first backend, one with 40 steps at guidance 3.5
   (the official settings: two forwards per step).
4. Per request: s/step (the job's step_mean), text encode, VAE encode and decode, MP4, the job's
   peak memory; per rank the peak GPU memory seen by nvidia-smi and, from /health, the peak
   host and device memory while loading. MFU = forwards per step x FLOPs per forward (counted
   analytically, printed) / s per step / (ranks x the matmul peak).

A request predicted (from the s/step already measured) to overrun the budget is skipped and
recorded as skipped; the JSON is always written. BENCHMARKS.md gets a section only from a GPU
run. --smoke runs the same code on the CPU with the layers cut to 1 (every width published) and
a tiny request: it proves the script, never a GPU figure.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency_scaling import GpuMemoryPoller  # noqa: E402
from serving_overhead import bench_server, input_png  # noqa: E402  (the suite's harness)
from conftest import rank_pids  # noqa: E402  (on the path through serving_overhead)

from wanserve.engine.model.model_layouts import WAN22_I2V_A14B  # noqa: E402

PRESET = REPO / "configs" / "wan2.2-i2v-a14b-480p.yaml"
BACKENDS_ON_CUDA = ("flash-attn-3", "cudnn", "flash-attn-2", "sdpa")
TEXT_TOKENS = 512
FORMULA = "L * (8*S*d^2 + 4*S^2*d + 4*S*d^2 + 4*T*d^2 + 4*S*T*d + 4*S*d*F)"
PROMPT = "a lighthouse in a storm"


def forward_flops(tokens: int, d: int, ffn: int, layers: int, text: int = TEXT_TOKENS) -> float:
    """Matmul FLOPs of one transformer forward: self-attn projections and scores, cross-attn
    (q, o on the video tokens; k, v on the text), FFN."""
    per_layer = (8 * tokens * d * d + 4 * tokens * tokens * d
                 + 4 * tokens * d * d + 4 * text * d * d
                 + 4 * tokens * text * d + 4 * tokens * d * ffn)
    return float(layers * per_layer)


def video_tokens(width: int, height: int, frames: int) -> int:
    """Transformer tokens: VAE 4x in time (first frame alone), 8x in space, patch 1x2x2."""
    return ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)


def matmul_peak(device, n: int, repeats: int = 10) -> float:
    """Achieved bf16 FLOP/s of an n^3 matmul on `device`: the median of `repeats` after warm-up."""
    import torch

    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    times = []
    for i in range(repeats + 3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    del a, b, out
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * n**3 / statistics.median(times)


def backends_found(device) -> tuple[list[str], dict]:
    """The backends select_backend would run here in bf16, and why each other one would not."""
    import torch

    from wanserve.kernels.attention import select_backend

    if device.type != "cuda":
        return ["cpu-flash"], {}
    usable, refused = [], {}
    for name in BACKENDS_ON_CUDA:
        try:
            select_backend(device, torch.bfloat16, 1, require=name)
            usable.append(name)
        except ValueError as exc:
            refused[name] = str(exc)
    auto = select_backend(device, torch.bfloat16, 1).name  # the server's own choice first
    return sorted(usable, key=lambda name: name != auto), refused


def post(url: str, form: dict, png: bytes) -> tuple[dict, float]:
    start = time.perf_counter()
    response = requests.post(url + "/v1/videos", data=form, timeout=3600,
                             files={"input_reference": ("input.png", png, "image/png")})
    body = response.json()
    if response.status_code != 200:
        raise RuntimeError(f"POST /v1/videos: {response.status_code} {body}")
    body["data"][0]["b64_json"] = f"<{len(base64.b64decode(body['data'][0]['b64_json']))} bytes>"
    return body, time.perf_counter() - start


def run_backend(name: str, args, plan: list[dict], png: bytes, deadline: float,
                flops_per_forward: float, peak: float, gpu: bool) -> dict:
    row = {"backend": name, "requests": []}
    flags = ["--config", str(PRESET), "--model", args.model, "--attention-backend", name,
             *args.server_flags]
    log = args.out.with_suffix(f".{name}.server.log").resolve()
    start = time.perf_counter()
    poller = GpuMemoryPoller() if gpu and shutil.which("nvidia-smi") else None
    with bench_server(log, *flags, nproc=args.nproc) as server, \
            (poller or contextlib.nullcontext()):
        row["ready_s"] = time.perf_counter() - start
        health = requests.get(server.url + "/health", timeout=30).json()
        row["attention_backend"] = health.get("attention_backend")
        row["attention_reason"] = health.get("attention_reason")
        row["load"] = health.get("load")
        pids = rank_pids(server.proc.pid)
        for request in plan:
            s_step = row["requests"][-1]["s_step"] if row["requests"] else args.step_guess_s
            predicted = request["steps"] * s_step * request["forwards"] + args.fixed_guess_s
            if time.monotonic() + predicted > deadline:
                row["requests"].append({**request, "skipped": f"predicted {predicted:.0f}s, "
                                        f"{deadline - time.monotonic():.0f}s left"})
                continue
            form = {"prompt": PROMPT, "size": f"{args.width}x{args.height}",
                    "num_frames": str(args.frames), "num_inference_steps": str(request["steps"]),
                    "guidance_scale": str(request["guidance"]), "seed": "0"}
            body, e2e = post(server.url, form, png)
            s_step = body["timings"]["step_mean"]
            flops = request["forwards"] * flops_per_forward
            row["requests"].append({
                **request, "e2e_s": e2e, "s_step": s_step / request["forwards"],
                "s_per_denoising_step": s_step, "stage_durations": body["stage_durations"],
                "job_peak_memory_mb": body.get("peak_memory_mb"),
                "job_peak_memory_kind": body.get("peak_memory_kind"),
                "tflops_per_rank": flops / s_step / args.nproc / 1e12,
                "mfu": flops / s_step / (args.nproc * peak)})
            print(f"  {name}: {request['steps']} steps, {s_step:.3f} s/step, e2e {e2e:.1f}s",
                  flush=True)
    if poller is not None:
        row["gpu_peak_mib_per_rank"] = {rank: poller.peak.get(pid) for rank, pid in pids.items()}
    return row


def markdown(result: dict) -> str:
    lines = [f"### Served path on {result['device']} ({result['date']}, commit {result['commit']})",
             "",
             "```bash", result["command"], "```", "",
             f"{result['shape']}; matmul peak {result['matmul_peak_tflops']:.0f} TFLOP/s "
             f"(bf16 {result['peak_n']}^3, this run); FLOPs/forward "
             f"{result['flops_per_forward']:.3e} ({FORMULA}).", "",
             "| backend | steps | guidance | s/step | text encode | VAE encode | VAE decode | "
             "MP4 | MFU | job peak (MiB) | load peak device/host per rank (MiB) | "
             "nvidia-smi peak per rank (MiB) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        load = " ; ".join(f"{r.get('device_mib')}/{r.get('host_mib')}"
                          for r in (row.get("load") or {}).get("peak_memory_per_rank", []))
        smi = " ; ".join(f"{v}" for v in (row.get("gpu_peak_mib_per_rank") or {}).values())
        for r in row["requests"]:
            if "skipped" in r:
                lines.append(f"| {row['backend']} | {r['steps']} | {r['guidance']} | skipped: "
                             f"{r['skipped']} | | | | | | | | |")
                continue
            s = r["stage_durations"]
            lines.append(
                f"| {row['backend']} | {r['steps']} | {r['guidance']} | "
                f"{r['s_per_denoising_step']:.3f} | {s.get('text_encode', 0):.2f} | "
                f"{s.get('image_encode', 0):.2f} | {s.get('vae_decode', 0):.2f} | "
                f"{s.get('mp4_encode', 0):.2f} | {r['mfu']:.1%} | "
                f"{r['job_peak_memory_mb'] or 0:.0f} | {load} | {smi or '-'} |")
    for row in result["rows"]:
        if "skipped" in row or "error" in row:
            lines.append(f"| {row['backend']} | not run: {row.get('skipped') or row['error']} "
                         "| | | | | | | | | | |")
    for name, why in result["refused"].items():
        lines.append(f"| {name} | not run: {why} | | | | | | | | | | |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:wan2.2-i2v-a14b")
    p.add_argument("--size", default="832x480")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--steps", default="4,40", help="the short and the long request")
    p.add_argument("--nproc", type=int, default=1, help="ranks (pass --ulysses N etc. after --)")
    p.add_argument("--budget-s", type=float, default=480.0)
    p.add_argument("--step-guess-s", type=float, default=4.0,
                   help="s/forward before one is measured")
    p.add_argument("--fixed-guess-s", type=float, default=60.0, help="encode + decode + MP4 guess")
    p.add_argument("--peak-n", type=int)
    p.add_argument("--smoke", action="store_true", help="CPU, layers cut to 1, a tiny request")
    p.add_argument("--benchmarks-md", type=Path, default=REPO / "BENCHMARKS.md")
    p.add_argument("--out", type=Path, default=Path("bench-out/gpu_served.json"))
    p.add_argument("server_flags", nargs="*", help="more server flags, after --")
    args = p.parse_args()
    deadline = time.monotonic() + args.budget_s
    import torch

    gpu = torch.cuda.is_available() and not args.smoke
    if not gpu and not args.smoke:
        print("no GPU available (torch.cuda.is_available() is False): nothing was measured")
        return 0
    if args.smoke:
        args.model = f"{args.model.partition('?')[0]}?layers=1"
        if args.size == "832x480":
            args.size, args.frames, args.steps = "64x64", 1, "1,2"
        args.server_flags += ["--set", f"limits.min_side={min(map(int, args.size.split('x')))}"]
    device = torch.device("cuda" if gpu else "cpu")
    args.width, args.height = (int(v) for v in args.size.lower().split("x"))
    short, long = (int(v) for v in args.steps.split(","))
    label = torch.cuda.get_device_name(device) if gpu else "CPU SMOKE (not GPU numbers)"
    layout = WAN22_I2V_A14B.cut(1 if args.smoke else None)
    t = layout.transformer
    d = t["num_attention_heads"] * t["attention_head_dim"]
    tokens = video_tokens(args.width, args.height, args.frames)
    flops = forward_flops(tokens, d, t["ffn_dim"], t["num_layers"])
    peak_n = args.peak_n or (8192 if gpu else 1024)
    peak = matmul_peak(device, peak_n)
    backends, refused = backends_found(device)
    print(f"[{label}] {args.model}: {args.size} x {args.frames} frames = {tokens} tokens, "
          f"{flops:.4e} FLOP/forward; matmul peak {peak / 1e12:.1f} TFLOP/s; backends "
          f"{backends}, refused {list(refused)}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = input_png(args.width, args.height, 0)
    rows = []
    for index, name in enumerate(backends):
        if rows and rows[0].get("requests"):  # a server start and the short request must fit
            first = rows[0]
            needed = first["ready_s"] + first["requests"][0].get("e2e_s", args.fixed_guess_s)
            if time.monotonic() + needed > deadline:
                rows.append({"backend": name, "requests": [], "skipped": f"needs ~{needed:.0f}s, "
                             f"{deadline - time.monotonic():.0f}s left"})
                continue
        plan = [{"steps": short, "guidance": 1.0, "forwards": 1}]
        if index == 0:
            plan.append({"steps": long, "guidance": 3.5, "forwards": 2})
        try:
            rows.append(run_backend(name, args, plan, png, deadline, flops, peak, gpu))
        except (RuntimeError, SystemExit) as exc:  # a server that failed: one row, the rest run
            rows.append({"backend": name, "requests": [], "error": str(exc)[:500]})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip() or "unknown"
    result = {"device": label, "smoke": not gpu, "date": datetime.date.today().isoformat(),
              "commit": commit,
              "command": "python benchmarks/gpu_served.py " + " ".join(sys.argv[1:]),
              "model": args.model, "shape": f"{args.size} x {args.frames} frames, {tokens} tokens",
              "torch": torch.__version__, "matmul_peak_tflops": peak / 1e12, "peak_n": peak_n,
              "flops_per_forward": flops, "formula": FORMULA, "nproc": args.nproc,
              "rows": rows, "refused": refused}
    args.out.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    print(f"wrote {args.out}")
    if gpu:
        with open(args.benchmarks_md, "a") as f:
            f.write("\n" + markdown(result))
        print(f"appended to {args.benchmarks_md}")
    else:
        print(f"CPU smoke: {args.benchmarks_md} untouched")
    return 0 if all("error" not in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
