"""What a bfloat16 VAE costs in PSNR against float32, on the CPU (`vae_dtype`).

    .venv/bin/python -u benchmarks/vae_dtype.py [--size 104x64] [--frames 9]

The published Wan2.1 VAE layout (random weights, the server's CPU kernels) encodes a smooth
moving scene in float32; the engine's decode (wanserve/engine/serving/generate.py
`decode_latents` with the frame collector) then turns the same latents into frames with the VAE
in float32 and in bfloat16. It prints each decode's seconds and the PSNR of the bfloat16 frames
against the float32 ones, and of the round trip (float32) against the scene.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.video_processor import VideoProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encode_while_decoding import smooth_scene  # noqa: E402

from wanserve.engine.cpu.vae_kernels import use_fast_cpu_kernels  # noqa: E402
from wanserve.engine.model.model_layouts import WAN21_VAE  # noqa: E402
from wanserve.engine.model.materialise import materialise  # noqa: E402
from wanserve.engine.serving.frames import frame_collector  # noqa: E402
from wanserve.engine.serving.generate import decode_latents  # noqa: E402


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1 / np.mean((a.astype(np.float64) - b) ** 2)))


def decode(vae, latents) -> tuple[np.ndarray, float]:
    pipe = SimpleNamespace(vae=vae, video_processor=VideoProcessor(vae_scale_factor=8))
    hook, chunks = frame_collector(pipe, None)
    start = time.perf_counter()
    decode_latents(pipe, latents, after_each_frame=hook)
    return np.concatenate(chunks), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="104x64")
    parser.add_argument("--frames", type=int, default=9)
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    vae = materialise(lambda: AutoencoderKLWan(**WAN21_VAE), torch.float32,
                      torch.device("cpu"), seed=2)
    half = copy.deepcopy(vae).to(torch.bfloat16)
    for module in (vae, half):
        use_fast_cpu_kernels(module)
    scene = smooth_scene(args.frames, height, width)
    with torch.no_grad():
        latents = vae.encode(scene).latent_dist.mode()
    shape = (1, vae.config.z_dim, 1, 1, 1)
    latents = ((latents - torch.tensor(vae.config.latents_mean).view(shape))
               / torch.tensor(vae.config.latents_std).view(shape))
    full, full_s = decode(vae, latents)
    bf16, bf16_s = decode(half, latents)
    reference = (scene[0].permute(1, 2, 3, 0).numpy() + 1) / 2
    print(f"Wan2.1 VAE layout, {width}x{height}x{args.frames}: decode float32 {full_s:.1f}s, "
          f"bfloat16 {bf16_s:.1f}s ({bf16_s / full_s:.2f}x); PSNR bfloat16 vs float32 "
          f"{psnr(bf16, full):.2f} dB; float32 round trip vs the scene {psnr(full, reference):.2f} dB")


if __name__ == "__main__":
    main()
