"""The Wan2.2-TI2V-5B miniature (`--model tiny-ti2v`): image-to-video and text-to-video.

Every layout is compared with plain diffusers on one rank, the reference
tests/test_reference_diffusers.py holds one rank of wanserve to (image-to-video:
WanImageToVideoPipeline on the expand_timesteps path; text-to-video: WanPipeline, what the model
does without an image); within the tolerance of both, a layout matches one rank of wanserve.
Tokens = latent frames ((frames - 1) / 4 + 1) x (height / 32) x (width / 32) (the Wan2.2 VAE is
16x spatial, the patch 2): 160x96 and 96x160 at 9 frames are 3 x 3 x 5 = 45 tokens, padded by 1
at SP 2; 128x128 is 48. Each token has its own timestep (a given first frame's get 0), sharded
with the tokens under SP.
"""
from __future__ import annotations

import base64

import pytest
import requests

from conftest import png_bytes, start_server
from test_http_e2e import stream_info, video_of
from test_multirank_equivalence import run_layout
from test_reference_diffusers import assert_frames_match, diffusers_frames

TI2V = ("--model", "tiny-ti2v")
REQUESTS = [
    {"width": 160, "height": 96, "seed": 1, "image_seed": 3},  # image-to-video
    {"width": 96, "height": 160, "seed": 2, "image_seed": None},  # text-to-video
    {"width": 128, "height": 128, "seed": 3, "image_seed": None, "guidance_scale": 1.0},
]
# configs/tiny-ti2v.yaml's defaults, spelled out for diffusers
DEFAULTS = {"prompt": "a lighthouse in a storm", "negative_prompt": "", "num_frames": 9,
            "num_inference_steps": 4, "guidance_scale": 5.0, "flow_shift": 5.0}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from wanserve.engine.model.tiny_model import ensure_tiny_model

    return diffusers_frames(ensure_tiny_model(name="tiny-ti2v"),
                            [{**DEFAULTS, **spec} for spec in REQUESTS],
                            tmp_path_factory.mktemp("ti2v-diffusers"))


@pytest.mark.parametrize("flags", [("--ulysses", "2"), ("--ring", "2"), ("--cfg", "2")],
                         ids=["U2", "R2", "C2"])
def test_layout_matches_plain_diffusers_on_one_rank(tmp_path, reference, flags):
    """checked with: the SP padding mask removed (wanserve/engine/parallel/sp_padding.py
    WanServeTransformer.forward setting no valid lengths): U2 and R2 fail on the 45-token
    image request (3.2e-4); the text-only frame mask marking the first latent frame as given
    (wanserve/engine/model/pipeline.py _text_only_latents): C2 fails on the text-to-video request (0.69)."""
    assert_frames_match(run_layout(tmp_path, 2, *TI2V, *flags, requests=REQUESTS), reference)


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_serves_image_and_text_requests_over_http(tmp_path):
    """The requested frames and size, with an image (multipart) and without one (JSON); what
    TI2V cannot take is refused by name. checked with: `require_image: true` in
    configs/tiny-ti2v.yaml (the text request is a 400)."""
    server = start_server(tmp_path, *TI2V)
    try:
        url = server.url + "/v1/videos"
        quick = {"prompt": "waves", "num_inference_steps": 2, "seed": 5}
        resp = requests.post(url, data={**quick, "size": "160x96", "num_frames": 13, "fps": 12},
                             files={"input_reference": ("a.png", png_bytes(), "image/png")},
                             timeout=300)
        assert stream_info(video_of(resp)) == (13, 160, 96, 12.0)
        resp = requests.post(url, json={**quick, "size": "96x160", "num_frames": 5},
                             timeout=300)
        assert stream_info(video_of(resp))[:3] == (5, 96, 160)
        assert resp.json()["size"] == "96x160"
        resp = requests.post(url, json=quick, timeout=300)  # no size, no image: the preset's
        assert stream_info(video_of(resp))[:3] == (9, 128, 128)
        for fields, param in (({"size": "144x96"}, "size"),
                              ({"last_frame": _data_url(png_bytes())}, "last_frame"),
                              ({"guidance_scale_2": 2.0}, "guidance_scale_2"),
                              ({"boundary_ratio": 0.5}, "boundary_ratio")):
            resp = requests.post(url, json={**quick, "input_reference": _data_url(png_bytes()),
                                            **fields}, timeout=30)
            assert resp.status_code == 400, resp.text
            assert resp.json()["error"]["param"] == param
        spec = requests.get(server.url + "/openapi.json", timeout=5).json()
        create = spec["paths"]["/v1/videos"]["post"]["requestBody"]["content"]
        schema = create["application/json"]["schema"]
        assert schema.get("required") == ["prompt"] and "last_frame" not in schema["properties"]
        assert schema["properties"]["width"]["multipleOf"] == 32
    finally:
        assert server.stop() == 0, server.log()[-3000:]
