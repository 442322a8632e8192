"""The step cache (cache-dit on both experts, wanserve/engine/model/step_cache.py): exact when
it computes every step, skipping steps where asked, the same on every layout and replica,
configured and asked for like every other field, and reported.

Float frames from `run_offline` (the engine under torchrun, no HTTP) for the layouts; real
servers for the API, the report, /metrics and the replicas. The tiny model's presets are in
configs/tiny.yaml (2 blocks per expert: Fn 1, Bn 0). checked with: see each test and
tests/README.md.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import requests

from conftest import assert_client_error, metric, png_bytes, run_offline, start_server
from test_multirank_equivalence import TOLERANCE
from test_replicas import busy_together, frames_of, wait_done

# consecutive requests of different sizes and step counts (8: 3 high + 5 low steps; 12: 4 + 8)
CACHED = [
    {"width": 128, "height": 128, "seed": 1, "num_inference_steps": 8, "cache": "fast"},
    {"width": 144, "height": 112, "seed": 2, "image_seed": 3, "num_inference_steps": 12,
     "cache": {"preset": "balanced", "low": {"mask": "1100"}}},
    {"width": 128, "height": 128, "seed": 3, "num_inference_steps": 8, "cache": "quality"},
]
ALL_ONES = {"high": {"mask": "1"}, "low": {"mask": "1"}}


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """CACHED, then the first request uncached, with `cache: off`, with an all-ones mask, and
    at guidance 1 with a preset; on one rank."""
    first = {k: v for k, v in CACHED[0].items() if k != "cache"}
    extra = [first, {**first, "cache": "off"}, {**first, "cache": ALL_ONES},
             {**first, "guidance_scale": 1.0, "cache": "fast"}]
    return run_offline(tmp_path_factory.mktemp("cache1"), 1, CACHED + extra)


def test_off_and_an_all_ones_mask_equal_the_uncached_video(tmp_path, one_rank):
    """checked with: the all-compute mask of an uncached request given a 0 (`ExpertCache("1", 0)`
    → `ExpertCache("10", 0)` in StepCache.prepare): the request without `cache` differed from
    the server without cache-dit."""
    frames, report = one_rank
    plain, _ = run_offline(tmp_path, 1, [{k: v for k, v in CACHED[0].items() if k != "cache"}],
                           "--set", "cache.policy=off")
    reference = plain["frames_0"]
    for index in (3, 4, 5):  # no cache field (default off), "off", all ones
        assert np.array_equal(frames[f"frames_{index}"], reference), index
        cache = report["runs"][index]["cache"]
        assert cache["cached"] == {"high": 0, "low": 0}
        assert cache["computed"] == {"high": 3, "low": 5}
    assert report["runs"][5]["cache"]["preset"] == "custom"
    assert np.abs(frames["frames_0"] - reference).max() > 1e-4  # the cached one is not


def test_a_cached_request_skips_steps_and_returns_its_frames(one_rank):
    """Two consecutive requests of different sizes and step counts, each with its own split.
    checked with: `refresh_context` dropped from StepCache.prepare (the contexts made at
    start-up carry on from request to request): the run failed; by hand, three requests of one
    size reported cached high 5, 11, 17 (the counts carried over)."""
    frames, report = one_rank
    runs = report["runs"]
    assert runs[0]["cache"] == {"policy": "static", "preset": "fast",
                                "computed": {"high": 2, "low": 3}, "cached": {"high": 1, "low": 2}}
    # high: 4 steps, "10" after 2 warm-up steps, the last always computed; low: 8 steps, "1100"
    assert runs[1]["cache"]["computed"] == {"high": 4, "low": 5}
    assert runs[1]["cache"]["cached"] == {"high": 0, "low": 3}
    assert runs[2]["cache"]["cached"] == {"high": 0, "low": 1}
    assert frames["frames_0"].shape == (9, 128, 128, 3)
    assert frames["frames_1"].shape == (9, 112, 144, 3)
    # every step still runs the transformer's first block: a step is cached, not dropped
    assert runs[0]["forwards"] == [2] * 8


def test_guidance_1_is_not_cached_and_says_so(one_rank):
    """The step-distilled path (one forward per step, 2 + 2 steps at 4): the cache does nothing.
    checked with: the `guidance_scale <= 1` test removed from StepCache.prepare_request: the
    request reported cached steps and no note."""
    frames, report = one_rank
    cache = report["runs"][6]["cache"]
    assert cache["cached"] == {"high": 0, "low": 0} and "step-distilled" in cache["note"]


@pytest.mark.parametrize("nproc,flags", [
    (2, ("--ulysses", "2")),
    (2, ("--ring", "2")),
    (2, ("--cfg", "2")),
    (4, ("--ulysses", "2", "--cfg", "2")),
], ids=["U2", "R2", "C2", "U2C2"])
def test_layouts_cached_equal_one_rank_cached(tmp_path, one_rank, nproc, flags):
    """Lossless: the same steps skipped on every rank, the same video as one rank (within the
    layouts' own float tolerance, tests/test_multirank_equivalence.py). checked with: the CFG
    bookkeeping by call parity kept under CFG parallel (`separate_cfg = guidance_scale > 1` in
    StepCache.prepare_request): C2 reported no cached step where one rank cached 1 + 2."""
    frames, report = run_offline(tmp_path, nproc, CACHED, *flags)
    for index in range(len(CACHED)):
        key = f"frames_{index}"
        assert report["runs"][index]["cache"] == one_rank[1]["runs"][index]["cache"]
        diff = float(np.abs(frames[key] - one_rank[0][key]).max())
        assert diff <= TOLERANCE, f"{key}: max |diff| {diff:.2e}"


def test_dynamic_policy_is_refused_with_replicas():
    """checked with: `check_policy` returning at once: the DP2 dynamic config loaded."""
    from wanserve.engine.config import load_config

    with pytest.raises(SystemExit, match="dynamic cannot run with --dp > 1"):
        load_config(["--dp", "2", "--set", "cache.policy=dynamic"])
    assert load_config(["--set", "cache.policy=dynamic"]).cache.policy == "dynamic"


HTTP = {"prompt": "a lantern", "seed": "7", "num_frames": "9", "size": "64x64",
        "quality": "lossless"}
B_CACHE = '{"preset": "balanced", "low": {"mask": "1100"}}'


def test_dp2_two_cached_requests_at_once_equal_one_rank(tmp_path, server):
    """Two different cached requests on two replicas at once (one omits num_inference_steps: the
    replicas' default is 8) equal the one-rank server's videos of the same requests (steps
    stated); the job reports the counts, /metrics counts them, /health names the cache; after
    a cancelled cached job on each replica, the same requests give the same videos.
    checked with: the cache turned off for a request that omits `num_inference_steps`
    (`cache = None if p.num_inference_steps is None else cache` in wanserve/api/params.py
    resolve_request): job a reported preset off, no step cached."""
    srv = start_server(tmp_path, "--dp", "2", "--set", "defaults.num_inference_steps=8",
                       nproc=2, env={"WANSERVE_TEST_STEP_DELAY": "0.3"})
    try:
        health = requests.get(srv.url + "/health", timeout=10).json()
        assert health["step_cache"]["policy"] == "static"
        assert set(health["step_cache"]["presets"]) == {"fast", "balanced", "quality"}
        a = submit(srv, cache="fast")  # num_inference_steps omitted
        b = submit(srv, size="96x64", seed="8", num_inference_steps="12", cache=B_CACHE)
        busy_together(srv, {a, b})
        jobs = {job_id: wait_done(srv, job_id) for job_id in (a, b)}
        assert all(job["status"] == "completed" for job in jobs.values()), jobs
        assert jobs[a]["cache"]["cached"] == {"high": 1, "low": 2}
        assert jobs[b]["cache"]["computed"] == {"high": 4, "low": 5}
        assert metric(srv, 'wanserve_cache_steps_total{expert="low",kind="cached"}') == 2 + 3
        ref_a = submit(server, cache="fast", num_inference_steps="8")
        ref_b = submit(server, size="96x64", seed="8", num_inference_steps="12", cache=B_CACHE)
        for job_id, ref in ((a, ref_a), (b, ref_b)):
            assert wait_done(server, ref)["cache"] == jobs[job_id]["cache"]
            video, reference = frames_of(srv, job_id), frames_of(server, ref)
            assert video.shape == reference.shape and np.array_equal(video, reference)

        # each replica cancels a cached job mid-way; the same two requests again equal the
        # first runs: nothing carried from a cancelled request
        long = [submit(srv, cache="fast", num_inference_steps="40") for _ in range(2)]
        busy_together(srv, set(long))
        deadline = time.monotonic() + 60
        while min(requests.get(f"{srv.url}/v1/videos/{j}", timeout=10).json()["progress"]
                  for j in long) < 10:
            assert time.monotonic() < deadline, srv.log()[-3000:]
            time.sleep(0.1)
        for job_id in long:
            assert requests.delete(f"{srv.url}/v1/videos/{job_id}", timeout=10).status_code == 200
        again = {a: submit(srv, cache="fast"),
                 b: submit(srv, size="96x64", seed="8", num_inference_steps="12", cache=B_CACHE)}
        busy_together(srv, set(again.values()))
        for first, second in again.items():
            assert wait_done(srv, second)["cache"] == jobs[first]["cache"]
            assert np.array_equal(frames_of(srv, second), frames_of(srv, first))
    finally:
        code = srv.stop()
    assert code == 0, srv.log()[-3000:]


@pytest.mark.parametrize("value,fragment", [
    ("turbo", "unknown cache preset"),
    ('{"Fn": 2}', "must leave a block"),
    ('{"high": {"warmup": -1}}', "warmup"),
    ('{"low": {"mask": "12"}}', "mask"),
    ('{"bogus": 1}', "unknown key"),
    ("{not json", "not valid JSON"),
])
def test_an_out_of_range_cache_is_a_400_naming_cache(server, value, fragment):
    """checked with: `_cache_of` not called in resolve_request (wanserve/api/params.py): the
    requests were accepted (202)."""
    resp = requests.post(server.url + "/v1/videos", headers={"Prefer": "respond-async"},
                         data={**HTTP, "cache": value}, timeout=30,
                         files={"input_reference": ("r.png", png_bytes(seed=3), "image/png")})
    error = assert_client_error(resp.status_code, resp.content, value)
    assert error["param"] == "cache" and fragment in error["message"], error


def submit(server, **fields) -> str:
    """An async job; a field given as None is left out of the form."""
    data = {k: v for k, v in {**HTTP, **fields}.items() if v is not None}
    resp = requests.post(server.url + "/v1/videos", headers={"Prefer": "respond-async"},
                         data=data, timeout=60,
                         files={"input_reference": ("r.png", png_bytes(seed=3), "image/png")})
    assert resp.status_code == 202, resp.text
    return resp.json()["id"]


def test_cli_asks_for_a_preset_and_prints_the_counts(server, tmp_path):
    """`wanserve generate --cache fast`; the playground's preset menu comes from the same
    `/v1/models` capabilities. checked with: ("cache", args.cache) left out of the fields
    cmd_generate sends (wanserve/api/cli.py): the job reported preset off."""
    from test_cli import cli

    image = tmp_path / "first.png"
    image.write_bytes(png_bytes())
    proc = cli("generate", str(image), "a lantern", "-o", str(tmp_path / "out.mp4"),
               "--server", server.url, "--size", "64x64", "--steps", "8", "--cache", "fast")
    assert proc.returncode == 0, proc.stderr
    video_id = proc.stdout.split(", ")[1]
    job = requests.get(f"{server.url}/v1/videos/{video_id}", timeout=5).json()
    assert job["cache"]["preset"] == "fast" and job["cache"]["cached"] == {"high": 1, "low": 2}
    assert "step cache fast: computed high 2, low 3; cached high 1, low 2" in proc.stderr
    caps = requests.get(f"{server.url}/v1/models", timeout=5).json()["data"][0]["capabilities"]
    assert caps["cache_presets"] == ["fast", "balanced", "quality"]
    assert caps["cache_default"] == "off"


def test_named_masks_fit_every_step_count():
    """An expert's share of a short request (1, 2, 3, 5, 7 steps) with a named mask: cache-dit
    1.5.3's steps_mask refuses those counts. Found by tests/test_openapi_fuzz.py (a 500).
    checked with: the sampled 28-step mask removed from expert_mask (every count passed to
    steps_mask): AssertionError "Only total_steps=4 or 6 is supported"."""
    from wanserve.engine.model.step_cache import MASK_POLICIES, ExpertCache, expert_mask

    for policy in MASK_POLICIES:
        for steps in range(1, 45):
            mask = expert_mask(ExpertCache(policy, 0), steps)
            assert len(mask) == steps and mask[0] == mask[-1] == 1 and set(mask) <= {0, 1}
    assert expert_mask(ExpertCache("fast", 0), 40).count(0) > 0
