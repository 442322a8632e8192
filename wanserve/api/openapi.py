"""The served OpenAPI 3.1 document, built from the protocol models."""
from __future__ import annotations

from wanserve.api.previews import SPRITE_TYPE, THUMBNAIL_TYPE, VARIANTS
from wanserve.api.protocol import ModelCapabilities, VideoCreateParams, VideoEvent, VideoJob
from wanserve.engine.config import ServerConfig
from wanserve.engine.model.step_cache import CacheSettings
from wanserve.engine.model.features import ModelFeatures

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
_NULLABLE_STRING = {"type": ["string", "null"]}
_LIST = {"type": "object", "required": ["object", "data", "has_more"], "properties": {
    "object": {"const": "list"},
    "data": {"type": "array", "items": {"$ref": REF.format(model="Video")}},
    "has_more": {"type": "boolean"}, "first_id": _NULLABLE_STRING, "last_id": _NULLABLE_STRING}}
_DELETED = {"type": "object", "required": ["id", "object", "deleted"], "properties": {
    "id": {"type": "string"}, "object": {"const": "video.deleted"}, "deleted": {"type": "boolean"}}}
_MODELS = {"type": "object", "required": ["object", "data"], "properties": {
    "object": {"const": "list"}, "data": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["id", "object", "created", "owned_by"], "properties": {
            "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
            "owned_by": {"type": "string"}, "parent": _NULLABLE_STRING,
            "capabilities": {"$ref": REF.format(model="ModelCapabilities")}}}}}}
# what each start-up step did follows these fields (wanserve/engine/assembly.py)
_HEALTH = {
    "type": "object", "required": ["status", "engine", "model", "queue_depth"], "properties": {
        "status": {"type": "string"}, "engine": {"type": "string"}, "model": {"type": "string"},
        "queue_depth": {"type": "integer", "minimum": 0}, "current_job": _NULLABLE_STRING,
        "error": {"type": "string"}, "expert_swaps": {"type": "integer"}}}
_MP4 = {"video/mp4": {"schema": {"type": "string", "format": "binary"}}}
_IMAGES = {kind: {"schema": {"type": "string", "format": "binary"}}
           for kind in (THUMBNAIL_TYPE, SPRITE_TYPE)}
_SPRITE_HEADERS = {name: {"description": "spritesheet only", "schema": {"type": "string"}}
                   for name in ("X-Sprite-Columns", "X-Sprite-Rows", "X-Sprite-Tile-Width",
                                "X-Sprite-Tile-Height", "X-Sprite-Frames")}
# a character Python's str.strip() keeps (the server strips the prompt before checking it)
_NOT_SPACE = r"[^\t-\r \x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
# one server-sent event (the schema of a text/event-stream describes each event before 3.2)
_SSE = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "contentMediaType": "application/json",
             "contentSchema": {"$ref": REF.format(model="VideoEvent")}},
    "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}


def cache_schema(settings: CacheSettings, blocks: int) -> dict:
    """`cache`: off, a preset, or an object; its bounds keep Fn + Bn below the block count."""
    if settings.policy == "off":
        return {"const": "off", "description": "the step cache is off on this server"}
    expert = {"type": "object", "additionalProperties": False, "properties": {
        "mask": {"type": "string", "pattern": "^(slow|medium|fast|ultra|[01]{1,1000})$"},
        "warmup": {"type": "integer", "minimum": 0, "maximum": 1000},
        "threshold": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}}}
    bn = (blocks - 1) // 2
    names = ["off", *settings.presets]
    return {"anyOf": [{"enum": names}, {
        "type": "object", "additionalProperties": False, "properties": {
            "preset": {"enum": list(settings.presets)} if settings.presets else {"not": {}},
            "Fn": {"type": "integer", "minimum": 1, "maximum": max(1, blocks - 1 - bn)},
            "Bn": {"type": "integer", "minimum": 0, "maximum": bn},
            "high": expert, "low": expert}}],
        "description": "the step cache (cache-dit): off, a preset of this server "
        f"({', '.join(names)}), or an object with its keys (per expert: mask, warmup, "
        f"threshold; Fn + Bn below {blocks}, the blocks of an expert); absent: "
        f"`{settings.default}`. The job reports the steps computed and cached"}


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
                       "pattern": _NOT_SPACE}
    props["negative_prompt"] = {"type": "string", "maxLength": lim.max_prompt_chars}
    props["model"] = {"enum": [cfg.served_model_name]}
    for name in ("guidance_scale", "guidance_scale_2"):
        if name in props:
                props[name] = {"type": "number", "minimum": 0, "maximum": 50}
    props["flow_shift"] = {"type": "number", "minimum": 0.01, "maximum": 100}
    props["seconds"] = {"type": "number", "exclusiveMinimum": 0,
                        "description": f"instead of `num_frames`: seconds x fps, to the nearest "
                        f"4k+1 frames, at most {lim.max_frames}"}
    if cfg.adapters or cfg.lora_dir:
        props["lora"] = {"anyOf": [{"type": "string"}, {"type": "object"}, {"type": "array"}],
                         "description": "a registered adapter (`/v1/models`): `name`, "
                         "`name:scale`, `name:scale_high:scale_low`, {name, scale | scale_high, "
                         "scale_low}, {name, path, scale} under --lora-dir, or a list; absent: "
                         "the default"}
    else:
        props["lora"] = {"const": "none", "description": "no adapters are registered here"}
    props["cache"] = cache_schema(cfg.cache, features.blocks)
    props["input_reference"] = {**props["input_reference"], "description": (
        "the first frame: a data: URL, bare base64 or {\"image_url\": ...}" +
        ("" if lim.require_image or not features.text_to_video else
         "; without it the video is made from the prompt alone (text-to-video)"))}
    if lim.require_image or not features.text_to_video:
        schema["required"] = ["prompt", "input_reference"]
    return schema


