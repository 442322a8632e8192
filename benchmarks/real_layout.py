"""The published Wan2.2 layouts, proven: written as a checkpoint, served through the real preset.

    .venv/bin/python benchmarks/real_layout.py [--model wan2.2-i2v-a14b] [--layers 1]
        [--size 128x128 --frames 5 --steps 2] [--out bench-out/real_layout.json]
    .venv/bin/python benchmarks/real_layout.py --model wan2.2-ti2v-5b [--write-only]

1. Write (once; cached under ~/.cache/wanserve) a diffusers-format checkpoint with the exact
   published configurations of wanserve/engine/model/model_layouts.py: the transformer(s), the VAE, the UMT5
   text encoder, the tokenizer class, the scheduler, model_index. Only the layer counts are cut
   (--layers N: N blocks per expert, N text-encoder layers); the weights are random bf16 (the
   VAE float32, as published), the tokenizer's vocabulary a stand-in. Every config.json is then
   read back and compared with the published values.
2. Serve it through the model's preset (`./launch.sh --config PRESET --model DIR`; the preset's
   smallest side lowered by --set so a CPU-sized request is allowed) three times: one rank in
   bf16, Ulysses 2 in bf16, one rank in float32. One synchronous request each over HTTP (same
   prompt, image and seed; quality=lossless, so the decoded frames are exactly the engine's).
   Recorded: the job's stage_durations and step_mean, its peak memory, and from /health every
   rank's peak host memory while loading.
3. Compare the frames (0-255): U2 against one rank in bf16, and bf16 against float32 on one
   rank. Verdict: sequence parallelism adds no more error than the dtype does.

TI2V-5B's request carries the image too (its image-to-video path: the image replaces the first
latent frame, per-token timesteps).
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_overhead import bench_server, input_png  # noqa: E402  (the suite's harness)

from wanserve.engine.model.model_layouts import LAYOUTS, ModelLayout  # noqa: E402

PROMPT = "a lighthouse in a storm"
RUNS = (("1 rank, bf16", 1, ["--dtype", "bfloat16"]),
        ("U2, bf16", 2, ["--dtype", "bfloat16", "--ulysses", "2"]),
        ("1 rank, float32", 1, ["--dtype", "float32"]))
CONFIGS = {"transformer": "transformer/config.json", "vae": "vae/config.json",
           "text_encoder": "text_encoder/config.json",
           "scheduler": "scheduler/scheduler_config.json"}


def checkpoint_dir(layout: ModelLayout) -> Path:
    from wanserve.engine.model.materialise import WEIGHTS_VERSION
    from wanserve.engine.model.tiny_model import default_cache_dir

    data = json.dumps([dataclasses.asdict(layout), WEIGHTS_VERSION], sort_keys=True, default=str)
    digest = hashlib.sha256(data.encode()).hexdigest()[:12]
    return default_cache_dir() / f"real-{layout.name}-L{layout.layers['transformer']}-{digest}"


def write_checkpoint(layout: ModelLayout, target: Path) -> None:
    """Every component with random weights, saved as the published checkpoint lays them out."""
    import diffusers
    import torch

    from wanserve.engine.model.random_weights import build_components

    parts = build_components(layout, torch.bfloat16, torch.device("cpu"), keep_in_fp32=False)
    pipe = getattr(diffusers, layout.pipeline)(**parts, **layout.pipeline_config)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".real-build-", dir=target.parent))
    try:
        pipe.save_pretrained(staging)
        index_path = staging / "model_index.json"
        index = json.loads(index_path.read_text())
        # transformers 5 names its T5 tokenizer class T5Tokenizer; the checkpoints say ...Fast
        index["tokenizer"] = ["transformers", layout.tokenizer["class_name"]]
        index_path.write_text(json.dumps(index, indent=2))
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def config_mismatches(layout: ModelLayout, folder: Path) -> list[str]:
    """Each published value that the written checkpoint's configs do not hold."""
    def norm(value):
        return list(value) if isinstance(value, tuple) else value

    wrong = []
    expected = {"transformer": layout.transformer, "vae": layout.vae,
                "text_encoder": layout.text_encoder, "scheduler": layout.scheduler}
    for name, values in expected.items():
        written = json.loads((folder / CONFIGS[name]).read_text())
        if name == "text_encoder":
            # transformers 5 always ties the input embeddings of the T5 family and keeps the
            # published `tie_word_embeddings: false` as `scale_decoder_outputs: false`
            values = dict(values)
            written["tie_word_embeddings"] = written.get("scale_decoder_outputs")
        wrong += [f"{name}.{key}: {written.get(key)!r} != {value!r}"
                  for key, value in values.items() if norm(written.get(key)) != norm(value)]
    for expert in layout.experts[1:]:
        if json.loads((folder / expert / "config.json").read_text()) != json.loads(
                (folder / CONFIGS["transformer"]).read_text()):
            wrong.append(f"{expert}: config differs from transformer's")
    index = json.loads((folder / "model_index.json").read_text())
    wants = {"_class_name": layout.pipeline,
             "tokenizer": ["transformers", layout.tokenizer["class_name"]],
             "text_encoder": ["transformers", "UMT5EncoderModel"],
             "vae": ["diffusers", "AutoencoderKLWan"],
             "scheduler": ["diffusers", "UniPCMultistepScheduler"], **layout.pipeline_config}
    wants.update({expert: ["diffusers", "WanTransformer3DModel"] for expert in layout.experts})
    wrong += [f"model_index.{key}: {index.get(key)!r} != {value!r}" for key, value in wants.items()
              if index.get(key) != value]
    tokenizer = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())
    if tokenizer.get("extra_ids") != layout.tokenizer["extra_ids"]:
        wrong.append(f"tokenizer.extra_ids: {tokenizer.get('extra_ids')!r}")
    return wrong


