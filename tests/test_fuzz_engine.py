"""Generated requests that reach the engine: small valid requests with every field drawn from
its whole range (fps 1-60, any boundary, guidance and shift, negative prompts, odd sizes) are
served end to end by the real server, each answering an MP4 of the requested shape; with one
field broken on purpose the 400 names it and the server keeps serving.

Checked with: fps capped at 30 in wanserve/api/params.py (valid fps above 30 answer 400), and the MP4
written at a fixed 16 fps in wanserve/api/video.py (the stream's rate differs from the request's).
"""
from __future__ import annotations

import requests
from hypothesis import HealthCheck, given, settings, strategies as st

from test_http_e2e import create, stream_info, video_of
from test_params import BREAKS, LIM

SMALL_SIDES = list(range(LIM.min_side, 129, 16))  # small, so each example stays cheap


@st.composite
def small_valid_fields(draw) -> dict:
    fields = {"prompt": draw(st.text(min_size=1, max_size=20).filter(str.strip)),
              "size": f"{draw(st.sampled_from(SMALL_SIDES))}x{draw(st.sampled_from(SMALL_SIDES))}",
              "num_frames": str(draw(st.sampled_from([1, 5, 9]))),
              "fps": str(draw(st.integers(1, LIM.max_fps))),
              "num_inference_steps": str(draw(st.integers(1, 2))),
              "guidance_scale": str(draw(st.floats(0, 50))),
              "boundary_ratio": str(draw(st.floats(0, 1))),
              "flow_shift": str(draw(st.floats(0.01, 100))),
              "seed": str(draw(st.integers(0, 2**63 - 1)))}
    if draw(st.booleans()):
        fields["negative_prompt"] = draw(st.text(max_size=20))
    return fields


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(small_valid_fields(), st.one_of(st.none(), st.none(), st.sampled_from(sorted(BREAKS))),
       st.data())
def test_generated_requests_are_served_or_refused_by_name(server, fields, broken, data):
    if broken is not None:
        fields = {**fields, broken: str(data.draw(st.sampled_from(BREAKS[broken])))}
        resp = create(server, fields)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == broken
        assert requests.get(server.url + "/health", timeout=5).status_code == 200
        return
    frames, width, height, rate = stream_info(video_of(create(server, fields)))
    assert f"{width}x{height}" == fields["size"]
    assert frames == int(fields["num_frames"]) and round(rate) == int(fields["fps"])
