"""What diffusers' tiled VAE decode (`memory.vae_tiling`, `enable_tiling`) costs and saves.

    .venv/bin/python benchmarks/vae_tiling.py [--latent 64] [--latent-frames 5]

1. The tiny model's VAE (random weights) decodes the same seeded latents untiled and tiled, each
   in a fresh process: seconds, the rise of the resident high-water mark, and how far the tiled
   video is from the untiled one (max difference, PSNR on [-1, 1] frames).
2. Wan2.2-I2V-A14B's VAE (its published configuration) traced on fake tensors
   (wanserve/engine/model/fake_trace.py): the peak bytes of both decodes at 832x480, a model
   of the memory, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def child(tiled: bool, latent: int, latent_frames: int, out: Path) -> dict:
    from diffusers import AutoencoderKLWan

    from wanserve.engine.model.peak_memory import read_peak, reset_peak
    from wanserve.engine.model.tiny_model import ensure_tiny_model

    vae = AutoencoderKLWan.from_pretrained(ensure_tiny_model(), subfolder="vae").eval()
    if tiled:
        vae.enable_tiling()
    z = torch.randn(1, vae.config.z_dim, latent_frames, latent, latent,
                    generator=torch.Generator().manual_seed(0))
    host = torch.device("cpu")
    reset_peak(host)
    before = read_peak(host)[0]
    start = time.perf_counter()
    with torch.no_grad():
        video = vae.decode(z, return_dict=False)[0]
    seconds = time.perf_counter() - start
    torch.save(video, out)
    return {"seconds": seconds, "peak_rise_mib": read_peak(host)[0] - before}


def traced_a14b(width: int, height: int, latent_frames: int) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from wanserve.engine.model.fake_trace import fake_module, peak_bytes
    from wanserve.engine.model.memory_plan import build_vae
    from wanserve.engine.model.model_layouts import WAN22_I2V_A14B

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    vae = fake_module(lambda: build_vae(WAN22_I2V_A14B.vae, torch.float32), fake)
    peaks = {}
    for tiled in (False, True):
        if tiled:
            vae.enable_tiling()
        peaks["tiled" if tiled else "untiled"] = peak_bytes(
            lambda: vae.decode(torch.empty(1, 16, latent_frames, height // 8, width // 8),
                               return_dict=False), fake)[0]
    return peaks


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latent", type=int, default=64, help="latent side (x8 pixels)")
    p.add_argument("--latent-frames", type=int, default=5)
    p.add_argument("--child", choices=["untiled", "tiled"], help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child == "tiled", args.latent, args.latent_frames,
                               args.out)))
        return 0
    runs, videos = {}, {}
    for kind in ("untiled", "tiled"):
        out = Path(f"/tmp/wanserve-vae-{kind}.pt")
        proc = subprocess.run([sys.executable, __file__, "--child", kind, "--out", str(out),
                               "--latent", str(args.latent),
                               "--latent-frames", str(args.latent_frames)],
                              capture_output=True, text=True, cwd=REPO)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        runs[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
        videos[kind] = torch.load(out)
        out.unlink()
    diff = (videos["tiled"] - videos["untiled"]).abs()
    mse = float((diff ** 2).mean())
    psnr = 10 * torch.log10(torch.tensor(4.0 / mse)).item() if mse else float("inf")
    side, frames = args.latent * 8, videos["untiled"].shape[2]
    print(f"tiny VAE, {side}x{side}, {frames} frames (random weights):")
    for kind, run in runs.items():
        print(f"  {kind:<8} {run['seconds']:7.2f} s   peak rise {run['peak_rise_mib']:7.1f} MiB")
    print(f"  tiled vs untiled: max |diff| {float(diff.max()):.4f}, PSNR {psnr:.1f} dB")
    peaks = traced_a14b(832, 480, args.latent_frames)
    print(f"A14B VAE, 832x480, {frames} frames, traced on fake tensors (a model): untiled "
          f"{peaks['untiled'] / 2**30:.2f} GiB, tiled {peaks['tiled'] / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
