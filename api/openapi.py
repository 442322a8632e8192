"""The served OpenAPI 3.1 document, built from the protocol models."""
from __future__ import annotations

from api.protocol import VideoCreateParams, VideoEvent, VideoJob
from engine.config import ServerConfig
from engine.features import ModelFeatures

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def _errors(*codes: int) -> dict:
    return {str(c): {"description": "error", "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}} for c in codes}


def _json(ref: str, description: str = "ok") -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}


REF = "#/components/schemas/{model}"
# one server-sent event (the schema of a text/event-stream describes each event before 3.2)
_SSE = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "contentMediaType": "application/json",
             "contentSchema": {"$ref": REF.format(model="VideoEvent")}},
    "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}


def _create_schema(cfg: ServerConfig, features: ModelFeatures) -> dict:
    """VideoCreateParams with this preset's limits and the model's inputs, so that the spec
    states what is accepted. (Cross-field rules, such as `size` excluding `width`/`height`, are
    in the descriptions.)"""
    lim = cfg.limits
    schema = VideoCreateParams.model_json_schema(ref_template=REF)
    props = schema["properties"]
    multiple = lim.size_multiple
    side = {"type": "integer", "multipleOf": multiple, "minimum": lim.min_side,
            "maximum": lim.max_side}
    props["width"] = {**side, "description": "with `height`, instead of `size`"}
    props["height"] = {**side, "description": "with `width`, instead of `size`"}
    props["size"] = {"type": "string", "pattern": r"^[0-9]{2,4}x[0-9]{2,4}$",
                     "description": f"WxH, multiples of {multiple}, at most {lim.max_pixels} "
                     "pixels"}
    if not features.last_frame:
        del props["last_frame"]
    if features.experts == 1:
        del props["guidance_scale_2"], props["boundary_ratio"]
    props["num_frames"] = {"type": "integer", "enum": list(range(1, lim.max_frames + 1, 4)),
                           "description": "4k+1; instead of `seconds`"}
    props["fps"] = {"type": "integer", "minimum": 1, "maximum": lim.max_fps}
    props["num_inference_steps"] = {"type": "integer", "minimum": 1, "maximum": lim.max_steps}
    props["prompt"] = {"type": "string", "minLength": 1, "maxLength": lim.max_prompt_chars,
                       "pattern": r"\S"}
    props["lora"] = {"anyOf": [{"type": "string"}, {"type": "object"}, {"type": "array"}],
                     "description": "a registered adapter (`/v1/models`): `name`, `name:scale`, "
                     "`name:scale_high:scale_low`, {name, scale | scale_high, scale_low}, "
                     "{name, path, scale} under --lora-dir, or a list; absent: the default"}
    props["input_reference"] = {**props["input_reference"], "description": (
        "the first frame: a data: URL, bare base64 or {\"image_url\": ...}" +
        ("" if lim.require_image or not features.text_to_video else
         "; without it the video is made from the prompt alone (text-to-video)"))}
    if lim.require_image or not features.text_to_video:
        schema["required"] = ["prompt", "input_reference"]
    return schema


def openapi_spec(cfg: ServerConfig, features: ModelFeatures = ModelFeatures()) -> dict:
    """`features`: the served model's (engine/features.py; before it has loaded, A14B's)."""
    create = _create_schema(cfg, features)
    images = {name: {"type": "string", "format": "binary"}
              for name in ("input_reference", "last_frame") if name in create["properties"]}
    multipart = {**create, "properties": {
        **create["properties"], **images,
        "extra_params": {"type": "string", "description": "a JSON object of more fields"}}}
    body = {"required": True, "content": {"multipart/form-data": {"schema": multipart},
                                          "application/json": {"schema": create}}}
    job = VideoJob.model_json_schema(ref_template=REF)
    event = VideoEvent.model_json_schema(ref_template=REF)
    video_id = {"name": "video_id", "in": "path", "required": True, "schema": {"type": "string"}}
    sync = {"allOf": [{"$ref": "#/components/schemas/Video"}, {"type": "object", "properties": {
        "created": {"type": "integer"},
        "data": {"type": "array", "items": {"type": "object", "properties": {
            "b64_json": {"type": "string"}}}}}}]}
    return {
        "openapi": "3.1.0",
        "info": {"title": "wanserve", "version": "0.1.0",
                 "description": ("Text- and image-to-video" if features.text_to_video else
                                 "Image-to-video") + f" with {cfg.served_model_name}"},
        "components": {"schemas": {"Error": _ERROR, "Video": job, "VideoSync": sync,
                                   "VideoEvent": event, **event.pop("$defs", {}),
                                   **job.pop("$defs", {}), **create.pop("$defs", {})}},
        "paths": {
            "/v1/videos": {
                "post": {
                    "summary": ("Create a video; answers the queued job at once"
                                if cfg.create_response == "async" else
                                "Create a video; waits unless `Prefer: respond-async`"),
                    "parameters": [{"name": "Prefer", "in": "header", "required": False,
                                    "schema": {"type": "string"}}],
                    "requestBody": body,
                    "responses": {"200": (_json("Video", "queued") if cfg.create_response == "async"
                                          else _json("VideoSync")),
                                  "202": _json("Video", "queued"),
                                  **_errors(400, 401, 404, 409, 413, 415, 429, 500, 503)},
                },
                "get": {
                    "summary": "List videos",
                    "parameters": [
                        {"name": "after", "in": "query", "schema": {"type": "string"}},
                        {"name": "limit", "in": "query",
                         "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                        {"name": "order", "in": "query", "schema": {"enum": ["asc", "desc"]}}],
                    "responses": {"200": {"description": "a page of videos"}, **_errors(400, 401)},
                },
            },
            "/v1/videos/{video_id}": {
                "get": {"parameters": [video_id], "responses": {"200": _json("Video"),
                                                                 **_errors(401, 404)}},
                "delete": {"parameters": [video_id],
                           "responses": {"200": {"description": "deleted"}, **_errors(401, 404)}},
            },
            "/v1/videos/sync": {
                "post": {
                    "summary": "Create a video and answer the MP4 itself (vLLM-Omni's route)",
                    "requestBody": body,
                    "responses": {"200": {"description": "the MP4", "content": {"video/mp4": {}},
                                          "headers": {
                                              name: {"schema": {"type": "string"}} for name in
                                              ("X-Request-Id", "X-Model", "X-Inference-Time-S")}},
                                  **_errors(400, 401, 404, 409, 413, 415, 429, 500, 503)},
                },
            },
            "/v1/videos/{video_id}/events": {
                "get": {"summary": "Server-sent events: the job's state, one per denoising "
                                   "step, then the final one; the stream ends with the job",
                        "parameters": [video_id],
                        "responses": {"200": {"description": "`data: <VideoEvent JSON>` lines",
                                              "content": {"text/event-stream": {"schema": _SSE}}},
                                      **_errors(401, 404)}},
            },
            "/v1/videos/{video_id}/content": {
                "get": {"parameters": [video_id, {"name": "variant", "in": "query",
                                                  # empty is absent, as for every field
                                                  "schema": {"enum": ["video", ""]}}],
                        "responses": {"200": {"description": "the MP4",
                                              "content": {"video/mp4": {}}},
                                      "206": {"description": "a byte range of the MP4"},
                                      **_errors(400, 401, 404, 416)}},
            },
            "/v1/models": {"get": {"responses": {"200": {"description": "served models"}}}},
            "/health": {"get": {"responses": {"200": {"description": "ready"},
                                              "503": {"description": "not ready"}}}},
            "/metrics": {"get": {"responses": {"200": {"description": "Prometheus metrics"}}}},
        },
    }
