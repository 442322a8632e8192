"""libx264 presets for `quality: high` (server.mp4_preset), measured at a served size.

    .venv/bin/python benchmarks/mp4_presets.py [--size 832x480] [--frames 81]

For each of ultrafast, veryfast, fast and medium, on a smooth synthetic scene (gradients, a
moving disc and slow texture: what a generated video is like) and on uniform noise (the worst
case), it encodes the float frames with wanserve/api/video.py `encode_mp4` (crf 18, mbtree off,
yuv420p, as served) and prints the encode seconds, the file's bytes and the PSNR of the decoded
frames against the float frames, with each preset's time and size as a ratio to medium's.
"""
from __future__ import annotations

import argparse
import io
import time

import av
import numpy as np

from wanserve.api.video import encode_mp4

PRESETS = ("ultrafast", "veryfast", "fast", "medium")


def smooth_scene(frames: int, height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy, xx = yy / height, xx / width
    video = np.empty((frames, height, width, 3), np.float32)
    for index in range(frames):
        phase = index / max(1, frames - 1)
        disc = ((xx - phase) ** 2 + (yy - 0.5) ** 2 < 0.02).astype(np.float32)
        texture = 0.05 * np.sin(40 * xx + 6 * phase) * np.cos(30 * yy - 4 * phase)
        video[index] = np.stack([xx + texture, yy * (1 - phase) + texture, disc], axis=-1)
    return np.clip(video, 0, 1)


def noise(frames: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(0).random((frames, height, width, 3), dtype=np.float32)


def psnr(data: bytes, reference: np.ndarray) -> float:
    with av.open(io.BytesIO(data)) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    error = np.mean((decoded.astype(np.float64) / 255 - reference) ** 2)
    return float(10 * np.log10(1 / error))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="832x480")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--fps", type=int, default=16)
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    print(f"{width}x{height}x{args.frames}, crf 18, yuv420p")
    print("| scene | preset | encode s | bytes | PSNR dB | time / medium | bytes / medium |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, make in (("smooth", smooth_scene), ("noise", noise)):
        frames = make(args.frames, height, width)
        rows = {}
        for preset in PRESETS:
            start = time.perf_counter()
            data = encode_mp4(frames, args.fps, preset=preset)
            rows[preset] = (time.perf_counter() - start, len(data), psnr(data, frames))
        base_s, base_bytes, _ = rows["medium"]
        for preset, (seconds, size, db) in rows.items():
            print(f"| {name} | {preset} | {seconds:.2f} | {size:,} | {db:.2f} | "
                  f"{seconds / base_s:.2f} | {size / base_bytes:.2f} |")


if __name__ == "__main__":
    main()
