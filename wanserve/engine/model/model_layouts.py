"""The published configurations of the Wan2.2 checkpoints wanserve serves, as data.

From diffusers' `scripts/convert_wan_to_diffusers.py` (model types "Wan2.2-I2V-14B-720p" and
"Wan2.2-TI2V-5B": their transformer configs, `vae22_diffusers_config`, the scheduler and the
pipeline it saves), the `AutoencoderKLWan` defaults that script relies on for the Wan2.1 VAE,
and google/umt5-xxl's config (the text encoder and tokenizer of both). Re-check against a
real download where one exists (the tokenizer's `extra_ids`, `tie_word_embeddings`).

`benchmarks/real_layout.py` writes checkpoints of these layouts, with the layer counts cut so
they fit a CPU; `--model random:NAME` builds one on the device with random weights
(wanserve/engine/model/random_weights.py). One entry per model: another layout is one more entry.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

RANDOM_PREFIX = "random:"

_TRANSFORMER_COMMON = dict(
    patch_size=[1, 2, 2], attention_head_dim=128, text_dim=4096, freq_dim=256,
    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
    added_kv_proj_dim=None, rope_max_seq_len=1024, pos_embed_seq_len=None,
)

# google/umt5-xxl, the encoder both checkpoints ship (only the encoder stack is used)
UMT5_XXL = dict(
    vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
    num_decoder_layers=24, num_heads=64, relative_attention_num_buckets=32,
    relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dropout_rate=0.1,
    layer_norm_epsilon=1e-6, initializer_factor=1.0, is_encoder_decoder=True, pad_token_id=0,
    eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False,
)
UMT5_TOKENIZER = dict(class_name="T5TokenizerFast", extra_ids=300)

# the Wan2.1 VAE (AutoencoderKLWan's defaults), used by Wan2.2-I2V-A14B
WAN21_VAE = dict(
    base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True], dropout=0.0,
    latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                  0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    latents_std=[2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                 3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160],
)

# the Wan2.2 VAE (z_dim 48, patch 2, 16x spatial), used by Wan2.2-TI2V-5B. The conversion's
# `clip_output: False` is left out: diffusers 0.42.1 has no such argument (it always clamps).
WAN22_VAE = dict(
    base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
    attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0, is_residual=True,
    in_channels=12, out_channels=12, patch_size=2, scale_factor_temporal=4,
    scale_factor_spatial=16,
    latents_mean=[-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
                  -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
                  -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
                  -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
                  -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
                  0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667],
    latents_std=[0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
                 0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
                 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
                 0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
                 0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
                 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744],
)


def _unipc(flow_shift: float) -> dict:
    return dict(prediction_type="flow_prediction", use_flow_sigmas=True,
                num_train_timesteps=1000, flow_shift=flow_shift)


@dataclass(frozen=True)
class ModelLayout:
    name: str
    pipeline: str  # model_index `_class_name`
    experts: tuple[str, ...]  # the transformer components, each with `transformer`'s config
    transformer: dict
    vae: dict
    text_encoder: dict  # UMT5Config keyword arguments
    tokenizer: dict  # class_name, extra_ids
    scheduler: dict  # UniPCMultistepScheduler keyword arguments
    pipeline_config: dict  # boundary_ratio, expand_timesteps
    preset: str  # the configs/ preset that serves the real checkpoint
    layers: dict = field(default_factory=dict)  # what cut() changed: {"transformer": 1, ...}

    @property
    def num_attention_heads(self) -> int:
        return int(self.transformer["num_attention_heads"])

    def cut(self, layers: int | None) -> "ModelLayout":
        """The same layout with at most `layers` transformer blocks per expert and text-encoder
        layers; every width stays as published."""
        if layers is None:
            return self
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        transformer = dict(self.transformer, num_layers=min(layers, self.transformer["num_layers"]))
        text_layers = min(layers, self.text_encoder["num_layers"])
        text_encoder = dict(self.text_encoder, num_layers=text_layers,
                            num_decoder_layers=text_layers)
        return replace(self, transformer=transformer, text_encoder=text_encoder,
                       layers={"transformer": transformer["num_layers"],
                               "text_encoder": text_layers})


WAN22_I2V_A14B = ModelLayout(
    name="wan2.2-i2v-a14b",
    pipeline="WanImageToVideoPipeline",
    experts=("transformer", "transformer_2"),
    transformer=dict(_TRANSFORMER_COMMON, num_attention_heads=40, in_channels=36,
                     out_channels=16, ffn_dim=13824, num_layers=40),
    vae=WAN21_VAE,
    text_encoder=UMT5_XXL,
    tokenizer=UMT5_TOKENIZER,
    scheduler=_unipc(3.0),
    pipeline_config=dict(boundary_ratio=0.9, expand_timesteps=False),
    preset="configs/wan2.2-i2v-a14b-480p.yaml",
)

WAN22_TI2V_5B = ModelLayout(
    name="wan2.2-ti2v-5b",
    pipeline="WanPipeline",
    experts=("transformer",),
    transformer=dict(_TRANSFORMER_COMMON, num_attention_heads=24, in_channels=48,
                     out_channels=48, ffn_dim=14336, num_layers=30),
    vae=WAN22_VAE,
    text_encoder=UMT5_XXL,
    tokenizer=UMT5_TOKENIZER,
    scheduler=_unipc(5.0),
    pipeline_config=dict(boundary_ratio=None, expand_timesteps=True),
    preset="configs/wan2.2-ti2v-5b-720p.yaml",
)

LAYOUTS = {layout.name: layout for layout in (WAN22_I2V_A14B, WAN22_TI2V_5B)}


def layout_named(name: str) -> ModelLayout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown model layout {name!r}: one of {', '.join(LAYOUTS)}") from None


@dataclass(frozen=True)
class RandomModel:
    """`--model random:NAME[?layers=N]`: the published layout NAME, built on each rank's device
    with seeded random weights (no checkpoint, no disk)."""
    layout: ModelLayout
    seed: int = 0

    @property
    def spec(self) -> str:
        cut = f"?layers={self.layout.layers['transformer']}" if self.layout.layers else ""
        return f"{RANDOM_PREFIX}{self.layout.name}{cut}"

    def __str__(self) -> str:
        return self.spec


def parse_random_model(spec: str) -> RandomModel:
    """'random:wan2.2-i2v-a14b' or 'random:wan2.2-i2v-a14b?layers=2' (ValueError otherwise)."""
    if not spec.startswith(RANDOM_PREFIX):
        raise ValueError(f"not a random model spec: {spec!r}")
    name, _, query = spec[len(RANDOM_PREFIX):].partition("?")
    layers = None
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        if key != "layers" or not value.isdigit():
            raise ValueError(f"{spec!r}: the only option is layers=N, got {item!r}")
        layers = int(value)
    return RandomModel(layout_named(name).cut(layers))