def decoded_frames(mp4: bytes) -> np.ndarray:
    import av

    with av.open(io.BytesIO(mp4)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def serve_once(label: str, nproc: int, flags: list[str], folder: Path, layout: ModelLayout,
               args: argparse.Namespace, png: bytes, log: Path) -> dict:
    form = {"prompt": PROMPT, "size": args.size, "num_frames": str(args.frames),
            "num_inference_steps": str(args.steps), "seed": str(args.seed),
            "guidance_scale": str(args.guidance), "quality": "lossless"}
    min_side = min(int(v) for v in args.size.lower().split("x"))
    start = time.perf_counter()
    with bench_server(log, "--config", str(REPO / layout.preset), "--model", str(folder),
                      "--set", f"limits.min_side={min_side}", *flags, nproc=nproc) as server:
        ready_s = time.perf_counter() - start
        health = requests.get(server.url + "/health", timeout=30).json()
        posted = time.perf_counter()
        response = requests.post(server.url + "/v1/videos", data=form, timeout=3600,
                                 files={"input_reference": ("input.png", png, "image/png")})
        e2e = time.perf_counter() - posted
        body = response.json()
        if response.status_code != 200:
            raise SystemExit(f"{label}: POST /v1/videos: {response.status_code} {body}")
    frames = decoded_frames(base64.b64decode(body["data"][0]["b64_json"]))
    load = health["load"]
    print(f"  {label}: ready {ready_s:.1f}s, request {e2e:.1f}s, frames {frames.shape}", flush=True)
    return {"label": label, "ranks": nproc, "flags": flags, "ready_s": ready_s, "e2e_s": e2e,
            "stage_durations": body["stage_durations"],
            "step_mean": body["timings"].get("step_mean"),
            "job_peak_memory_mb": body.get("peak_memory_mb"),
            "job_peak_memory_kind": body.get("peak_memory_kind"),
            "load_s": load.get("seconds"),
            "load_peak_host_mib_per_rank": [r.get("host_mib")
                                            for r in load["peak_memory_per_rank"]],
            "attention_backend": health.get("attention_backend"), "frames": frames}


def frame_error(a: np.ndarray, b: np.ndarray) -> dict:
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"max": int(diff.max()), "mean": float(diff.mean()),
            "share_differing": float((diff > 0).mean())}


