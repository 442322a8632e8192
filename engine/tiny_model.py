"""The embedded default model: a randomly initialised miniature of Wan2.2-I2V-A14B.

Same layout as the real checkpoint (two `WanTransformer3DModel` experts switched at
`boundary_ratio`, `AutoencoderKLWan`, a UMT5 encoder, a tokenizer, flow-prediction UniPC),
built offline and seeded, so every rank and every restart gets identical weights. It is
written to disk in diffusers format and then loaded through the same loader as a real
checkpoint. Its videos are noise; it exists so every code path runs without weights.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

# Changing any of these changes the cache key, so an old cache is never reused by mistake.
TINY_SPEC = {
    "version": 1,
    "seed": 20251124,
    "transformer": dict(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=36,
        out_channels=16, text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    ),
    "vae": dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                temperal_downsample=[False, True, True]),
    "text_encoder": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                         relative_attention_num_buckets=8, relative_attention_max_distance=32),
    "scheduler": dict(prediction_type="flow_prediction", use_flow_sigmas=True,
                      num_train_timesteps=1000, flow_shift=3.0),
    "boundary_ratio": 0.875,
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
        transformer_2 = WanTransformer3DModel(**spec["transformer"]).eval()
    finally:
        torch.random.set_rng_state(generator_state)
    scheduler = UniPCMultistepScheduler(**spec["scheduler"])
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                transformer=transformer, transformer_2=transformer_2)


def ensure_tiny_model(cache_dir: Path | None = None) -> Path:
    """Path of the tiny model in diffusers format, building it on first use."""
    return ensure_random_model(TINY_SPEC, "tiny-wan22-i2v", cache_dir)


def ensure_random_model(spec: dict, name: str, cache_dir: Path | None = None) -> Path:
    """Build a seeded random model of `spec` once, in diffusers format, under the cache.

    Several ranks may race here: each builds into a private temporary folder and renames it
    into place; the loser discards its copy. The build is deterministic, so both are equal.
    """
    from diffusers import WanImageToVideoPipeline

    cache_dir = Path(cache_dir or default_cache_dir())
    target = cache_dir / f"{name}-{spec_digest(spec)}"
    if (target / "model_index.json").exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=cache_dir))
    try:
        pipe = WanImageToVideoPipeline(boundary_ratio=spec["boundary_ratio"],
                                       **build_tiny_components(spec))
        pipe.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
