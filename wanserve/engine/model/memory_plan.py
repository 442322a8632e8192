"""The memory plan: the bytes one rank holds for a request, known before the request runs.

Weights come from the model's configuration: every component is built on the meta device
(nothing allocated) and each parameter counted in the dtype it is loaded in (diffusers'
fp32-kept modules in float32), then divided as the placement divides them: both experts
resident, one (`--offload-inactive-expert`), or 1/N of each plus what FSDP2 gathers at a time
(`--shard-weights`: the root's parameters and two blocks, the running one and the prefetched
next); the text encoder on the device or in host memory.

Activations are traced, not hand-counted: one transformer forward, the VAE encode of the
condition video and the VAE decode run on fake tensors (wanserve/engine/model/fake_trace.py) at
two small shapes each. Their peaks grow linearly with the tokens (no attention kernel wanserve
uses holds a tokens × tokens matrix) and with the latent pixels, so two traces give a fixed part
and a part per token or per latent pixel, and any request's peak is arithmetic:
- denoise: one forward at the tokens on this rank after the sequence-parallel split (ulysses ×
  ring). One block is traced: blocks run one after another and each frees its temporaries. CFG's
  two branches run one after the other (or one per rank with CFG parallel), so one forward is
  the peak.
- encode / decode: per latent pixel, a part that grows with the frames (the video held whole)
  and one that does not (the causal chunks); a VAE sharded by rows gives each rank its rows.
A request's peak is the resident weights plus the largest of the three.

The traces take seconds (every op dispatched on fake tensors), so their results are kept under
the cache folder, keyed by the configurations, the dtypes and the library versions.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wanserve.engine.model.fake_trace import fake_module, peak_bytes

GIB = 2**30
TRACE_VERSION = 1  # part of the cache key: change it when the traces change
TEXT_TOKENS = 512  # the UMT5 sequence every Wan2.2 pipeline pads prompts to


@dataclass(frozen=True)
class Placement:
    """How the weights and the work are spread over one replica's ranks."""

    dtype: torch.dtype = torch.float32
    vae_dtype: torch.dtype = torch.float32
    shard_ranks: int = 1  # ranks each expert is sharded over (FSDP2); 1: not sharded
    offload_inactive_expert: bool = False
    text_encoder_on_device: bool = True
    # ranks UMT5 is sharded over (memory.text_encoder: shard); 1: whole on each rank. Its
    # root and one layer, gathered while a prompt is encoded, are the `text_encode` phase
    text_encoder_shard_ranks: int = 1
    sequence_parallel: int = 1  # ulysses × ring: the ranks one forward's tokens are split over
    vae_ranks: int = 1  # ranks the VAE encode and decode are split over by rows
    # diffusers' tiled encode and decode: planned as untiled (an over-estimate: tiles bound the
    # temporaries, BENCHMARKS.md "Tiled VAE" says by how much)
    vae_tiling: bool = False

    def label(self) -> str:
        parts = [f"SP{self.sequence_parallel}"]
        if self.shard_ranks > 1:
            parts.append(f"sharded/{self.shard_ranks}")
        if self.offload_inactive_expert:
            parts.append("offload")
        if not self.text_encoder_on_device:
            parts.append("text encoder on cpu")
        elif self.text_encoder_shard_ranks > 1:
            parts.append(f"text encoder sharded/{self.text_encoder_shard_ranks}")
        if self.vae_tiling:
            parts.append("VAE tiled (planned as untiled)")
        return ", ".join(parts)


@dataclass(frozen=True)
class Linear:
    """bytes = fixed + per_unit × units, from two traces."""

    fixed: float
    per_unit: float

    @classmethod
    def through(cls, units: tuple[int, int], peaks: tuple[int, int]) -> "Linear":
        per_unit = (peaks[1] - peaks[0]) / (units[1] - units[0])
        return cls(peaks[0] - per_unit * units[0], per_unit)

    def at(self, units: float) -> int:
        return max(0, round(self.fixed + self.per_unit * units))