def report(layout: ModelLayout, runs: list[dict], sp: dict, dtype: dict, disk_mib: float) -> str:
    lines = ["| run | ready (s) | request (s) | text encode | image encode | denoise | "
             "s/step | VAE decode | MP4 | job peak (MiB) | load peak host per rank (MiB) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        s = r["stage_durations"]
        cells = [s.get(k) for k in ("text_encode", "image_encode", "denoise")] + [
            r["step_mean"], s.get("vae_decode"), s.get("mp4_encode")]
        lines.append(f"| {r['label']} | {r['ready_s']:.1f} | {r['e2e_s']:.1f} | " + " | ".join(
            "-" if v is None else f"{v:.2f}" for v in cells)
            + f" | {r['job_peak_memory_mb']:.0f} | "
            + " / ".join(f"{v:.0f}" for v in r["load_peak_host_mib_per_rank"]) + " |")
    verdict = "PASS" if sp["mean"] <= dtype["mean"] and sp["max"] <= dtype["max"] else "FAIL"
    lines += ["", f"checkpoint on disk: {disk_mib:.0f} MiB",
              f"U2 vs one rank (bf16): max {sp['max']}, mean {sp['mean']:.3f}, "
              f"{sp['share_differing']:.1%} of values differ",
              f"bf16 vs float32 (one rank): max {dtype['max']}, mean {dtype['mean']:.3f}, "
              f"{dtype['share_differing']:.1%} of values differ",
              f"verdict: {verdict} (sequence parallelism must not add more error than the dtype)"]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="wan2.2-i2v-a14b", choices=sorted(LAYOUTS))
    p.add_argument("--layers", type=int, default=1, help="blocks per expert and text-encoder "
                   "layers (published: 40 / 24 for A14B)")
    p.add_argument("--size", default="128x128", help="WxH of the request")
    p.add_argument("--frames", type=int, default=5)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--write-only", action="store_true", help="write and check the checkpoint")
    p.add_argument("--out", type=Path, default=Path("bench-out/real_layout.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    layout = LAYOUTS[args.model].cut(args.layers)
    folder = checkpoint_dir(layout)
    if args.child:
        write_checkpoint(layout, folder)
        return 0
    if not (folder / "model_index.json").exists():
        start = time.perf_counter()
        # in a child, so this process does not hold the weights while the servers run
        subprocess.run([sys.executable, __file__, "--model", args.model, "--layers",
                        str(args.layers), "--child"], check=True)
        print(f"wrote {folder} in {time.perf_counter() - start:.1f}s")
    wrong = config_mismatches(layout, folder)
    disk_mib = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20
    print(f"{layout.name}, layers cut to {layout.layers}: {folder} ({disk_mib:.0f} MiB); "
          f"configs {'as published' if not wrong else 'DIFFER: ' + '; '.join(wrong)}")
    if wrong:
        return 1
    if args.write_only:
        return 0
    width, height = (int(v) for v in args.size.lower().split("x"))
    png = input_png(width, height, 0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = [serve_once(label, nproc, flags, folder, layout, args, png,
                       args.out.with_suffix(f".{i}.server.log").resolve())
            for i, (label, nproc, flags) in enumerate(RUNS)]
    sp = frame_error(runs[1]["frames"], runs[0]["frames"])
    dtype = frame_error(runs[0]["frames"], runs[2]["frames"])
    text = report(layout, runs, sp, dtype, disk_mib)
    print("\n" + text)
    params = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    for r in runs:
        r["frames_shape"] = list(r.pop("frames").shape)
    args.out.write_text(json.dumps({"params": params, "layout": layout.name,
                                    "layers": layout.layers, "checkpoint": str(folder),
                                    "checkpoint_mib": disk_mib, "runs": runs,
                                    "sp_error": sp, "dtype_error": dtype,
                                    "verdict": "PASS" if "verdict: PASS" in text else "FAIL"},
                                   indent=1))
    print(f"wrote {args.out}")
    return 0 if "verdict: PASS" in text else 1


if __name__ == "__main__":
    sys.exit(main())
