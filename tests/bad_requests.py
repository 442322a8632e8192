"""One bad request of each kind a client gets wrong, for the storm test and benchmarks/soak.py:
(what, method, target, headers, body), sent with conftest.raw_request; each must be a 4xx."""
from __future__ import annotations

import json

import requests

from conftest import png_bytes

NO_SUCH_JOB = "/v1/videos/video_" + "0" * 32


def multipart_form(fields: dict, files: dict | None = None) -> tuple[dict, bytes]:
    """(headers, body) of a multipart/form-data POST, as requests builds it."""
    prepared = requests.Request("POST", "http://x/v1/videos", data=fields,
                                files=files or {}).prepare()
    return dict(prepared.headers), prepared.body


def invalid_requests() -> list[tuple[str, str, str, dict, bytes | None]]:
    image = {"input_reference": ("r.png", png_bytes(), "image/png")}
    json_type = {"Content-Type": "application/json"}
    cases = [
        ("no content type", "POST", "/v1/videos", {}, b'{"prompt": "p"}'),
        ("text/plain", "POST", "/v1/videos", {"Content-Type": "text/plain"}, b"prompt=p"),
        ("broken JSON", "POST", "/v1/videos", json_type, b'{"prompt": "p", "size": '),
        ("JSON not an object", "POST", "/v1/videos", json_type, b"[1, 2]"),
        ("deep JSON", "POST", "/v1/videos", json_type, b"[" * 100000 + b"]" * 100000),
        ("NaN literal", "POST", "/v1/videos", json_type, b'{"prompt": "p", "seed": NaN}'),
        ("bad boundary", "POST", "/v1/videos",
         {"Content-Type": "multipart/form-data; boundary=nope"}, b"--other\r\n\r\nx\r\n--other--"),
        ("remote image URL", "POST", "/v1/videos", json_type,
         json.dumps({"prompt": "p", "input_reference": "https://example.com/a.png"}).encode()),
        ("undeclared method", "PATCH", "/v1/videos", {}, None),
        ("unknown id", "GET", NO_SUCH_JOB, {}, None),
        ("garbage id", "GET", "/v1/videos/..%2f..%2fetc%2fpasswd", {}, None),
        ("delete unknown", "DELETE", NO_SUCH_JOB, {}, None),
        ("content of unknown", "GET", NO_SUCH_JOB + "/content", {}, None),
        ("events of unknown", "GET", NO_SUCH_JOB + "/events", {}, None),
        ("bad variant", "GET", NO_SUCH_JOB + "/content?variant=gif", {}, None),
        ("bad limit", "GET", "/v1/videos?limit=0", {}, None),
        ("bad order", "GET", "/v1/videos?order=sideways", {}, None),
    ]
    for what, fields, files in [
            ("no prompt", {"size": "64x64"}, image),
            ("no image", {"prompt": "p"}, None),
            ("not an image", {"prompt": "p"}, {"input_reference": ("r.png", b"GIF89", "image/png")}),
            ("truncated PNG", {"prompt": "p"},
             {"input_reference": ("r.png", png_bytes()[:200], "image/png")}),
            ("size not a multiple of 16", {"prompt": "p", "size": "70x64"}, image),
            ("zero steps", {"prompt": "p", "num_inference_steps": "0"}, image),
            ("frames not 4k+1", {"prompt": "p", "num_frames": "8"}, image),
            ("guidance NaN", {"prompt": "p", "guidance_scale": "nan"}, image),
            ("unknown model", {"prompt": "p", "model": "sora-9"}, image),
            ("negative seed", {"prompt": "p", "seed": "-1"}, image),
            ("image over the upload limit", {"prompt": "p"},
             {"input_reference": ("r.png", b"\0" * (21 << 20), "image/png")})]:
        headers, body = multipart_form(fields, files)
        cases.append((what, "POST", "/v1/videos", headers, body))
    return cases
