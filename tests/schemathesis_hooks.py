"""schemathesis hooks for tests/test_openapi_fuzz.py, loaded with SCHEMATHESIS_HOOKS (written
for schemathesis 4.32).

A schema-valid (positive) create request is made consistent where JSON Schema cannot say it:
a real PNG as `input_reference`, `size` or `width`/`height` (not both, never one alone), a
`size` of multiples of 16 within the limits, `num_frames` or `seconds` with seconds x fps
within the frame limit, `extra_params` a JSON object (carrying the seed when there is
one), and in a form a `cache` object as its JSON text. Every other value stays as generated,
across the whole range the spec gives. Each positive create's status (and a refusal's body) is appended to $FUZZ_CREATES, one line each,
for the test to count.

A positive extension (POST /v1/videos/extensions) is made consistent the same way, with
$FUZZ_SOURCE, the id of a finished video on the server, as its `video`.

$FUZZ_LIMITS is the server's limits as JSON (min_side, max_side, max_frames, fps).
"""
from __future__ import annotations

import base64
import io
import json
import os
import re

import numpy as np
import PIL.Image
import schemathesis
from schemathesis.generation.meta import CoverageScenario

EXTENSIONS = "/v1/videos/extensions"
CREATES = ("/v1/videos", "/v1/videos/sync", EXTENSIONS)


def _png() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()


def _positive_create(case) -> bool:
    meta = case.meta
    return (case.method.upper() == "POST" and case.path in CREATES and meta is not None
            and meta.generation.mode.is_positive and isinstance(case.body, dict))


def _side(value: int, lim: dict) -> int:
    return min(max(round(value / 16) * 16, lim["min_side"]), lim["max_side"])


def consistent(body: dict, multipart: bool, lim: dict) -> dict:
    body = dict(body)
    body["input_reference"] = (PNG if multipart else
                               "data:image/png;base64," + base64.b64encode(PNG).decode())
    if "size" in body:
        body.pop("width", None), body.pop("height", None)
        width, height = map(int, re.match(r"(\d+)x(\d+)", str(body["size"])).groups())
        body["size"] = f"{_side(width, lim)}x{_side(height, lim)}"
    elif "width" in body or "height" in body:
        body.setdefault("width", body.get("height"))
        body.setdefault("height", body["width"])
    if "seconds" in body:
        if "num_frames" in body:
            body.pop("seconds")
        else:
            fps = float(body.get("fps", lim["fps"]))
            body["seconds"] = min(float(body["seconds"]), lim["max_frames"] / fps)
    if "last_frame" in body:  # a video ending on a given frame has at least 5 frames
        body["last_frame"] = body["input_reference"]
        body.pop("seconds", None)
        body["num_frames"] = max(5, int(body.get("num_frames") or 5))
    if "extra_params" in body:
        extra = {"seed": body.pop("seed")} if "seed" in body else {}
        body["extra_params"] = json.dumps(extra) if multipart else extra
    if multipart and isinstance(body.get("cache"), dict):  # a form carries it as JSON text
        body["cache"] = json.dumps(body["cache"])
    return body


@schemathesis.hook
def filter_case(ctx, case):
    """Each generated video costs seconds, so two kinds of schema-valid coverage cases are
    left out: those of /v1/videos/sync and /v1/videos/extensions (the same fields as
    /v1/videos: the same videos again; their fuzzing-phase ones still run), and the combinations of optional fields at their
    template values (OBJECT_REQUIRED_AND_OPTIONAL, ~35 per media type: the same values the
    kept cases send, and the fuzzing phase combines fields at random). Kept: each field at its
    minimum, maximum, near-boundary and enum values, for multipart and for JSON."""
    if not _positive_create(case) or case.meta.phase.name != "coverage":
        return True
    scenario = case.meta.phase.data.scenario
    return case.path == "/v1/videos" and scenario != CoverageScenario.OBJECT_REQUIRED_AND_OPTIONAL


@schemathesis.hook
def map_case(ctx, case):
    if _positive_create(case):
        lim = json.loads(os.environ["FUZZ_LIMITS"])
        multipart = case.media_type == "multipart/form-data"
        case.body = consistent(case.body, multipart, lim)
        if case.path == EXTENSIONS:  # the video $FUZZ_SOURCE names, not a first frame
            del case.body["input_reference"]
            case.body["video"] = os.environ["FUZZ_SOURCE"]
        if multipart and hasattr(case, "_record_starting_state"):
            # schemathesis cannot validate bytes and would relabel the case negative (4.32:
            # `contains_binary` in Case._validate_component): take the edit as generated; the
            # same edits to JSON bodies are revalidated
            case._record_starting_state()
    return case


@schemathesis.hook
def after_call(ctx, case, response):
    if _positive_create(case):
        refusal = response.text[:300].replace("\n", " ") if response.status_code >= 400 else ""
        with open(os.environ["FUZZ_CREATES"], "a") as f:
            f.write(f"{response.status_code} {case.media_type} {refusal}\n")
