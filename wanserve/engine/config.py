"""Server configuration: a YAML preset from configs/, overridden by command-line flags."""
from __future__ import annotations

import argparse
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from wanserve.engine.adapters.lora import AdapterError, AdapterSpec, parse_specs
from wanserve.engine.model import compiled_blocks
from wanserve.engine.model.compiled_blocks import CompileSettings
from wanserve.engine.model.step_cache import CacheSettings, check_policy, parse_settings
from wanserve.engine.parallel.layout import ParallelLayout

REPO_ROOT = Path(__file__).resolve().parents[2]  # wanserve/engine/config.py → the checkout
DEFAULT_CONFIG = REPO_ROOT / "configs" / "tiny.yaml"
EMBEDDED_MODELS = ("tiny", "tiny-ti2v")  # wanserve/engine/model/tiny_model.py; each has configs/<name>.yaml
CREATE_RESPONSES = ("sync", "async")
TEXT_ENCODER_PLACES = ("device", "cpu", "shard")
# libx264's presets, fastest first; `quality: high` encodes with server.mp4_preset (BENCHMARKS.md,
# "MP4 encoder presets", says why the default)
MP4_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow",
               "slower", "veryslow")
DEFAULT_MP4_PRESET = "veryfast"
VAE_DTYPES = ("float32", "bfloat16")
DEFAULT_MIN_FREE_BYTES = 256 << 20
_BYTE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass(frozen=True)
class Defaults:
    pixel_area: int
    num_frames: int
    fps: int
    num_inference_steps: int
    guidance_scale: float
    guidance_scale_2: float | None  # null on a one-expert model (TI2V-5B)
    boundary_ratio: float | None  # null on a one-expert model
    flow_shift: float
    negative_prompt: str = ""
    sample_solver: str = "unipc"  # or "euler" (the distilled LoRAs' exact sigmas)
    size: str | None = None  # "WxH" of a request with neither a size nor an image


@dataclass(frozen=True)
class Limits:
    min_side: int
    max_side: int
    max_pixels: int
    max_frames: int
    max_fps: int
    max_steps: int
    max_prompt_chars: int
    max_upload_bytes: int
    max_image_pixels: int
    require_image: bool = True  # false: without `input_reference`, text-to-video (TI2V only)
    size_multiple: int = 16  # widths and heights: the VAE's spatial factor x the patch
    # an extension's whole video, the source's frames and the new part's; 0: 4 x max_frames
    max_total_frames: int = 0

    @property
    def total_frames(self) -> int:
        return self.max_total_frames or 4 * self.max_frames


@dataclass(frozen=True)
class CpuSettings:
    """The `cpu:` section: the CPU test vehicle (wanserve/engine/cpu/), ignored on GPUs."""

    tuning: bool = True  # false: none of it, the plain (correct, slower) CPU path
    shared_memory: bool = True  # ranks on one host exchange through /dev/shm, not gloo
    keep_freed_memory: bool = True  # malloc never hands freed memory back


# keys of the presets before the `cpu:` section: (section, key) -> cpu key, or None if gone
_OLD_CPU_KEYS = {
    ("parallel", "cpu_shared_memory"): "shared_memory",
    ("memory", "keep_freed_cpu_memory"): "keep_freed_memory",
    ("parallel", "pin_cpu_cores"): None,
}


def _cpu_settings(tree: dict) -> CpuSettings:
    section = dict(tree.get("cpu") or {})
    for (old_section, old_key), new_key in _OLD_CPU_KEYS.items():
        if old_key not in (tree.get(old_section) or {}):
            continue
        value = tree[old_section][old_key]
        if new_key is None:
            warnings.warn(f"{old_section}.{old_key} is no longer used; remove it",
                          FutureWarning, stacklevel=3)
            continue
        warnings.warn(f"{old_section}.{old_key} is deprecated: use cpu.{new_key}",
                      FutureWarning, stacklevel=3)
        section.setdefault(new_key, value)
    unknown = set(section) - set(CpuSettings.__dataclass_fields__)
    if unknown:
        raise SystemExit(f"unknown key(s) in the cpu: section: {', '.join(sorted(unknown))}")
    return CpuSettings(**{key: bool(value) for key, value in section.items()})


