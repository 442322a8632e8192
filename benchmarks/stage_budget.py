"""A stage budget for Wan2.2-I2V-A14B at 832x480 x 81 frames, 4 steps and 40 steps, on 1 and on
8 GPUs: seconds per stage from FLOP counts of the published configurations and a stated GPU
throughput. Nothing runs at A14B size; no GPU figure here is measured.

    .venv/bin/python benchmarks/stage_budget.py [--json out.json] [--no-cpu-timing]

1. FLOPs. The transformer forward by the matmul formula gpu_served.py prints, checked against a
   count of the published module on fake tensors; the UMT5-XXL encoder at 512 tokens and the
   Wan2.1 VAE (the encode of the 81-frame condition video, the decode of 21 latent frames)
   counted on fake tensors at full size, op by op: FLOPs of the ops torch has a formula for
   (matmuls, convolutions, attention) and the bytes every other op reads and writes.
2. Measured on this CPU: the real-layout VAE (random weights, the server's CPU kernels) encoding
   and decoding at two cut sizes, counted the same way, for CPU-seconds per GFLOP (process time,
   so that other users of a shared machine count less), scaled to full size by the FLOPs; and a
   float32 matmul, for what this CPU's matmuls reach.
3. The budget: FLOPs / (GPUs x peak x utilisation), the VAE's other ops at HBM bandwidth,
   Ulysses' all-to-alls over NVLink, the decoded video over PCIe and the MP4 encode measured on
   the CPU (BENCHMARKS.md). Every assumption is in `GpuAssumptions` with where it comes from.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_served import TEXT_TOKENS, forward_flops, video_tokens  # noqa: E402

from wanserve.engine.model.fake_trace import fake_module  # noqa: E402
from wanserve.engine.model.model_layouts import WAN22_I2V_A14B  # noqa: E402

WIDTH, HEIGHT, FRAMES = 832, 480, 81
# steps -> guidance: the 4-step distilled presets run without CFG, the official 40 steps with it
GUIDANCE = {4: 1.0, 40: 3.5}
GB = 1e9
# the CPU kernel F.scaled_dot_product_attention reaches on fake CPU tensors; torch's counter has
# formulas only for the GPU kernels
_CPU_ATTENTION = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


@dataclass(frozen=True)
class GpuAssumptions:
    """What turns FLOPs and bytes into GPU seconds. None of it is measured here."""

    # H100 SXM dense bf16, the vendor's figure; large matmuls reach about 790 (0.8 of it)
    peak_bf16: float = 989e12
    # dense TF32, half of bf16 (vendor): the float32 VAE's convolutions run on it, since torch
    # leaves torch.backends.cudnn.allow_tf32 on
    peak_tf32: float = 494.7e12
    # of peak, for matmuls, attention and convolutions. Published whole-pipeline times imply at
    # least 0.41 (Wan2.2, 40 steps, 1xH100, 327.8 s) and 0.49 (vLLM-Omni, 4 steps with CFG,
    # 1xH100, 27.6 s) at this script's FLOP count (see `implied_utilisation`)
    utilisation: float = 0.5
    hbm_bytes_per_s: float = 3.35e12  # H100 SXM HBM3, vendor: the VAE's elementwise ops
    nvlink_bytes_per_s: float = 450e9  # per direction; BENCHMARKS.md "What the FLOP count predicts"
    # decoded video to rank 0's host: PCIe Gen5 x16 is 64 GB/s a direction; pageable copies get
    # well under it
    pcie_bytes_per_s: float = 25e9
    # the inactive expert in from pinned host memory (an estimate for H200, not a measurement)
    expert_swap_bytes_per_s: float = 50e9


# Measured on a CPU, BENCHMARKS.md "MP4 encoder presets" (832x480x81, crf 18, idle machine)
MP4_VERYFAST_S = 1.2
MP4_MEDIUM_S = (3.4, 4.3)
# libx264 veryfast holds back its lookahead (10 frames) and B-frames: what is left to encode once
# the last chunk is decoded (BENCHMARKS.md "Encode while decoding")
MP4_FRAMES_LEFT_AFTER_DECODE = 14
# a gloo all-to-all of 3.9 MB took 1.43-1.53 ms between two ranks of this VM (BENCHMARKS.md
# "Shared memory instead of gloo"): the rate a replica's leader sends rank 0 its video at
GLOO_LOOPBACK_BYTES_PER_S = 3.9e6 / 1.5e-3
# Wan2.2-I2V-A14B 480p x 81f on H100 as Wan2.2 and vLLM-Omni publish it: seconds, GPUs, forwards
PUBLISHED = {"Wan2.2 official, 40 steps CFG": (327.8, 1, 80), "the same on 8 GPUs": (52.9, 8, 80),
             "vLLM-Omni, 4 steps CFG": (27.6, 1, 8)}


class OpCosts(TorchDispatchMode):
    """Per op, on fake tensors: FLOPs by torch's own formulas (flop_counter's registry, plus the
    CPU attention kernel) and the bytes read and written by every op that has no formula (views
    move nothing)."""

    def __init__(self):
        super().__init__()
        self.flops = self.attention_flops = self.memory_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.overloadpacket is _CPU_ATTENTION:
            flops = sdpa_flop_count(args[0].shape, args[1].shape, args[2].shape)
            self.flops += flops
            self.attention_flops += flops
        elif func.overloadpacket in flop_registry:
            self.flops += flop_registry[func.overloadpacket](*args, out_val=out, **kwargs)
        elif not func.is_view:
            tensors = [t for t in tree_flatten((args, kwargs, out))[0]
                       if isinstance(t, torch.Tensor)]
            self.memory_bytes += sum(t.numel() * t.element_size() for t in tensors)
        return out

    def as_dict(self) -> dict:
        return {"flops": self.flops, "attention_flops": self.attention_flops,
                "memory_bytes": self.memory_bytes}


def _costs_of(build, run) -> dict:
    """`run(module)` on fake tensors, `build()`'s module given fake storage."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    module = fake_module(build, fake)
    counter = OpCosts()
    with fake, counter, torch.no_grad():
        run(module)
    return counter.as_dict()


