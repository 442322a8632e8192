"""The request parser and resolver, property-tested: any input is either a fully valid
GenerationRequest or an InvalidRequest naming a param, never anything else."""
from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings, strategies as st

from wanserve.api.errors import APIError
from wanserve.api.params import parse_params, resolve_request
from conftest import png_bytes
from wanserve.engine.config import load_config

CFG = load_config([])
IMAGE = png_bytes(96, 64)
FIELDS = ["prompt", "negative_prompt", "model", "size", "width", "height", "num_frames",
          "seconds", "fps", "num_inference_steps", "guidance_scale", "guidance_scale_2",
          "boundary_ratio", "flow_shift", "seed", "lora", "sample_solver", "unknown_field"]
VALUES = st.one_of(
    st.text(max_size=12), st.integers(-10**6, 10**20), st.floats(allow_nan=True),
    st.sampled_from(["", " ", "nan", "inf", "-inf", "1e400", "128x128", "97x64", "0x0", "9",
                     "8", "81", "3.5", "true", "null", "1280x720", "wan2.2-i2v-tiny"]),
    st.none(), st.booleans(), st.lists(st.integers(), max_size=2),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=8), st.booleans())
def test_any_fields_give_a_valid_request_or_a_named_400(fields, with_image):
    try:
        request = resolve_request("job", parse_params(fields), IMAGE if with_image else None, CFG)
    except APIError as exc:
        assert 400 <= exc.status < 500 and exc.message
        assert exc.param is None or exc.param in FIELDS + ["input_reference"]
        return
    lim = CFG.limits
    assert request.prompt.strip()
    assert request.width % 16 == 0 and request.height % 16 == 0
    assert lim.min_side <= min(request.width, request.height)
    assert max(request.width, request.height) <= lim.max_side
    assert request.width * request.height <= lim.max_pixels
    assert request.num_frames % 4 == 1 and request.num_frames <= lim.max_frames
    assert 1 <= request.num_inference_steps <= lim.max_steps
    assert request.image.shape == (request.height, request.width, 3)
    for value in (request.guidance_scale, request.guidance_scale_2, request.boundary_ratio,
                  request.flow_shift):
        assert math.isfinite(value)
    assert 0 <= request.seed < 2**63


def test_seconds_round_to_the_nearest_valid_frame_count():
    for seconds, fps, frames in ((1, 8, 9), (2, 8, 17), (0.5, 8, 5), (4, 12, 49), (3, 10, 29)):
        params = parse_params({"prompt": "p", "seconds": seconds, "fps": fps})
        assert resolve_request("j", params, IMAGE, CFG).num_frames == frames


def test_guidance_scale_2_follows_guidance_scale_unless_given():
    request = resolve_request("j", parse_params({"prompt": "p", "guidance_scale": 5}), IMAGE, CFG)
    assert request.guidance_scale_2 == 5
    request = resolve_request("j", parse_params({"prompt": "p", "guidance_scale": 5,
                                                 "guidance_scale_2": 2}), IMAGE, CFG)
    assert request.guidance_scale_2 == 2


def test_huge_seconds_is_a_named_400():
    """checked with: the `min(...)` cap in _resolve_frames removed (OverflowError: round() of
    inf, a 500 over HTTP)."""
    for seconds in (1e308, 1e200):
        try:
            resolve_request("j", parse_params({"prompt": "p", "seconds": seconds, "fps": 60}),
                            IMAGE, CFG)
        except APIError as exc:
            assert exc.status == 400 and exc.param == "seconds"
        else:
            raise AssertionError(f"seconds={seconds} was accepted")


LIM = CFG.limits
SIDES = [s for s in range(LIM.min_side, LIM.max_side + 1, 16)]


@st.composite
def valid_fields(draw) -> dict:
    """A request inside every limit of the preset, each field across its whole range."""
    width = draw(st.sampled_from(SIDES))
    height = draw(st.sampled_from([s for s in SIDES if width * s <= LIM.max_pixels]))
    fields = {"prompt": draw(st.text(min_size=1, max_size=40).filter(str.strip)),
              "size": f"{width}x{height}",
              "num_inference_steps": draw(st.integers(1, LIM.max_steps)),
              "guidance_scale": draw(st.floats(0, 50)),
              "boundary_ratio": draw(st.floats(0, 1)),
              "flow_shift": draw(st.floats(0.01, 100)),
              "seed": draw(st.integers(0, 2**63 - 1))}
    fps = draw(st.integers(1, LIM.max_fps))
    if draw(st.booleans()):
        fields["num_frames"] = 4 * draw(st.integers(0, (LIM.max_frames - 1) // 4)) + 1
    else:  # seconds at this fps that round to at most max_frames
        fields["seconds"] = draw(st.floats(0.01, LIM.max_frames / fps))
    return {**fields, "fps": fps}


# one field broken on purpose, and the param the 400 must name
BREAKS = {
    "prompt": ["", " " * 3, "x" * (LIM.max_prompt_chars + 1)],
    "size": ["97x64", f"{LIM.max_side + 16}x{LIM.min_side}", "axb", f"{LIM.min_side - 16}x64"],
    "num_inference_steps": [0, LIM.max_steps + 1, "many"],
    "guidance_scale": [-1, 51, "nan"],
    "boundary_ratio": [-0.1, 1.5],
    "flow_shift": [0, 101, "inf"],
    "seed": [-1, 2**63],
    "fps": [0, LIM.max_fps + 1],
    "num_frames": [8, 4 * LIM.max_frames + 1],
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_fields(), st.one_of(st.none(), st.sampled_from(sorted(BREAKS))), st.data())
def test_valid_requests_resolve_to_themselves_and_each_break_names_its_param(fields, broken,
                                                                             data):
    """Most generated requests are valid and must come through unchanged; a request with one
    field broken must be refused naming that field.
    Checked with: no upper bound on `num_inference_steps` (its break resolves), and fps capped
    at 30 (valid fps 31-60 refused)."""
    if broken is not None:
        fields = {**fields, broken: data.draw(st.sampled_from(BREAKS[broken]))}
        if broken == "num_frames":
            fields.pop("seconds", None)
        try:
            resolve_request("job", parse_params(fields), IMAGE, CFG)
        except APIError as exc:
            assert exc.status == 400 and exc.param == broken, (exc.param, exc.message)
            return
        raise AssertionError(f"{broken}={fields[broken]!r} was accepted")
    request = resolve_request("job", parse_params(fields), IMAGE, CFG)
    assert f"{request.width}x{request.height}" == fields["size"]
    assert request.fps == fields["fps"] and request.seed == fields["seed"]
    assert request.num_inference_steps == fields["num_inference_steps"]
    assert request.guidance_scale == fields["guidance_scale"]
    assert request.boundary_ratio == fields["boundary_ratio"]
    if "num_frames" in fields:
        assert request.num_frames == fields["num_frames"]
    assert request.num_frames % 4 == 1 and request.num_frames <= LIM.max_frames