@dataclass
class ServerConfig:
    model: str
    served_model_name: str
    dtype: str
    defaults: Defaults
    limits: Limits
    layout: ParallelLayout
    parallel_vae: str = "auto"  # "auto" (sharded when every rank gets a latent row), true, false
    offload_inactive_expert: bool = False
    # or "cpu": UMT5 kept in host memory and run there; "shard": split over the replica's ranks
    text_encoder: str = "device"
    shard_weights: bool = False  # the experts split over each replica's ranks (FSDP2)
    memory_budget_gib: float | None = None  # per rank: a request planned over it gets a 400
    vae_tiling: bool = False  # diffusers' tiled VAE encode and decode (`enable_tiling`)
    cpu: CpuSettings = field(default_factory=CpuSettings)
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = field(default_factory=lambda: REPO_ROOT / "data")
    max_queue: int = 16
    max_attempts: int = 3  # starts of one job, across restarts, before it fails
    job_timeout_s: float = 3600.0
    stop_timeout_s: float = 25.0  # a stop waits this long for the running job's next step
    video_ttl_s: float = 86400.0
    max_stored_videos: int | None = None  # stored jobs, live ones included (oldest finished go)
    max_stored_bytes: int | None = None  # bytes of stored MP4s (oldest finished go)
    min_free_bytes: int = DEFAULT_MIN_FREE_BYTES  # less free on --data-dir: new jobs refused
    api_key: str | None = None
    collective_timeout_s: float = 300.0
    log_level: str = "INFO"
    create_response: str = "sync"  # what POST /v1/videos answers without `Prefer: respond-async`
    config_path: Path = DEFAULT_CONFIG
    sizes: tuple[str, ...] = ()  # the `sizes:` a client is offered (WxH); none: derived
    adapters: tuple[AdapterSpec, ...] = ()  # the `loras:` section and --lora flags
    lora_dir: str | None = None  # requests may name .safetensors files under it
    lora_cache: int = 4  # --lora-dir adapters kept loaded (least recently used go first)
    lora_unfuse_per_request: bool = False  # with a fused default, requests may ask for others
    attention_backend: str = "auto"  # or one name of wanserve.kernels.attention.BACKEND_NAMES
    cache: CacheSettings = field(default_factory=CacheSettings)  # the `cache:` section
    compile: CompileSettings = field(default_factory=CompileSettings)  # the `compile:` section
    mp4_preset: str = DEFAULT_MP4_PRESET  # libx264's preset for `quality: high`
    vae_dtype: str = "float32"  # or "bfloat16": the VAE's encode and decode

    @property
    def is_tiny(self) -> bool:
        return self.model in EMBEDDED_MODELS


