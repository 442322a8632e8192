"""The step cache's presets against no cache, on the bench model (configs/bench-cpu.yaml).

    .venv/bin/python benchmarks/step_cache.py [--steps 40] [--size 256x256] [--frames 17]
        [--presets fast,balanced,quality] [--threads 2]

One `torchrun --nproc-per-node 1 -m wanserve.engine.serving.offline` runs a short warm-up request, then the same
request (same seed, image and prompt) with `cache: off` and with each preset, one after the
other. Prints per preset: the whole-request time and its ratio to off, the steps computed and
cached per expert (the job's own report), and PSNR / SSIM of the cached video against the
uncached one (float frames, before the MP4 encode).

The bench model has random weights: its videos are noise, so PSNR/SSIM here only say how far
the cached video moved from the uncached one (a sanity figure), never whether it looks right.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_bench_model import model_flags  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = REPO / ".venv" / "bin" / "torchrun"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM over frames of the luma (Wang et al. 2004: 11x11 Gaussian, sigma 1.5, data
    range 1)."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
    x = (torch.from_numpy(a).double() @ weights).unsqueeze(1)  # F, 1, H, W
    y = (torch.from_numpy(b).double() @ weights).unsqueeze(1)
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5 ** 2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :])[None, None]

    def blur(t):
        return torch.nn.functional.conv2d(t, window)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "bench-cpu.yaml")
    parser.add_argument("--model")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--presets", default="fast,balanced,quality")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the rank")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    presets = ["off", *[p for p in args.presets.split(",") if p]]
    base = {"width": width, "height": height, "num_frames": args.frames, "seed": 11,
            "num_inference_steps": args.steps}
    warmup = {**base, "num_inference_steps": 2, "cache": "off"}
    specs = [warmup, *[{**base, "cache": preset} for preset in presets]]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "reqs.json").write_text(json.dumps(specs))
        out = tmp / "out.npz"
        cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "1", "-m",
               "wanserve.engine.serving.offline", "--requests", str(tmp / "reqs.json"),
               "--out", str(out), "--config", str(args.config),
               *model_flags(args.config, args.model)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"wanserve.engine.serving.offline failed:\n{proc.stderr[-3000:]}")
        runs = json.loads(Path(f"{out}.json").read_text())["runs"]
        with np.load(out) as data:
            frames = {key: data[key] for key in data.files}
    reference, off_wall = frames["frames_1"], runs[1]["wall"]
    rows = []
    print(f"bench model, {width}x{height}, {args.frames} frames, {args.steps} steps, one rank, "
          f"OMP_NUM_THREADS={args.threads}")
    print(f"{'preset':<10} {'wall s':>8} {'x off':>6} {'computed h/l':>13} {'cached h/l':>11} "
          f"{'PSNR dB':>8} {'SSIM':>7}")
    for index, preset in enumerate(presets, start=1):
        run, video = runs[index], frames[f"frames_{index}"]
        cache = run["cache"] or {"computed": {}, "cached": {}}
        row = {"preset": preset, "wall_s": round(run["wall"], 2),
               "speedup": round(off_wall / run["wall"], 3),
               "computed": cache["computed"], "cached": cache["cached"],
               "psnr_db": round(psnr(video, reference), 2),
               "ssim": round(ssim(video, reference), 4)}
        rows.append(row)
        counts = lambda d: f"{d.get('high', '-')}/{d.get('low', '-')}"  # noqa: E731
        print(f"{preset:<10} {row['wall_s']:>8.2f} {row['speedup']:>6.2f} "
              f"{counts(row['computed']):>13} {counts(row['cached']):>11} "
              f"{row['psnr_db']:>8.2f} {row['ssim']:>7.4f}")
    print("random weights: PSNR/SSIM say how far the cached video moved from the uncached one, "
          "not whether it looks right")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