def transformer_flops_counted(config: dict, latent: tuple[int, int, int]) -> dict:
    """One forward of the published transformer on fake tensors: the blocks and the rest
    (embeddings, output head) from one- and two-block models."""
    from diffusers import WanTransformer3DModel

    frames, height, width = latent

    def forward(layers: int) -> int:
        def build():
            return WanTransformer3DModel.from_config({**config, "num_layers": layers}).to(
                torch.bfloat16)

        def run(model):
            model(hidden_states=torch.empty(1, config["in_channels"], frames, height, width,
                                            dtype=torch.bfloat16),
                  timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.empty(1, TEXT_TOKENS, config["text_dim"],
                                                    dtype=torch.bfloat16),
                  return_dict=False)
        return _costs_of(build, run)["flops"]

    one, two = forward(1), forward(2)
    block = two - one
    return {"per_block": block, "outside_blocks": one - block,
            "forward": one - block + config["num_layers"] * block}


def text_encoder_flops(config: dict, tokens: int = TEXT_TOKENS) -> float:
    """UMT5 encoder matmuls: q, k, v, o projections, scores and values, gated-GELU FFN."""
    inner = config["num_heads"] * config["d_kv"]
    d, ff = config["d_model"], config["d_ff"]
    per_layer = (8 * tokens * d * inner + 4 * tokens * tokens * inner + 6 * tokens * d * ff)
    return float(config["num_layers"] * per_layer)


def text_encoder_flops_counted(config: dict, tokens: int = TEXT_TOKENS) -> float:
    from transformers import UMT5Config, UMT5EncoderModel

    def run(model):
        model(input_ids=torch.zeros(1, tokens, dtype=torch.long),
              attention_mask=torch.ones(1, tokens, dtype=torch.long))
    return _costs_of(lambda: UMT5EncoderModel(UMT5Config(**config)).to(torch.bfloat16),
                     run)["flops"]


