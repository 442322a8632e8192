"""The request parser and resolver, property-tested: any input is either a fully valid
GenerationRequest or an InvalidRequest naming a param, never anything else."""
from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings, strategies as st

from api.errors import APIError
from api.params import parse_params, resolve_request
from conftest import png_bytes
from engine.config import load_config

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