_VIDEO_ID = {"type": "string", "pattern": "^video_[0-9a-f]{32}$"}
# the fields an extension takes from its source video
_FROM_SOURCE = ("input_reference", "size", "width", "height", "fps")


def _extension_schema(create: dict, cfg: ServerConfig) -> tuple[dict, dict]:
    """POST /v1/videos/extensions: the create fields less those the source decides, plus
    `video`. (JSON, multipart) schemas."""
    props = {k: v for k, v in create["properties"].items() if k not in _FROM_SOURCE}
    props["num_frames"] = {**props["num_frames"], "description": "the new part's; 4k+1, "
                           "instead of `seconds`"}
    props["seconds"] = {**props["seconds"], "description": "the new part's: seconds x the "
                        "source's fps, to the nearest 4k+1 frames"}
    about = (f"the video to continue from its last frame: a completed video's id, or an MP4. "
             f"Its size and fps are the new part's; the whole video (its frames, then the new "
             f"part's after the joint frame) has at most {cfg.limits.total_frames} frames")
    json_video = {"anyOf": [{"type": "object", "required": ["id"], "properties": {
        "id": _VIDEO_ID}}, _VIDEO_ID], "description": about + " (in JSON: {\"id\"}, the id, "
        "or the MP4 as a data: URL)"}
    form_video = {**_VIDEO_ID, "description": about + " (a form: the id, `video[id]`, or the "
                  "MP4 as a file part)"}
    as_json = {"type": "object", "required": ["prompt", "video"],
               "properties": {**props, "video": json_video}}
    as_form = {"type": "object", "required": ["prompt", "video"], "properties": {
        **{name: _not_null(prop) for name, prop in props.items()}, "video": form_video,
        "extra_params": {"type": "string", "description": "a JSON object of more fields"},
        **({"last_frame": {"type": "string", "format": "binary"}} if "last_frame" in props
           else {})}}
    return as_json, as_form


def _not_null(schema: dict) -> dict:
    """A form field is text or absent, never null: `anyOf [X, null]` → X."""
    options = [s for s in schema.get("anyOf", []) if s != {"type": "null"}]
    if len(options) != 1:
        return schema
    rest = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
    return {**options[0], **rest}