def _set_dotted(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = yaml.safe_load(raw)


def _vae_dtype(value) -> str:
    if str(value) not in VAE_DTYPES:
        raise SystemExit(f"vae_dtype must be one of {', '.join(VAE_DTYPES)}, got {value!r}")
    return str(value)


def _byte_count(name: str, value) -> int | None:
    """An amount of bytes: an integer, or a string with a K/M/G/T (binary) suffix; None or 0:
    none given."""
    if value is None:
        return None
    text = str(value).strip().upper().removesuffix("IB").removesuffix("B")
    number, suffix = (text[:-1], text[-1]) if text[-1:] in _BYTE_SUFFIXES else (text, "")
    try:
        count = int(float(number) * _BYTE_SUFFIXES[suffix])
    except ValueError:
        raise SystemExit(f"{name} must be a number of bytes (e.g. 500M, 20G), got {value!r}") from None
    if count < 0:
        raise SystemExit(f"{name} must not be negative, got {value!r}")
    return count or None


def _store_cap(value) -> int | None:
    if value is None:
        return None
    if int(value) < 1:
        raise SystemExit(f"server.max_stored_videos must be at least 1, got {value}")
    return int(value)


def _sizes(value) -> tuple[str, ...]:
    """`sizes:` as a YAML list, or one string (`--set sizes=832x480,480x832`)."""
    items = value.split(",") if isinstance(value, str) else (value or ())
    return tuple(str(item).strip() for item in items if str(item).strip())


def _check_sharding(shard: bool, offload: bool, adapters, lora_dir, tree: dict) -> None:
    if not shard:
        return
    if offload:
        raise SystemExit("--shard-weights and --offload-inactive-expert cannot be combined: the "
                         "offload moves whole experts between the host and the device, sharding "
                         "splits them over the ranks; choose one")
    unfused = [s.name for s in adapters if not s.fuse]
    if unfused or lora_dir or tree.get("lora_unfuse_per_request"):
        raise SystemExit("--shard-weights runs fused adapters only (`fuse: true`, merged before "
                         "the weights are sharded): per-request adapters "
                         f"({', '.join(unfused) or '--lora-dir, lora_unfuse_per_request'}) need "
                         "unsharded weights; fuse them or drop --shard-weights")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wanserve", description="Serve Wan2.2 video generation: "
                                "image-to-video, and text-to-video with TI2V.")
    p.add_argument("--config", type=Path, help="YAML preset (default: configs/tiny.yaml, or "
                   "configs/tiny-ti2v.yaml with --model tiny-ti2v)")
    p.add_argument("--model", help="'tiny' (Wan2.2-I2V-A14B in miniature), 'tiny-ti2v' "
                   "(Wan2.2-TI2V-5B in miniature), a path to a diffusers-format Wan2.2 "
                   "checkpoint, or random:NAME[?layers=N]: a published layout "
                   "(wanserve/engine/model/model_layouts.py) built on the device with random weights")
    p.add_argument("--served-model-name", help="the model id clients see")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--vae-dtype", choices=VAE_DTYPES,
                   help="the VAE's dtype (default float32; BENCHMARKS.md: what bfloat16 costs)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--ulysses", type=int)
    p.add_argument("--ring", type=int)
    p.add_argument("--cfg", type=int, help="1, or 2 for CFG parallel")
    p.add_argument("--dp", type=int, help="replicas: groups of cfg × ulysses × ring ranks that "
                   "each run one job at a time (default 1)")
    p.add_argument("--offload-inactive-expert", action="store_true",
                   help="keep the expert not in use in CPU memory (one 14B expert on the GPU)")
    p.add_argument("--shard-weights", action="store_true",
                   help="split each expert's weights over the ranks of each replica (FSDP2)")
    p.add_argument("--text-encoder", choices=TEXT_ENCODER_PLACES,
                   help="where UMT5 is kept and runs: 'device' (default), 'cpu' (host memory; "
                   "the prompt embeddings are moved to the device) or 'shard' (on the device, "
                   "split over the ranks of each replica with FSDP2)")
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--max-queue", type=int)
    p.add_argument("--max-attempts", type=int,
                   help="times a job may be started before it fails: a restart runs the jobs it "
                   "interrupted again (default 3)")
    p.add_argument("--job-timeout", type=float, dest="job_timeout_s")
    p.add_argument("--stop-timeout", type=float, dest="stop_timeout_s",
                   help="seconds a stop (SIGTERM) waits for a running job to reach its next step "
                   "before the server exits without it (default 25; more than one step takes)")
    p.add_argument("--video-ttl", type=float, dest="video_ttl_s",
                   help="seconds a completed video stays downloadable (expires_at)")
    p.add_argument("--max-stored-videos", type=int,
                   help="keep at most this many jobs in the store (queued and running ones count "
                   "but are never evicted): the oldest finished go first (default: no cap)")
    p.add_argument("--max-stored-bytes",
                   help="keep at most this many bytes of MP4s (e.g. 20G): the oldest finished "
                   "jobs go first (default: no cap)")
    p.add_argument("--min-free-bytes",
                   help="refuse new jobs (507 insufficient_storage) while --data-dir's file "
                   "system has less free (default 256M; 0: only when a write fails)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* "
                   "(default: $WANSERVE_API_KEY)")
    p.add_argument("--collective-timeout", type=float, dest="collective_timeout_s",
                   help="seconds before a stalled collective fails the job and the server")
    p.add_argument("--log-level")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=PATH[,LOW]",
                   help="register a LoRA: one file for both experts, or HIGH,LOW (repeatable)")
    p.add_argument("--lora-dir", help="requests may load .safetensors LoRAs from under here")
    p.add_argument("--lora-cache", type=int, help="--lora-dir adapters kept loaded (default 4)")
    p.add_argument("--create-response", choices=CREATE_RESPONSES,
                   help="what POST /v1/videos answers without 'Prefer: respond-async': 'sync' "
                   "waits and answers the video (default), 'async' answers the queued job at once")
    p.add_argument("--attention-backend", help="auto (the first usable, the default), or one of "
                   "flash-attn-3, cudnn, flash-attn-2, sdpa, sdpa-flash, cpu-flash: refused at "
                   "start-up where it cannot run")
    p.add_argument("--mp4-preset", choices=MP4_PRESETS,
                   help=f"libx264 preset of `quality: high` videos (default {DEFAULT_MP4_PRESET})")
    p.add_argument("--compile", choices=compiled_blocks.POLICIES,
                   help="'regional': torch.compile each transformer block, warmed up before the "
                   "server is ready (default off; the `compile:` section)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any YAML key, e.g. --set defaults.num_inference_steps=8")
    return p