@dataclass(frozen=True)
class VaeFit:
    """VAE bytes for h × w latent pixels and f latent frames: h·w·(per_pixel + per_frame·f)."""

    per_pixel: float
    per_pixel_frame: float

    def at(self, pixels: float, frames: int) -> int:
        return max(0, round(pixels * (self.per_pixel + self.per_pixel_frame * frames)))


@dataclass(frozen=True)
class ModelShapes:
    """What the plan reads off the model: its components' configurations."""

    transformer: dict  # WanTransformer3DModel's config (both experts share it)
    experts: int
    vae: dict  # AutoencoderKLWan's config
    text_encoder: dict  # UMT5Config's keyword arguments

    @classmethod
    def of_pipeline(cls, pipe) -> "ModelShapes":
        return cls(_settings(pipe.transformer.config),
                   1 + (getattr(pipe, "transformer_2", None) is not None),
                   _settings(pipe.vae.config), pipe.text_encoder.config.to_dict())

    @classmethod
    def of_layout(cls, layout) -> "ModelShapes":
        """A published layout (wanserve/engine/model/model_layouts.py)."""
        return cls(dict(layout.transformer), len(layout.experts), dict(layout.vae),
                   dict(layout.text_encoder))


def _settings(config) -> dict:
    """A diffusers config without its bookkeeping (`_use_default_values` would make
    from_config ignore the values it names)."""
    return {key: value for key, value in config.items() if not key.startswith("_")}


def _transformer(config: dict, dtype: torch.dtype, **overrides):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_config({**config, **overrides})
    return _in_load_dtypes(model, dtype, WanTransformer3DModel._keep_in_fp32_modules)


def build_vae(config: dict, dtype: torch.dtype):
    from diffusers import AutoencoderKLWan

    return torch.nn.Module.to(AutoencoderKLWan.from_config(config), dtype)


def _text_encoder(config: dict, dtype: torch.dtype):
    from transformers import UMT5Config, UMT5EncoderModel

    model = UMT5EncoderModel(UMT5Config(**config))
    # transformers keeps `_keep_in_fp32_modules` (UMT5: `wo`) in float32 for float16 loads only
    keep = UMT5EncoderModel._keep_in_fp32_modules or () if dtype == torch.float16 else ()
    return _in_load_dtypes(model, dtype, keep)


def _in_load_dtypes(model: torch.nn.Module, dtype: torch.dtype, keep_in_fp32) -> torch.nn.Module:
    """Each parameter in the dtype from_pretrained gives it: `dtype`, except those with a
    name part in `keep_in_fp32` (diffusers' and transformers' own test). torch's own `to`:
    diffusers' warns that it would not keep those (this does)."""
    torch.nn.Module.to(model, dtype)
    for name, param in model.named_parameters():
        if any(part in name.split(".") for part in keep_in_fp32 or ()):
            param.data = param.data.float()
    return model


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def component_bytes(shapes: ModelShapes, dtype: torch.dtype, vae_dtype: torch.dtype) -> dict:
    """Each component's parameter bytes, unsharded, from modules built on the meta device; for
    the experts and the text encoder also one block's (layer's) and the root's (what is not in
    a block)."""
    with torch.device("meta"):
        expert = _transformer(shapes.transformer, dtype)
        vae = build_vae(shapes.vae, vae_dtype)
        text_encoder = _text_encoder(shapes.text_encoder, dtype)
    block = _bytes(expert.blocks[0])
    total = _bytes(expert)
    layers = text_encoder.encoder.block
    text_total, text_layer = _bytes(text_encoder), _bytes(layers[0])
    return {"expert": total, "expert_block": block, "expert_root": total - block * len(expert.blocks),
            "experts": shapes.experts * total, "vae": _bytes(vae),
            "text_encoder": text_total, "text_encoder_layer": text_layer,
            "text_encoder_root": text_total - text_layer * len(layers)}