def vae_costs(config: dict, width: int, height: int, frames: int,
              dtype: torch.dtype = torch.float32) -> dict:
    """The VAE's encode of a `frames`-frame video (the I2V condition: the image, then zeros)
    and its decode of the latents, counted on fake tensors."""
    from wanserve.engine.model.memory_plan import build_vae

    latent_frames = (frames - 1) // 4 + 1
    costs = {}
    for stage in ("encode", "decode"):
        def run(vae, stage=stage):
            if stage == "encode":
                vae.encode(torch.empty(1, 3, frames, height, width, dtype=dtype))
            else:
                vae.decode(torch.empty(1, config["z_dim"], latent_frames, height // 8,
                                       width // 8, dtype=dtype), return_dict=False)
        costs[stage] = _costs_of(lambda: build_vae(config, dtype), run)
    return costs


def matmul_flops_per_cpu_s(n: int = 1024, repeats: int = 5) -> float:
    """This CPU's float32 n^3 matmul FLOPs per CPU-second (process time, every thread), the
    median of `repeats` after one warm-up: on a shared machine the wall clock also counts the
    other users' turns."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    times = []
    for i in range(repeats + 1):
        start = time.process_time()
        torch.mm(a, b)
        if i:
            times.append(time.process_time() - start)
    return 2 * n**3 / statistics.median(times)


def time_vae_on_cpu(config: dict, sizes: list[tuple[int, int, int]]) -> list[dict]:
    """The real-layout VAE (random float32 weights, the server's CPU kernels) encoding a smooth
    scene and decoding its latents at each (width, height, frames): wall and CPU seconds (process
    time, every thread) and CPU-seconds per GFLOP."""
    from diffusers import AutoencoderKLWan

    from encode_while_decoding import smooth_scene
    from wanserve.engine.cpu.vae_kernels import use_fast_cpu_kernels
    from wanserve.engine.model.materialise import materialise

    vae = materialise(lambda: AutoencoderKLWan(**config), torch.float32, torch.device("cpu"),
                      seed=0)
    use_fast_cpu_kernels(vae)
    rows = []
    for width, height, frames in sizes:
        counted = vae_costs(config, width, height, frames)
        scene = smooth_scene(frames, height, width)
        with torch.no_grad():
            encode = _timed(lambda: vae.encode(scene).latent_dist.mode())
            decode = _timed(lambda: vae.decode(encode["result"], return_dict=False))
        for stage, timed in (("encode", encode), ("decode", decode)):
            gflop = counted[stage]["flops"] / 1e9
            rows.append({"size": f"{width}x{height}x{frames}", "stage": stage,
                         "wall_s": timed["wall_s"], "cpu_s": timed["cpu_s"], "gflop": gflop,
                         "cpu_s_per_gflop": timed["cpu_s"] / gflop})
    return rows


def _timed(run) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    return {"result": result, "wall_s": time.perf_counter() - wall,
            "cpu_s": time.process_time() - cpu}


def implied_utilisation(flops_per_forward: float, peak: float) -> dict:
    """The utilisation published whole-pipeline times imply at least (everything but the
    transformer counted as transformer time)."""
    return {name: forwards * flops_per_forward / (seconds * gpus * peak)
            for name, (seconds, gpus, forwards) in PUBLISHED.items()}


@dataclass(frozen=True)
class Counts:
    tokens: int
    layers: int
    dim: int
    forward_flops: float
    text_flops: float
    vae: dict  # encode / decode: flops, attention_flops, memory_bytes (float32 VAE)
    video_bytes_float32: int
    expert_bytes: float


def vae_seconds(costs: dict, gpus: int, a: GpuAssumptions, dtype: str = "float32") -> float:
    """Convolutions at the utilisation of the dtype's peak, split over the ranks by rows; the
    mid-block attention in full on every rank (distvae); the other ops at HBM bandwidth."""
    peak = a.peak_tf32 if dtype == "float32" else a.peak_bf16
    bytes_scale = 1.0 if dtype == "float32" else 0.5
    split = costs["flops"] - costs["attention_flops"]
    compute = (split / gpus + costs["attention_flops"]) / (peak * a.utilisation)
    return compute + costs["memory_bytes"] * bytes_scale / gpus / a.hbm_bytes_per_s


def ulysses_seconds(c: Counts, gpus: int, forwards: int, a: GpuAssumptions) -> float:
    """q, k, v and the output through all-to-alls in every layer of every forward."""
    if gpus == 1:
        return 0.0
    per_layer = 4 * (c.tokens / gpus) * c.dim * 2 * (gpus - 1) / gpus  # bf16 bytes a GPU sends
    return forwards * c.layers * per_layer / a.nvlink_bytes_per_s


def budget(c: Counts, steps: int, gpus: int, a: GpuAssumptions,
           vae_dtype: str = "float32") -> dict:
    """Seconds per stage of one request (Ulysses over `gpus`, VAE sharded by rows, both experts
    resident), the critical path and the stage that bounds it."""
    forwards = steps * (2 if GUIDANCE[steps] > 1 else 1)  # CFG: a negative branch too
    transformer = (forwards * c.forward_flops / (gpus * a.peak_bf16 * a.utilisation)
                   + ulysses_seconds(c, gpus, forwards, a))
    decode = vae_seconds(c.vae["decode"], gpus, a, vae_dtype)
    frames_to_host = c.video_bytes_float32 / a.pcie_bytes_per_s
    # the MP4 is encoded on its own thread while the VAE decodes: what follows the decode is
    # the encoder's lookahead, or the rest of an encode slower than the decode
    mp4_after_decode = max(MP4_VERYFAST_S * MP4_FRAMES_LEFT_AFTER_DECODE / FRAMES,
                           MP4_VERYFAST_S - decode)
    stages = {
        "text encode (prompt cache miss)": c.text_flops / (a.peak_bf16 * a.utilisation),
        "VAE encode (81-frame condition)": vae_seconds(c.vae["encode"], gpus, a, vae_dtype),
        "transformer forwards": transformer,
        "VAE decode": decode,
        "frames to host (float32)": frames_to_host,
        "MP4 after the decode": mp4_after_decode,
    }
    bound = max(stages, key=stages.get)
    return {"steps": steps, "gpus": gpus, "forwards": forwards, "stages": stages,
            "total": sum(stages.values()), "bound": bound,
            "transformer_comm": ulysses_seconds(c, gpus, forwards, a)}


def what_the_items_changed(c: Counts, a: GpuAssumptions, gpus: int,
                           cpu_matmul_flops_per_cpu_s: float | None) -> dict:
    """The six stage changes (encode while decoding and its preset, the prompt cache, uint8
    frames, a bfloat16 VAE, streamed fMP4) on the 4-step video, before and after."""
    four = budget(c, 4, gpus, a)
    bf16 = budget(c, 4, gpus, a, vae_dtype="bfloat16")
    s, half = four["stages"], bf16["stages"]
    decode = s["VAE decode"]
    uint8_bytes = c.video_bytes_float32 // 4
    latent_frames = (FRAMES - 1) // 4 + 1
    # the first fragment can leave once the encoder is past its lookahead and B-frames: 13
    # frames, the first 4 decoder calls (1 + 4 + 4 + 4)
    first_fragment_frames = 13
    first_calls = (first_fragment_frames - 1) // 4 + 1
    before_decode = sum(s[stage] for stage in ("text encode (prompt cache miss)",
                                               "VAE encode (81-frame condition)",
                                               "transformer forwards"))
    first_fragment = (before_decode + decode * first_calls / latent_frames
                      + MP4_VERYFAST_S * first_fragment_frames / FRAMES)
    items = {
        "1+2 MP4 on the critical path (s)": {
            "before: medium, after the decode": MP4_MEDIUM_S,
            "after: veryfast, while decoding": s["MP4 after the decode"]},
        "3 text encode on a cache hit (s)": {
            "miss, encoder on the GPU": s["text encode (prompt cache miss)"],
            "hit": 0.0},
        "4 frames across ranks (bytes)": {"float32": c.video_bytes_float32,
                                          "uint8": uint8_bytes},
        "4 leader to rank 0 over gloo (s)": {
            "float32, after the decode": c.video_bytes_float32 / GLOO_LOOPBACK_BYTES_PER_S,
            "uint8 chunks while decoding, last chunk after":
                uint8_bytes / latent_frames / GLOO_LOOPBACK_BYTES_PER_S},
        "4 decoded video to the host (s)": {
            "float32": c.video_bytes_float32 / a.pcie_bytes_per_s,
            "uint8": uint8_bytes / a.pcie_bytes_per_s},
        "5 VAE encode + decode (s)": {
            "float32 (TF32)": s["VAE encode (81-frame condition)"] + decode,
            "bfloat16": half["VAE encode (81-frame condition)"] + half["VAE decode"]},
        # a shorter decode leaves more of the MP4 encode after it
        "5 the whole video (s)": {"float32 (TF32)": four["total"],
                                  "bfloat16": bf16["total"]},
        "6 time to first frame (s)": {"whole MP4 at the end": four["total"],
                                      "fMP4 fragments while decoding": first_fragment},
    }
    if cpu_matmul_flops_per_cpu_s:
        text = items["3 text encode on a cache hit (s)"]
        text["miss, this VM's CPU (CPU-s at its matmul rate)"] = (c.text_flops
                                                                  / cpu_matmul_flops_per_cpu_s)
    return items


def count_all() -> Counts:
    layout = WAN22_I2V_A14B
    t = layout.transformer
    dim = t["num_attention_heads"] * t["attention_head_dim"]
    tokens = video_tokens(WIDTH, HEIGHT, FRAMES)
    expert_params = sum(p.numel() for p in _meta_expert(t).parameters())
    return Counts(tokens=tokens, layers=t["num_layers"], dim=dim,
                  forward_flops=forward_flops(tokens, dim, t["ffn_dim"], t["num_layers"]),
                  text_flops=text_encoder_flops(layout.text_encoder),
                  vae=vae_costs(layout.vae, WIDTH, HEIGHT, FRAMES),
                  video_bytes_float32=3 * FRAMES * HEIGHT * WIDTH * 4,
                  expert_bytes=2.0 * expert_params)


def _meta_expert(config: dict):
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        return WanTransformer3DModel.from_config(config)


def _figure(value) -> str:
    if isinstance(value, tuple):
        return "-".join(f"{v:.2f}" for v in value)
    if isinstance(value, int):
        return f"{value / 1e6:.0f} MB"
    return f"{value:.3f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--no-cpu-timing", action="store_true", help="FLOP counts only")
    p.add_argument("--utilisation", type=float, default=GpuAssumptions.utilisation)
    p.add_argument("--cut-sizes", default="64x64x5,128x64x5",
                   help="WxHxF sizes the VAE is timed at on this CPU")
    args = p.parse_args()
    a = GpuAssumptions(utilisation=args.utilisation)
    layout = WAN22_I2V_A14B
    start = time.perf_counter()
    c = count_all()
    latent = ((FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)
    traced = transformer_flops_counted(layout.transformer, latent)
    text_traced = text_encoder_flops_counted(layout.text_encoder)
    print(f"Wan2.2-I2V-A14B, {WIDTH}x{HEIGHT}x{FRAMES}: {c.tokens} tokens "
          f"(latent {latent[0]}x{latent[1]}x{latent[2]}); counted in "
          f"{time.perf_counter() - start:.1f} s on fake tensors")
    print(f"  transformer forward {c.forward_flops:.4e} FLOP by the formula, "
          f"{traced['forward']:.4e} counted ({traced['forward'] / c.forward_flops:.4f}x; "
          f"outside the blocks {traced['outside_blocks']:.3e})")
    print(f"  text encoder {c.text_flops:.4e} FLOP by the formula, {text_traced:.4e} counted")
    for stage, costs in c.vae.items():
        print(f"  VAE {stage} {costs['flops']:.4e} FLOP (attention {costs['attention_flops']:.3e}),"
              f" other ops move {costs['memory_bytes'] / GB:.1f} GB (float32)")
    implied = implied_utilisation(c.forward_flops, a.peak_bf16)
    print("  utilisation implied at least by published times: "
          + "; ".join(f"{name} {value:.2f}" for name, value in implied.items()))

    cpu = {}
    if not args.no_cpu_timing:
        sizes = [tuple(int(v) for v in size.split("x")) for size in args.cut_sizes.split(",")]
        cpu["matmul_gflop_per_cpu_s"] = matmul_flops_per_cpu_s() / 1e9
        cpu["vae"] = time_vae_on_cpu(layout.vae, sizes)
        print(f"This CPU ({torch.get_num_threads()} torch threads), per CPU-second (process "
              f"time): float32 matmul {cpu['matmul_gflop_per_cpu_s']:.1f} GFLOP")
        for row in cpu["vae"]:
            rate = 1 / row["cpu_s_per_gflop"]
            row["full_size_cpu_s"] = c.vae[row["stage"]]["flops"] / 1e9 * row["cpu_s_per_gflop"]
            print(f"  VAE {row['stage']} {row['size']}: {row['wall_s']:.2f} s wall, "
                  f"{row['cpu_s']:.2f} CPU-s, {row['gflop']:.1f} GFLOP: "
                  f"{row['cpu_s_per_gflop'] * 1e3:.1f} CPU-ms/GFLOP ({rate:.1f} GFLOP per CPU-s, "
                  f"{rate / cpu['matmul_gflop_per_cpu_s']:.2f} of the matmul's) -> full size "
                  f"{row['full_size_cpu_s']:.0f} CPU-s")

    budgets = [budget(c, steps, gpus, a) for steps in GUIDANCE for gpus in (1, 8)]
    print(f"\nGPU seconds from FLOPs (not measured): H100 SXM, bf16 peak {a.peak_bf16 / 1e12:.0f}"
          f" TFLOP/s (TF32 {a.peak_tf32 / 1e12:.0f} for the float32 VAE) at utilisation "
          f"{a.utilisation}; Ulysses over the GPUs, VAE sharded by rows")
    header = "".join(f"{'%d steps, %d GPU' % (b['steps'], b['gpus']):>18}" for b in budgets)
    print(f"{'stage':<34}{header}")
    for stage in budgets[0]["stages"]:
        print(f"{stage:<34}" + "".join(f"{b['stages'][stage]:>18.3f}" for b in budgets))
    print(f"{'total (one after another)':<34}" + "".join(f"{b['total']:>18.2f}" for b in budgets))
    print(f"{'bound by':<34}" + "".join(f"{b['bound'][:17]:>18}" for b in budgets))
    swap = c.expert_bytes / a.expert_swap_bytes_per_s
    print(f"not in the totals: with --offload-inactive-expert (1 GPU) two expert swaps of "
          f"{c.expert_bytes / GB:.1f} GB a request, {swap:.2f} s each")
    items = {gpus: what_the_items_changed(c, a, gpus, cpu.get("matmul_gflop_per_cpu_s", 0) * 1e9)
             for gpus in (1, 8)}
    print("\nWhat the six stage changes do to the 4-step video (1 GPU | 8 GPUs)")
    for item, values in items[1].items():
        for label, value in values.items():
            both = [items[g][item][label] for g in (1, 8)]
            shown = " | ".join(_figure(v) for v in both)
            print(f"  {item:<36} {label:<50} {shown}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "shape": f"{WIDTH}x{HEIGHT}x{FRAMES}", "counts": asdict(c),
            "transformer_counted": traced, "text_encoder_counted": text_traced,
            "assumptions": asdict(a), "implied_utilisation": implied, "cpu": cpu,
            "budgets": budgets, "items": items}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
