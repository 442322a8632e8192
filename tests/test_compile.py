"""Regional compilation (`--compile regional`, wanserve/engine/model/compiled_blocks.py): the
compiled blocks give the eager video, on one rank and under Ulysses 2 with the step cache, and
after the warm-up a new size does not compile again for every request.

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
# new size again. Their token counts divide by 2: a size xfuser pads under Ulysses compiles its
# own graphs once (wanserve/engine/model/compiled_blocks.py), which this file cannot afford.
REQUESTS = [
    {"width": 128, "height": 128, "seed": 1, "num_inference_steps": 4},
    {"width": 160, "height": 96, "seed": 2, "num_inference_steps": 8, "cache": "fast"},
    {"width": 96, "height": 160, "seed": 3, "num_inference_steps": 8, "cache": "fast"},
    {"width": 160, "height": 96, "seed": 2, "num_inference_steps": 8, "cache": "fast"},
]
LAYOUTS = {"one-rank": (1, ()), "U2": (2, ("--ulysses", "2"))}


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