def resident_weights(components: dict, experts: int, placement: Placement) -> dict:
    """The weight bytes one rank holds on its device while a request runs, by component."""
    expert = components["expert"]
    if placement.shard_ranks > 1:
        on_rank = (experts * math.ceil(expert / placement.shard_ranks)
                   + components["expert_root"] + 2 * components["expert_block"])
    elif placement.offload_inactive_expert:
        on_rank = expert
    else:
        on_rank = experts * expert
    return {"experts": on_rank, "vae": components["vae"],
            "text_encoder": (math.ceil(components["text_encoder"] / placement.text_encoder_shard_ranks)
                             if placement.text_encoder_on_device else 0)}


@dataclass(frozen=True)
class ActivationFits:
    denoise: Linear  # per token on the rank
    encode: VaeFit
    decode: VaeFit


def trace_activations(shapes: ModelShapes, dtype: torch.dtype,
                      vae_dtype: torch.dtype) -> ActivationFits:
    """Two fake-tensor traces each of one transformer forward, the VAE encode and the decode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    cfg = shapes.transformer
    one_block = fake_module(lambda: _transformer(cfg, dtype, num_layers=1), fake)
    vae = fake_module(lambda: build_vae(shapes.vae, vae_dtype), fake)
    _, patch_h, patch_w = cfg["patch_size"]

    def forward(frames: int, side: int) -> int:
        def run():
            one_block(hidden_states=torch.empty(1, cfg["in_channels"], frames, side, side,
                                                dtype=dtype),
                      timestep=torch.tensor([500.0]),
                      encoder_hidden_states=torch.empty(1, TEXT_TOKENS, cfg["text_dim"],
                                                        dtype=dtype),
                      return_dict=False)
        return peak_bytes(run, fake)[0]

    side = 8 * max(patch_h, patch_w)  # 64 tokens a latent frame
    tokens = [frames * (side // patch_h) * (side // patch_w) for frames in (8, 16)]
    denoise = Linear.through(tokens, [forward(8, side), forward(16, side)])

    scale_s = int(shapes.vae.get("scale_factor_spatial") or 8)
    scale_t = int(shapes.vae.get("scale_factor_temporal") or 4)
    latent_side = 8
    z = int(shapes.vae["z_dim"])

    latent_frames = 5

    def fit(decode: bool) -> VaeFit:
        """The Wan VAE runs its encoder or decoder once per latent frame (a causal cache carries
        the rest): the peak's growth per frame is read between calls past the first chunks,
        the part that does not grow from the whole run's peak."""
        def run():
            if decode:
                vae.decode(torch.empty(1, z, latent_frames, latent_side, latent_side,
                                       dtype=vae_dtype), return_dict=False)
            else:
                side = latent_side * scale_s
                vae.encode(torch.empty(1, 3, (latent_frames - 1) * scale_t + 1, side, side,
                                       dtype=vae_dtype))
        peak, after_calls = peak_bytes(run, fake, vae.decoder if decode else vae.encoder)
        area = latent_side * latent_side
        per_frame = (after_calls[4] - after_calls[2]) / 2
        if not decode:  # the video to encode was made whole before the first call
            per_frame += 3 * scale_t * area * scale_s**2 * vae_dtype.itemsize
        return VaeFit((peak - latent_frames * per_frame) / area, per_frame / area)

    return ActivationFits(denoise, fit(decode=False), fit(decode=True))


def cached_activations(shapes: ModelShapes, dtype: torch.dtype, vae_dtype: torch.dtype,
                       cache_dir: Path | None = None) -> ActivationFits:
    """`trace_activations`, read from the cache when this model was traced before."""
    import diffusers

    from wanserve.engine.model.tiny_model import default_cache_dir

    key = json.dumps([TRACE_VERSION, dataclasses.asdict(shapes), str(dtype), str(vae_dtype),
                      torch.__version__, diffusers.__version__], sort_keys=True, default=str)
    folder = Path(cache_dir or default_cache_dir()) / "memory-plans"
    path = folder / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.exists():
        saved = json.loads(path.read_text())
        return ActivationFits(Linear(**saved["denoise"]), VaeFit(**saved["encode"]),
                              VaeFit(**saved["decode"]))
    fits = trace_activations(shapes, dtype, vae_dtype)
    folder.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(dataclasses.asdict(fits), f)
    os.replace(staging, path)  # several ranks or servers may race: each writes the same
    return fits


