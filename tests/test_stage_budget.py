"""The FLOP formulas of the stage budget (benchmarks/stage_budget.py, and the transformer's in
benchmarks/gpu_served.py) against torch's own FlopCounterMode on small configurations run for
real: one transformer block and one UMT5 encoder layer, each the difference of a two- and a
one-layer model, so the embeddings and heads the formulas leave out cancel.

Checked with: the transformer's FFN term halved (`4 * tokens * d * ffn` → `2 * ...` in
benchmarks/gpu_served.py `forward_flops`): the block counted 549376 FLOP against 457216 by the
formula; the text encoder's FFN term cut (`6 * tokens * d * ff` → `4 * ...` in
`text_encoder_flops`): 270336 counted against 221184.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from gpu_served import forward_flops  # noqa: E402
from stage_budget import text_encoder_flops  # noqa: E402

TEXT = 16  # text tokens


def counted(run) -> int:
    # the math kernel is matmuls torch's counter knows; the CPU attention kernel it does not count
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        run()
    return counter.get_total_flops()


def test_transformer_block_formula_matches_the_counted_flops():
    from diffusers import WanTransformer3DModel

    config = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=16,
                  in_channels=8, out_channels=4, text_dim=24, freq_dim=32, ffn_dim=80,
                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
    latent = (3, 4, 6)  # frames, height, width: 3 * 2 * 3 = 18 tokens
    tokens = latent[0] * (latent[1] // 2) * (latent[2] // 2)

    def forward(layers: int) -> int:
        torch.manual_seed(0)
        model = WanTransformer3DModel(**config, num_layers=layers).eval()
        return counted(lambda: model(hidden_states=torch.randn(1, 8, *latent),
                                     timestep=torch.tensor([500.0]),
                                     encoder_hidden_states=torch.randn(1, TEXT, 24),
                                     return_dict=False))

    per_block = forward(2) - forward(1)
    assert per_block == forward_flops(tokens, 32, 80, 1, text=TEXT)


def test_text_encoder_layer_formula_matches_the_counted_flops():
    from transformers import UMT5Config, UMT5EncoderModel

    config = dict(vocab_size=64, d_model=32, d_kv=8, num_heads=3, d_ff=48,
                  feed_forward_proj="gated-gelu", relative_attention_num_buckets=8)

    def forward(layers: int) -> int:
        torch.manual_seed(0)
        model = UMT5EncoderModel(UMT5Config(**config, num_layers=layers)).eval()
        return counted(lambda: model(input_ids=torch.ones(1, TEXT, dtype=torch.long)))

    per_layer = forward(2) - forward(1)
    assert per_layer == text_encoder_flops({**config, "num_layers": 1}, tokens=TEXT)
