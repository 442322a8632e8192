"""What encoding the MP4 while the VAE decodes hides, on the published Wan2.1 VAE layout
(random weights, the layout Wan2.2-I2V-A14B decodes with).

    .venv/bin/python benchmarks/encode_while_decoding.py [--size 416x240] [--frames 41] [--rounds 2]

Per round, the same latents are decoded twice by the engine's own decode
(wanserve/engine/serving/generate.py `decode_latents` with the frame collector of
wanserve/engine/serving/frames.py):
- after: decode, then `encode_mp4` of the frames (the order before streaming);
- streamed: decode with a `StreamedMp4` sink (wanserve/api/mp4_stream.py), then `finish()`.
It prints decode, encode (the encoder's own seconds) and end-to-end seconds of each, the
overlap (end to end - decode - encode: negative is encode time hidden under the decode), the
share of the encode left after the decode, and checks that both give the same bytes. The
decode uses the CPU kernels the server's CPU tuning puts in (wanserve/engine/cpu/vae_kernels.py). Latents: a VAE encode of a smooth moving
scene, so that the frames are as hard to encode as a generated video's, not noise.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from diffusers import AutoencoderKLWan  # noqa: E402
from diffusers.video_processor import VideoProcessor  # noqa: E402

from wanserve.api.mp4_stream import StreamedMp4  # noqa: E402
from wanserve.api.video import encode_mp4  # noqa: E402
from wanserve.engine.cpu.vae_kernels import use_fast_cpu_kernels  # noqa: E402
from wanserve.engine.model.model_layouts import WAN21_VAE  # noqa: E402
from wanserve.engine.model.materialise import materialise  # noqa: E402
from wanserve.engine.serving.frames import frame_collector  # noqa: E402
from wanserve.engine.serving.generate import decode_latents  # noqa: E402


def smooth_scene(frames: int, height: int, width: int) -> torch.Tensor:
    """(1, 3, F, H, W) in [-1, 1]: gradients and a disc moving across."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width),
                            indexing="ij")
    video = torch.empty(1, 3, frames, height, width)
    for index in range(frames):
        phase = index / max(1, frames - 1)
        disc = ((xx - phase) ** 2 + (yy - 0.5) ** 2 < 0.02).float()
        video[0, :, index] = torch.stack([xx, yy * (1 - phase), disc]) * 2 - 1
    return video


def run(pipe, latents, fps: int, preset: str, stream: bool) -> dict:
    start = time.perf_counter()
    sink = StreamedMp4(fps, preset=preset) if stream else None
    hook, chunks = frame_collector(pipe, sink)
    decode_latents(pipe, latents, after_each_frame=hook)
    decoded = time.perf_counter()
    if stream:
        data, encode_s = sink.finish(), sink.encode_s
    else:
        data = encode_mp4(np.concatenate(chunks), fps, preset=preset)
        encode_s = time.perf_counter() - decoded
    end = time.perf_counter()
    return {"decode": decoded - start, "encode": encode_s, "e2e": end - start,
            "after_decode": end - decoded, "chunks": len(chunks), "bytes": data}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="416x240")
    parser.add_argument("--frames", type=int, default=41)
    parser.add_argument("--fps", type=int, default=16)
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    vae = materialise(lambda: AutoencoderKLWan(**WAN21_VAE), torch.float32,
                      torch.device("cpu"), seed=2)
    use_fast_cpu_kernels(vae)  # as the server's CPU tuning does
    pipe = SimpleNamespace(vae=vae, video_processor=VideoProcessor(vae_scale_factor=8))
    with torch.no_grad():
        latents = vae.encode(smooth_scene(args.frames, height, width)).latent_dist.mode()
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape)
    std = torch.tensor(vae.config.latents_std).view(shape)
    latents = (latents - mean) / std  # decode_latents undoes this
    print(f"Wan2.1 VAE layout, {width}x{height}x{args.frames}, libx264 {args.preset}, "
          f"torch threads {torch.get_num_threads()}")
    for round_ in range(args.rounds):
        after = run(pipe, latents, args.fps, args.preset, stream=False)
        streamed = run(pipe, latents, args.fps, args.preset, stream=True)
        for name, r in (("after", after), ("streamed", streamed)):
            overlap = r["e2e"] - r["decode"] - r["encode"]
            print(f"round {round_} {name:8s} decode {r['decode']:6.2f}s  encode {r['encode']:5.2f}s"
                  f"  end-to-end {r['e2e']:6.2f}s  after the decode {r['after_decode']:5.2f}s"
                  f"  overlap {overlap:+6.2f}s  ({r['chunks']} chunks)")
        hidden = (after["after_decode"] - streamed["after_decode"]) / after["encode"]
        print(f"round {round_} streamed/after end-to-end {streamed['e2e'] / after['e2e']:.3f}; "
              f"after-decode tail {streamed['after_decode'] / after['after_decode']:.3f}; "
              f"encode time hidden {hidden:.0%}; same bytes: "
              f"{streamed['bytes'] == after['bytes']}")


if __name__ == "__main__":
    main()