@dataclass
class MemoryPlan:
    """One model's plan under one placement (every rank of a replica holds the same bytes;
    rank 0 also the whole decoded video when the VAE is sharded)."""

    shapes: ModelShapes
    placement: Placement
    components: dict
    fits: ActivationFits
    weights: dict = field(init=False)

    def __post_init__(self):
        self.weights = resident_weights(self.components, self.shapes.experts, self.placement)

    @classmethod
    def build(cls, shapes: ModelShapes, placement: Placement) -> "MemoryPlan":
        return cls(shapes, placement,
                   component_bytes(shapes, placement.dtype, placement.vae_dtype),
                   cached_activations(shapes, placement.dtype, placement.vae_dtype))

    def with_placement(self, placement: Placement) -> "MemoryPlan":
        """The same model under another placement, without tracing again (same dtypes)."""
        assert (placement.dtype, placement.vae_dtype) == (self.placement.dtype,
                                                          self.placement.vae_dtype)
        return MemoryPlan(self.shapes, placement, self.components, self.fits)

    def _latent(self, width: int, height: int, num_frames: int) -> tuple[int, int, int]:
        scale_s = int(self.shapes.vae.get("scale_factor_spatial") or 8)
        scale_t = int(self.shapes.vae.get("scale_factor_temporal") or 4)
        return (num_frames - 1) // scale_t + 1, height // scale_s, width // scale_s

    def request(self, width: int, height: int, num_frames: int) -> dict:
        """Bytes per rank: the resident weights, each phase's activations, and the peak."""
        frames, h, w = self._latent(width, height, num_frames)
        _, patch_h, patch_w = self.shapes.transformer["patch_size"]
        tokens = frames * (h // patch_h) * (w // patch_w)
        p = self.placement
        local_tokens = math.ceil(tokens / p.sequence_parallel)
        rows = math.ceil(h / p.vae_ranks)
        video = 3 * num_frames * height * width * p.vae_dtype.itemsize
        phases = {"denoise": self.fits.denoise.at(local_tokens),
                  "vae_encode": self.fits.encode.at(rows * w, frames),
                  "vae_decode": self.fits.decode.at(rows * w, frames)
                  + (video if p.vae_ranks > 1 else 0),
                  "text_encode": self._gathered_text_encoder()}
        weights = sum(self.weights.values())
        return {"tokens": tokens, "tokens_per_rank": local_tokens, "weights": weights,
                **phases, "peak": weights + max(phases.values())}

    def _gathered_text_encoder(self) -> int:
        """A sharded text encoder's root (the token embedding) and one layer, gathered whole
        while a prompt is encoded (its activations, 512 tokens, are small beside them)."""
        p = self.placement
        if not p.text_encoder_on_device or p.text_encoder_shard_ranks == 1:
            return 0
        return self.components["text_encoder_root"] + self.components["text_encoder_layer"]

    def max_frames(self, width: int, height: int, budget: int, limit: int) -> int:
        """The most frames (4k+1, at most `limit`) whose peak fits `budget`; 0 if none."""
        scale_t = int(self.shapes.vae.get("scale_factor_temporal") or 4)
        best = 0
        for frames in range(1, limit + 1, scale_t):
            if self.request(width, height, frames)["peak"] > budget:
                break
            best = frames
        return best

    def report(self) -> dict:
        """For /health: the resident weights and the activation model, in GiB."""
        f = self.fits
        return {"placement": self.placement.label(),
                "weights_gib": {k: round(v / GIB, 3) for k, v in self.weights.items()},
                "denoise_bytes_per_token": round(f.denoise.per_unit),
                "decode_bytes_per_latent_pixel": round(f.decode.per_pixel),
                "decode_bytes_per_latent_pixel_frame": round(f.decode.per_pixel_frame),
                "text_encode_gathered_gib": round(self._gathered_text_encoder() / GIB, 3)}
