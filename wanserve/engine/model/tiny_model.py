"""The embedded models: randomly initialised miniatures of Wan2.2-I2V-A14B and Wan2.2-TI2V-5B.

`tiny` (the default) has the A14B layout: two `WanTransformer3DModel` experts switched at
`boundary_ratio`, the Wan2.1 VAE (`AutoencoderKLWan`, z_dim 16), a UMT5 encoder, a tokenizer,
flow-prediction UniPC. `tiny-ti2v` has the TI2V-5B layout: one expert whose input is the latent
itself (48 channels), the Wan2.2 VAE (z_dim 48, patchified by 2, residual blocks, 16x spatial),
per-token timesteps (`expand_timesteps`), saved as the `WanPipeline` the real checkpoint is.
Both are built offline and seeded, so every rank and every restart gets identical weights,
written to disk in diffusers format and loaded through the same loader as a real checkpoint.
Their videos are noise; they exist so every code path runs without weights.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

_TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, text_dim=32, freq_dim=32,
    ffn_dim=128, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
    rope_max_seq_len=1024,
)

# Changing any of these changes the cache key, so an old cache is never reused by mistake.
TINY_SPEC = {
    "version": 1,
    "seed": 20251124,
    "transformer": dict(_TINY_TRANSFORMER, in_channels=36, out_channels=16),
    # 8 base channels (16 until 2026-12-07): at 16 the VAE took ~85 % of a 128x128x9, 4-step
    # request's time on a CPU (encode 0.16 s, decode 0.38 s, denoise 0.05 s), the reverse of
    # the real model, whose denoise dominates; at 8 a request takes half as long
    "vae": dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                temperal_downsample=[False, True, True]),
    "text_encoder": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                         relative_attention_num_buckets=8, relative_attention_max_distance=32),
    "scheduler": dict(prediction_type="flow_prediction", use_flow_sigmas=True,
                      num_train_timesteps=1000, flow_shift=3.0),
    "boundary_ratio": 0.875,
}

# The Wan2.2 VAE's 48 published latent statistics (diffusers' convert_wan_to_diffusers.py).
WAN22_LATENTS_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542,
    0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109,
    0.2665, -0.2108, -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899,
    -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
]
WAN22_LATENTS_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344,
    0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804,
    0.5833, 1.4146, 0.8986, 0.5659, 0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999,
    0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
]

# Wan2.2-TI2V-5B's layout in miniature: no `boundary_ratio` (one expert), `expand_timesteps`.
TINY_TI2V_SPEC = {
    "version": 1,
    "seed": 20251201,
    "transformer": dict(_TINY_TRANSFORMER, in_channels=48, out_channels=48),
    "vae": dict(base_dim=16, decoder_base_dim=24, z_dim=48, dim_mult=[1, 2, 4, 4],
                num_res_blocks=1, temperal_downsample=[False, True, True], is_residual=True,
                in_channels=12, out_channels=12, patch_size=2, scale_factor_temporal=4,
                scale_factor_spatial=16, latents_mean=WAN22_LATENTS_MEAN,
                latents_std=WAN22_LATENTS_STD),
    "text_encoder": TINY_SPEC["text_encoder"],
    "scheduler": dict(prediction_type="flow_prediction", use_flow_sigmas=True,
                      num_train_timesteps=1000, flow_shift=5.0),
    "expand_timesteps": True,
}

# `--model NAME` for each embedded model: (spec, cache folder prefix)
EMBEDDED_MODELS = {
    "tiny": (TINY_SPEC, "tiny-wan22-i2v"),
    "tiny-ti2v": (TINY_TI2V_SPEC, "tiny-wan22-ti2v"),
}

_SPECIALS = ["<pad>", "</s>", "<unk>"]
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 .,;:!?'\"-()/&%+=_@#*"


def default_cache_dir() -> Path:
    root = os.environ.get("WANSERVE_CACHE") or os.path.join(Path.home(), ".cache", "wanserve")
    return Path(root)


def spec_digest(spec: dict = TINY_SPEC) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def _build_tokenizer():
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIALS + list(_ALPHABET))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def build_tiny_components(spec: dict = TINY_SPEC) -> dict:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _build_tokenizer()
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(spec["seed"])
        text_encoder = UMT5EncoderModel(
            UMT5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1,
                       **spec["text_encoder"])
        ).eval()
        vae = AutoencoderKLWan(**spec["vae"]).eval()
        transformer = WanTransformer3DModel(**spec["transformer"]).eval()
        transformer_2 = (WanTransformer3DModel(**spec["transformer"]).eval()
                         if _two_experts(spec) else None)
    finally:
        torch.random.set_rng_state(generator_state)
    scheduler = UniPCMultistepScheduler(**spec["scheduler"])
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                transformer=transformer, transformer_2=transformer_2)


def _two_experts(spec: dict) -> bool:
    return spec.get("boundary_ratio") is not None


def ensure_tiny_model(cache_dir: Path | None = None, name: str = "tiny") -> Path:
    """Path of the embedded model `name` (EMBEDDED_MODELS) in diffusers format, built on first
    use."""
    spec, folder = EMBEDDED_MODELS[name]
    return ensure_random_model(spec, folder, cache_dir)


def ensure_random_model(spec: dict, name: str, cache_dir: Path | None = None) -> Path:
    """Build a seeded random model of `spec` once, in diffusers format, under the cache.

    Several ranks may race here: each builds into a private temporary folder and renames it
    into place; the loser discards its copy. The build is deterministic, so both are equal.
    """
    cache_dir = Path(cache_dir or default_cache_dir())
    target = cache_dir / f"{name}-{spec_digest(spec)}"
    if (target / "model_index.json").exists():
        return target
    from diffusers import WanImageToVideoPipeline, WanPipeline

    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=cache_dir))
    try:
        components = build_tiny_components(spec)
        if spec.get("expand_timesteps"):  # saved as the real TI2V-5B checkpoint is
            pipe = WanPipeline(expand_timesteps=True, **components)
        else:
            pipe = WanImageToVideoPipeline(boundary_ratio=spec["boundary_ratio"], **components)
        pipe.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