def openapi_spec(cfg: ServerConfig, features: ModelFeatures = ModelFeatures()) -> dict:
    """`features`: the served model's (wanserve/engine/model/features.py; before it has loaded, A14B's)."""
    create = _create_schema(cfg, features)
    images = {name: {"type": "string", "format": "binary"}
              for name in ("input_reference", "last_frame") if name in create["properties"]}
    multipart = {**create, "properties": {
        **{name: _not_null(prop) for name, prop in create["properties"].items()}, **images,
        "extra_params": {"type": "string", "description": "a JSON object of more fields"}}}
    body = {"required": True, "content": {"multipart/form-data": {"schema": multipart},
                                          "application/json": {"schema": create}}}
    extension_json, extension_form = _extension_schema(create, cfg)
    prefer = {"name": "Prefer", "in": "header", "required": False, "schema": {"type": "string"}}
    created = {"200": (_json("Video", "queued") if cfg.create_response == "async"
                       else _json("VideoSync")),
               "202": _json("Video", "queued"),
               **_errors(400, 401, 404, 409, 413, 415, 429, 500, 503, 507)}
    extension = {"required": True, "content": {"multipart/form-data": {"schema": extension_form},
                                               "application/json": {"schema": extension_json}}}
    job = VideoJob.model_json_schema(ref_template=REF)
    event = VideoEvent.model_json_schema(ref_template=REF)
    capabilities = ModelCapabilities.model_json_schema(ref_template=REF)
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
                                   "VideoEvent": event, "ModelCapabilities": capabilities,
                                   **capabilities.pop("$defs", {}), **event.pop("$defs", {}),
                                   **job.pop("$defs", {}), **create.pop("$defs", {})}},
        "paths": {
            "/v1/videos": {
                "post": {
                    "summary": ("Create a video; answers the queued job at once"
                                if cfg.create_response == "async" else
                                "Create a video; waits unless `Prefer: respond-async`"),
                    "parameters": [prefer],
                    "requestBody": body,
                    "responses": created,
                },
                "get": {
                    "summary": "List videos",
                    "parameters": [
                        {"name": "after", "in": "query", "schema": {"type": "string"}},
                        {"name": "limit", "in": "query",
                         "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                        {"name": "order", "in": "query", "schema": {"enum": ["asc", "desc"]}}],
                    "responses": {"200": {"description": "a page of videos", "content": {
                        "application/json": {"schema": _LIST}}}, **_errors(400, 401)},
                },
            },
            "/v1/videos/extensions": {
                "post": {
                    "summary": "Continue a video from its last frame: one video, the source's "
                               "frames then the new part's; answered as a create is",
                    "parameters": [prefer],
                    "requestBody": extension,
                    "responses": created,
                },
            },
            "/v1/videos/{video_id}": {
                "get": {"parameters": [video_id], "responses": {"200": _json("Video"),
                                                                 **_errors(401, 404)}},
                "delete": {"parameters": [video_id],
                           "responses": {"200": {"description": "deleted", "content": {
                               "application/json": {"schema": _DELETED}}}, **_errors(401, 404)}},
            },
            "/v1/videos/sync": {
                "post": {
                    "summary": "Create a video and answer the MP4 itself (vLLM-Omni's route)",
                    "requestBody": body,
                    "responses": {"200": {"description": "the MP4; with `stream: true` sent "
                                          "while it is decoded (chunked, a fragmented MP4, "
                                          "without X-Inference-Time-S)", "content": _MP4,
                                          "headers": {
                                              name: {"schema": {"type": "string"}} for name in
                                              ("X-Request-Id", "X-Model", "X-Inference-Time-S")}},
                                  **_errors(400, 401, 404, 409, 413, 415, 429, 500, 503, 507)},
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
                                                  "schema": {"enum": [*VARIANTS, ""]}}],
                        "responses": {"200": {"description": "the MP4 (`video`, the default; "
                                              "of a `stream: true` job still running, chunked "
                                              "as it is written, until it ends); "
                                              "the middle frame as WebP (`thumbnail`); evenly "
                                              "spaced frames in one JPEG grid (`spritesheet`, "
                                              "layout in the X-Sprite-* headers)",
                                              "content": {**_MP4, **_IMAGES},
                                              "headers": _SPRITE_HEADERS},
                                      "206": {"description": "a byte range of the MP4 (of a "
                                              "finished one: a running job's answers 416)",
                                              "content": _MP4},
                                      **_errors(400, 401, 404, 416)}},
            },
            "/v1/models": {"get": {"responses": {
                "200": {"description": "the served model (with its `capabilities`: sizes, "
                               "defaults, limits, inputs), then its adapters",
                        "content": {"application/json": {"schema": _MODELS}}}, **_errors(401)}}},
            "/health": {"get": {"responses": {
                code: {"description": what, "content": {"application/json": {"schema": _HEALTH}}}
                for code, what in (("200", "ready"), ("503", "not ready"))}}},
            "/metrics": {"get": {"responses": {"200": {
                "description": "Prometheus metrics", "content": {
                    "text/plain": {"schema": {"type": "string"}}}}}}},
        },
    }