def load_config(argv: list[str] | None = None) -> ServerConfig:
    args = build_parser().parse_args(argv)
    if args.config is None:
        args.config = (REPO_ROOT / "configs" / f"{args.model}.yaml"
                       if args.model in EMBEDDED_MODELS else DEFAULT_CONFIG)
    with open(args.config) as f:
        tree = yaml.safe_load(f) or {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        _set_dotted(tree, key, value)
    parallel = tree.get("parallel") or {}
    layout = ParallelLayout(
        ulysses=args.ulysses or parallel.get("ulysses", 1),
        ring=args.ring or parallel.get("ring", 1),
        cfg=args.cfg or parallel.get("cfg", 1),
        dp=args.dp or parallel.get("dp", 1),
    )
    server = tree.get("server") or {}
    memory = tree.get("memory") or {}
    model = args.model or tree.get("model")
    if not model:
        raise SystemExit(f"{args.config} names no model: pass --model PATH")

    def pick(name, default):
        value = getattr(args, name, None)
        return value if value is not None else server.get(name, default)

    try:
        adapters = parse_specs(tree.get("loras"), args.lora)
    except AdapterError as exc:
        raise SystemExit(f"LoRA adapters: {exc}") from None
    lora_dir = args.lora_dir or tree.get("lora_dir")
    if lora_dir and not Path(lora_dir).is_dir():
        raise SystemExit(f"--lora-dir {lora_dir}: not a directory")
    max_attempts = int(pick("max_attempts", 3))
    if max_attempts < 1:
        raise SystemExit(f"server.max_attempts must be at least 1, got {max_attempts}")
    mp4_preset = str(pick("mp4_preset", DEFAULT_MP4_PRESET)).lower()
    if mp4_preset not in MP4_PRESETS:
        raise SystemExit(f"server.mp4_preset must be one of {', '.join(MP4_PRESETS)}, "
                         f"got {mp4_preset!r}")
    create_response = str(pick("create_response", "sync")).lower()
    if create_response not in CREATE_RESPONSES:
        raise SystemExit(f"server.create_response must be one of {', '.join(CREATE_RESPONSES)}, "
                         f"got {create_response!r}")
    text_encoder = str(args.text_encoder or memory.get("text_encoder", "device")).lower()
    if text_encoder not in TEXT_ENCODER_PLACES:
        raise SystemExit(f"memory.text_encoder must be one of {', '.join(TEXT_ENCODER_PLACES)}, "
                         f"got {text_encoder!r}")
    offload = bool(args.offload_inactive_expert or memory.get("offload_inactive_expert"))
    shard_weights = bool(args.shard_weights or parallel.get("shard_weights"))
    vae_tiling = bool(memory.get("vae_tiling", False))
    if vae_tiling and layout.replica_size > 1 and str(parallel.get("vae", "auto")).lower() != "false":
        raise SystemExit("memory.vae_tiling decodes on one rank in tiles; the VAE is sharded by "
                         "rows over the replica's ranks unless parallel.vae is false: set "
                         "parallel.vae: false, or leave memory.vae_tiling off")
    budget = memory.get("budget_gib")
    if budget is not None and not (isinstance(budget, (int, float)) and budget > 0):
        raise SystemExit(f"memory.budget_gib must be a positive number of GiB, got {budget!r}")
    _check_sharding(shard_weights, offload, adapters, lora_dir, tree)
    compile_settings = compiled_blocks.parse_settings(tree.get("compile"), args.compile)
    compiled_blocks.check_combination(compile_settings, shard_weights)
    cache = parse_settings(tree.get("cache"))
    check_policy(cache, layout.dp)
    return ServerConfig(
        adapters=adapters,
        lora_dir=str(lora_dir) if lora_dir else None,
        lora_cache=max(1, int(args.lora_cache or tree.get("lora_cache", 4))),
        lora_unfuse_per_request=bool(tree.get("lora_unfuse_per_request", False)),
        model=str(model),
        served_model_name=args.served_model_name or tree.get("served_model_name") or Path(model).name,
        dtype=args.dtype or tree.get("dtype", "float32"),
        vae_dtype=_vae_dtype(args.vae_dtype or tree.get("vae_dtype", "float32")),
        defaults=Defaults(**tree["defaults"]),
        sizes=_sizes(tree.get("sizes")),
        limits=Limits(**tree["limits"]),
        layout=layout,
        parallel_vae=str(parallel.get("vae", "auto")).lower(),
        offload_inactive_expert=offload,
        text_encoder=text_encoder,
        shard_weights=shard_weights,
        memory_budget_gib=None if budget is None else float(budget),
        vae_tiling=vae_tiling,
        cpu=_cpu_settings(tree),
        host=pick("host", "127.0.0.1"),
        port=int(pick("port", 8000)),
        data_dir=Path(pick("data_dir", os.environ.get("WANSERVE_DATA_DIR", REPO_ROOT / "data"))),
        max_queue=int(pick("max_queue", 16)),
        max_attempts=max_attempts,
        job_timeout_s=float(pick("job_timeout_s", 3600.0)),
        stop_timeout_s=float(pick("stop_timeout_s", 25.0)),
        video_ttl_s=float(pick("video_ttl_s", 86400.0)),
        max_stored_videos=_store_cap(pick("max_stored_videos", None)),
        max_stored_bytes=_byte_count("server.max_stored_bytes", pick("max_stored_bytes", None)),
        min_free_bytes=_byte_count("server.min_free_bytes",
                                   pick("min_free_bytes", DEFAULT_MIN_FREE_BYTES)) or 0,
        api_key=pick("api_key", None) or os.environ.get("WANSERVE_API_KEY") or None,
        collective_timeout_s=float(pick("collective_timeout_s", 300.0)),
        log_level=str(pick("log_level", "INFO")).upper(),
        create_response=create_response,
        attention_backend=str(args.attention_backend or tree.get("attention_backend", "auto")),
        cache=cache,
        compile=compile_settings,
        mp4_preset=mp4_preset,
        config_path=args.config,
    )


if __name__ == "__main__":
    # `python -m wanserve.engine.config ARGS...` prints the world size that ARGS' layout needs;
    # launch.sh uses it when --nproc is not given.
    import sys

    print(load_config(sys.argv[1:]).layout.world_size)
