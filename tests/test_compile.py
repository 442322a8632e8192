"""Regional compilation (`--compile regional`, wanserve/engine/model/compiled_blocks.py): the
compiled blocks give the eager video, on one rank and under Ulysses 2 with the step cache, and
after the warm-up a new size does not compile again for every request. Under ring attention
with CFG parallel and a per-request adapter, a padded size and the adapter were compiled in the
warm-up, so no request compiles again, and the video is the eager one.

Float frames from `run_offline` (the engine under torchrun, no HTTP); torch's inductor (the
default backend) compiles on the CPU with the system's C++ compiler. One job per layout,
shared by the tests (one warm-up compile each); the one-rank job also runs every request
eagerly after the compiled ones (`"eager": true`: the same modules with
`torch.compiler.set_stance("force_eager")`), the reference of both layouts. checked with: see
each test and tests/README.md.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import run_offline
from test_multirank_equivalence import TOLERANCE

# the warm-up's size (configs/tiny.yaml: pixel_area 128x128); two new sizes, cached; the first
# new size again. Their token counts divide by 2; padded sizes are COMPOSED's (below).
REQUESTS = [
    {"width": 128, "height": 128, "seed": 1, "num_inference_steps": 4},
    {"width": 160, "height": 96, "seed": 2, "num_inference_steps": 8, "cache": "fast"},
    {"width": 96, "height": 160, "seed": 3, "num_inference_steps": 8, "cache": "fast"},
    {"width": 160, "height": 96, "seed": 2, "num_inference_steps": 8, "cache": "fast"},
]
LAYOUTS = {"one-rank": (1, ()), "U2": (2, ("--ulysses", "2"))}

# ring 2 x CFG 2 with adapter `a` registered: the default size, a size the ring pads (5 x 7 x 9
# tokens), the adapter at both, and the base model again; then each eagerly in the same job.
# Backend `eager` (dynamo's graphs run as traced): what composes or not - graph breaks at the
# ring's exchanges, guards on the adapters, recompiles - is dynamo's, and inductor's numerics
# are the other layouts' test; it keeps this four-rank job to a minute and a half.
COMPOSED = [
    {"width": 128, "height": 128, "seed": 1, "num_inference_steps": 4},
    {"width": 144, "height": 112, "seed": 2, "num_inference_steps": 4},
    {"width": 128, "height": 128, "seed": 1, "num_inference_steps": 4, "lora": "a"},
    {"width": 144, "height": 112, "seed": 2, "num_inference_steps": 4, "lora": "a:0.5"},
    {"width": 128, "height": 128, "seed": 3, "num_inference_steps": 4},
]


EAGER = [{**spec, "eager": True} for spec in REQUESTS]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """layout -> (frames, report) of REQUESTS compiled (and on one rank, then EAGER), each
    layout run once, when a test first asks for it."""
    runs = {}

    def run(layout: str):
        if layout not in runs:
            nproc, flags = LAYOUTS[layout]
            specs = REQUESTS + EAGER if layout == "one-rank" else REQUESTS
            runs[layout] = run_offline(tmp_path_factory.mktemp(f"compiled-{layout}"), nproc,
                                       specs, "--compile", "regional", *flags)
        return runs[layout]

    return run


@pytest.mark.parametrize("layout", LAYOUTS)
def test_compiled_equals_eager(compiled, layout):
    """Within the layouts' own float tolerance of the eager one-rank video, the step cache's
    skipped steps included. checked with: the self-attention output scaled by 1.001 only
    while compiling (`attn_output * 1.001 if torch.compiler.is_compiling() else attn_output`
    in diffusers' WanTransformerBlock.forward): one rank, max |diff| 3.3e-5 > 1e-5."""
    frames, report = compiled(layout)
    eager_frames, eager_report = compiled("one-rank")
    assert report["compile"]["policy"] == "regional"
    assert report["compile"]["warmup"]["compiles"] >= 1  # the blocks really were compiled
    for index in range(len(REQUESTS)):
        key, eager_index = f"frames_{index}", len(REQUESTS) + index
        assert report["runs"][index]["cache"] == eager_report["runs"][eager_index]["cache"]
        diff = float(np.abs(frames[key] - eager_frames[f"frames_{eager_index}"]).max())
        assert diff <= TOLERANCE, f"{layout} {key}: max |diff| {diff:.2e}"
    assert report["runs"][1]["cache"]["cached"] == {"high": 1, "low": 2}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_new_size_after_warmup_does_not_recompile_per_request(compiled, layout):
    """Compiles counted by torch._dynamo's compile callbacks: none after the warm-up, for its
    size, two new sizes (dynamic shapes) and a repeat.
    checked with: duck sizing left on (`use_duck_shape = False` removed from
    CompiledBlocks.__init__): the first non-square size recompiled, [0, 2, 2, 2] on one rank
    and under U2."""
    frames, report = compiled(layout)
    recompiles = [run["recompiles"] for run in report["runs"][:len(REQUESTS)]]
    assert recompiles == [0, 0, 0, 0], recompiles
    assert np.array_equal(frames["frames_3"], frames["frames_1"])


def test_compile_is_configured_and_refused_with_sharded_weights():
    """The `compile:` section and `--compile`; refused at start-up with --shard-weights (FSDP2's
    blocks are another class, its hooks would be traced). checked with: `check_combination`
    returning at once: the sharded compiled config loaded."""
    from wanserve.engine.config import load_config

    assert load_config([]).compile.policy == "off"
    cfg = load_config(["--compile", "regional", "--set", "compile.dynamic=false"])
    assert (cfg.compile.policy, cfg.compile.backend, cfg.compile.dynamic) == (
        "regional", "inductor", False)
    assert load_config(["--set", "compile=regional"]).compile.policy == "regional"
    with pytest.raises(SystemExit, match="cannot run with --shard-weights"):
        load_config(["--compile", "regional", "--ulysses", "2", "--shard-weights"])
    for bad, fragment in (("compile.policy=full", "compile.policy"),
                          ("compile.mode=fastest", "compile.mode"),
                          ("compile.dynamic=maybe", "compile.dynamic"),
                          ("compile.fullgraph=true", "unknown key")):
        with pytest.raises(SystemExit, match=fragment):
            load_config(["--set", bad])


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    """(frames, report) of COMPOSED compiled, then eagerly, on ring 2 x CFG 2 with adapter a."""
    from lora_files import make_lora, write_diffusers
    from wanserve.engine.model.tiny_model import ensure_tiny_model

    root = tmp_path_factory.mktemp("compiled-R2C2")
    lora = write_diffusers(make_lora(ensure_tiny_model(), 1), root / "a.safetensors")
    specs = COMPOSED + [{**spec, "eager": True} for spec in COMPOSED]
    return run_offline(root, 4, specs, "--compile", "regional", "--set", "compile.backend=eager",
                       "--ring", "2", "--cfg", "2", "--lora", f"a={lora}")


def test_compile_composes_with_ring_cfg_parallel_and_adapters(composed):
    """The warm-up ran the padded size and the adapter; no request compiled after it, and each
    compiled video equals the same request run eagerly in the job.
    checked with: `adapter_sets` returning only the default (wanserve/engine/serving/warmup.py):
    the adapter's first requests compiled, recompiles [0, 0, 2, 8, 8]; the padded size left out
    of the warm-up (`if sp_degree > 1:` → `if False:`): [0, 11, 11, 17, 17]; the
    self-attention output scaled by 1.001 only while compiling (diffusers' WanTransformerBlock):
    max |diff| 3.3e-5 > 1e-5."""
    frames, report = composed
    warmup = report["compile"]["warmup"]
    assert report["layout"].startswith("U1R2C2"), report["layout"]
    recompiles = [run["recompiles"] for run in report["runs"][:len(COMPOSED)]]
    assert recompiles == [0] * len(COMPOSED), recompiles
    assert (warmup["sizes"], warmup["adapters"]) == (["128x128", "112x112"], ["none", "a"])
    for index in range(len(COMPOSED)):
        eager = frames[f"frames_{len(COMPOSED) + index}"]
        diff = float(np.abs(frames[f"frames_{index}"] - eager).max())
        assert diff <= TOLERANCE, f"request {index}: max |diff| {diff:.2e}"
    # the adapter really changed the video
    assert np.abs(frames["frames_2"] - frames["frames_0"]).max() > 1e-2


def test_a_fused_default_adapter_warms_up_fused(tmp_path):
    """A fused default adapter (merged into the weights, the LoRA layers unloaded): the warm-up
    runs with it, as every request will, and the compiled video equals the eager one.
    checked with: the warm-up's adapters `()` instead of `resolve_lora(None, cfg)` (what it ran
    before, wanserve/engine/serving/warmup.py `adapter_sets`): the engine did not start, "the
    fused default adapter cannot be changed"."""
    from lora_files import make_lora, write_diffusers
    from wanserve.engine.model.tiny_model import ensure_tiny_model

    lora = write_diffusers(make_lora(ensure_tiny_model(), 1), tmp_path / "f.safetensors")
    spec = {"width": 128, "height": 128, "seed": 1, "num_inference_steps": 4}
    frames, report = run_offline(tmp_path, 1, [spec, {**spec, "eager": True}],
                                 "--compile", "regional", "--set", "compile.backend=eager",
                                 "--set", f"loras.f.path={lora}", "--set", "loras.f.fuse=true")
    assert report["adapters"]["fused"] == ["f"]
    assert report["compile"]["warmup"]["adapters"] == ["f"]
    assert [run["recompiles"] for run in report["runs"]] == [0, 0]
    assert np.array_equal(frames["frames_0"], frames["frames_1"])
