"""HTTP wiring: routes → VideoService. The only layer that builds HTTP responses."""
from __future__ import annotations

import asyncio
import hmac
import json as jsonlib
import re
import time
from pathlib import Path
from urllib.parse import parse_qs

from sanic import Request, Sanic
from sanic.exceptions import MethodNotAllowed, SanicException
from sanic.headers import parse_content_header
from sanic.request.form import parse_multipart_form
from sanic.response import HTTPResponse, file, json, raw

from wanserve.api import previews
from wanserve.api.capabilities import model_capabilities
from wanserve.api.errors import (APIError, InvalidRequest, UnsupportedMediaType, error_body,
                        error_response)
from wanserve.api.events import follow
from wanserve.api.live_video import LiveVideo, VideoCutShort
from wanserve.api.memory_budget import plan_report
from wanserve.api.openapi import openapi_spec
from wanserve.api.sdk_forms import nest_bracketed
from wanserve.api.serving import VideoService, validate_listing
from wanserve.engine.config import ServerConfig
from wanserve.engine.model.features import ModelFeatures

STATIC_DIR = Path(__file__).parent / "static"  # the playground: no build step, no key needed


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def _json_object(body: bytes) -> dict:
    # JSON is UTF-8 (RFC 8259); json.loads on bytes would also guess UTF-16/32
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"the JSON body is not UTF-8: {exc}", code="invalid_json") from None
    try:
        value = jsonlib.loads(text or "null", parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidRequest("the JSON body is nested too deeply", code="invalid_json") from None
    except ValueError as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(value, dict):
        raise InvalidRequest("the JSON body must be an object", code="invalid_json")
    return value


def _form(body: bytes, ctype: str, params: dict) -> tuple[dict, dict]:
    """Sanic's request.form logs and swallows parse errors (an empty form, then a misleading
    "`prompt` is required"), so the form is parsed here and a bad one is named as such."""
    try:
        if ctype == "application/x-www-form-urlencoded":
            return parse_qs(body.decode("utf-8")), {}
        if not params.get("boundary"):
            raise ValueError("the Content-Type has no boundary")
        form, files = parse_multipart_form(body, params["boundary"].encode("utf-8"))
        return dict(form), dict(files)  # lists; RequestParameters.get gives the first item
    except (ValueError, LookupError) as exc:  # bad UTF-8, a part without ':', unknown charset
        raise InvalidRequest(f"the form body cannot be parsed: {exc}", code="invalid_form") from None


def _fields_and_files(request: Request) -> tuple[dict, dict[str, bytes]]:
    """The text fields and the file parts' bytes, each by field name (the first of each)."""
    header = request.headers.get("content-type")
    if header is None:  # request.content_type would say application/octet-stream
        raise UnsupportedMediaType("no Content-Type; send multipart/form-data or application/json",
                                   code="unsupported_media_type")
    ctype, params = parse_content_header(header)
    body = request.body or b""
    if ctype == "application/json":
        return _json_object(body), {}
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form, files = _form(body, ctype, params)
        fields = nest_bracketed({key: values[0] for key, values in form.items()})
        uploads = {name: parts[0].body for name, parts in files.items() if parts}
        for name in uploads:
            fields.pop(name, None)
        return fields, uploads
    raise UnsupportedMediaType(f"unsupported Content-Type {ctype!r}; send "
                               "multipart/form-data or application/json", code="unsupported_media_type")


def _range_number(digits: str) -> int | None:
    # past 18 digits a number is beyond any file (and int() refuses past 4300 digits)
    return None if digits == "" else int(digits) if len(digits) <= 18 else 10**18


def _asks_a_part(header: str | None) -> bool:
    """A `Range` other than the whole file (`bytes=0-`) and than those `_byte_range` ignores."""
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", (header or "").strip())
    if not match:
        return False
    first, last = (_range_number(g) for g in match.groups())
    return last is not None or first not in (None, 0)


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One `bytes=a-b` range → (start, end inclusive); None for the whole file."""
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", (header or "").strip())
    if not match or match.group(1) == match.group(2) == "":
        return None  # absent, several ranges, or malformed: the whole file (RFC 9110 allows it)
    first, last = (_range_number(g) for g in match.groups())
    if first is None:
        start, end = max(0, size - last), size - 1
    else:
        start, end = first, (last if last is not None else size - 1)
    if start >= size or start > end:
        raise APIError("requested range not satisfiable", code="range_not_satisfiable",
                       status=416, headers={"Content-Range": f"bytes */{size}"})
    return start, min(end, size - 1)


async def send_live(request: Request, live: LiveVideo, headers: dict[str, str]) -> bool:
    """A streamed job's MP4 as it is written, chunked, from its first byte to its end; the
    status and headers go with the first byte. False (nothing sent) if the video ended
    unfinished before any byte; ended unfinished after some, the connection is cut, so the
    client sees a truncated body rather than a whole one."""
    chunks = live.follow()
    try:
        try:
            first = await chunks.__anext__()
        except VideoCutShort:
            return False
        response = await request.respond(content_type="video/mp4", headers=headers)
        await response.send(first)
        try:
            async for data in chunks:
                await response.send(data)
        except VideoCutShort:
            request.transport.close()  # without the last chunk of the chunked encoding
        else:
            await response.eof()
        return True
    finally:
        await chunks.aclose()


def create_app(cfg: ServerConfig, service: VideoService) -> Sanic:
    app = Sanic("wanserve", configure_logging=False)
    app.config.REQUEST_MAX_SIZE = cfg.limits.max_upload_bytes * 4 // 3 + (1 << 20)
    app.config.REQUEST_TIMEOUT = 120
    app.config.RESPONSE_TIMEOUT = max(600, int(cfg.job_timeout_s) + 60)
    app.config.KEEP_ALIVE_TIMEOUT = 30
    app.ctx.service = service
    app.static("/static", STATIC_DIR, name="playground_files")

    @app.get("/")
    async def playground(request: Request):
        return await file(STATIC_DIR / "index.html", mime_type="text/html; charset=utf-8")

    @app.on_request
    async def authenticate(request: Request):
        if cfg.api_key and request.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            expected = f"Bearer {cfg.api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return json(error_body("missing or invalid API key", "invalid_request_error",
                                       None, "invalid_api_key"), status=401)

    @app.exception(Exception)
    async def on_error(request: Request, exc: Exception):
        if isinstance(exc, APIError):
            return error_response(exc)
        if isinstance(exc, SanicException):
            status = exc.status_code or 500
            type_ = "invalid_request_error" if status < 500 else "server_error"
            headers = {}
            if isinstance(exc, MethodNotAllowed):
                headers["Allow"] = ", ".join(sorted(exc.allowed_methods or ()))
            return json(error_body(str(exc) or "error", type_, None, None), status=status,
                        headers=headers)
        return error_response(exc)

    @app.post("/v1/videos")
    async def create_video(request: Request):
        return await answer_new_job(request, service.create_job)

    @app.post("/v1/videos/extensions")
    async def extend_video(request: Request):
        return await answer_new_job(request, service.create_extension)

    async def answer_new_job(request: Request, create):
        fields, files = _fields_and_files(request)
        loop = asyncio.get_running_loop()
        # image (and video) decoding and fitting take milliseconds to seconds: off the loop
        job = await loop.run_in_executor(None, create, fields, files)
        if "respond-async" in request.headers.get("prefer", "").lower():
            return json(job.public(), status=202,
                        headers={**service.poll_headers(job), "Preference-Applied": "respond-async"})
        if cfg.create_response == "async":  # vLLM-Omni's answer: the queued job, 200
            return json(job.public(), headers=service.poll_headers(job))
        job = await service.wait_for_caller(job.id)
        body = await loop.run_in_executor(None, service.sync_body, job)
        return raw(jsonlib.dumps(body).encode(), content_type="application/json")

    @app.post("/v1/videos/sync")
    async def create_video_sync(request: Request):
        fields, files = _fields_and_files(request)
        loop = asyncio.get_running_loop()
        job = await loop.run_in_executor(None, service.create_job, fields, files)
        live = service.live_video(job.id)
        if live is not None:  # `stream: true`; the time is not known before the end
            try:
                if await send_live(request, live, {"X-Request-Id": job.id, "X-Model": job.model}):
                    return None
            except asyncio.CancelledError:  # the caller went away, as in `wait_for_caller`
                if not service.stopping:
                    service.cancel_abandoned(job.id)
                raise
        job = await service.wait_for_caller(job.id)
        data = await loop.run_in_executor(None, service.video_bytes, job)
        return raw(data, content_type="video/mp4", headers={
            "X-Request-Id": job.id, "X-Model": job.model,
            "X-Inference-Time-S": f"{job.timings.get('generate_total', 0.0):.3f}"})

    @app.get("/v1/videos")
    async def list_videos(request: Request):
        after, limit, order = validate_listing(request.args.get("after"), request.args.get("limit"),
                                               request.args.get("order"))
        jobs, has_more = service.store.list(after, limit, order)
        data = [j.public() for j in jobs]
        return json({"object": "list", "data": data, "has_more": has_more,
                     "first_id": data[0]["id"] if data else None,
                     "last_id": data[-1]["id"] if data else None})

    @app.get("/v1/videos/<video_id:str>")
    async def get_video(request: Request, video_id: str):
        job = service.get_job(video_id)
        return json(job.public(), headers=service.poll_headers(job))

    @app.get("/v1/videos/<video_id:str>/events")
    async def video_events(request: Request, video_id: str):
        events = follow(service.events, video_id,
                        lambda: service.event_of(service.get_job(video_id)))
        try:
            first = await events.__anext__()  # an unknown id is a 404 before the stream starts
            response = await request.respond(content_type="text/event-stream",
                                             headers={"Cache-Control": "no-cache"})
            await response.send(f"data: {jsonlib.dumps(first)}\n\n")
            async for event in events:
                await response.send(": keep-alive\n\n" if event is None else
                                    f"data: {jsonlib.dumps(event)}\n\n")
            await response.eof()
        finally:
            await events.aclose()  # unsubscribes, also when the client went away

    @app.get("/v1/videos/<video_id:str>/content")
    async def video_content(request: Request, video_id: str):
        variant = request.args.get("variant", "video")
        if variant not in previews.VARIANTS:
            raise InvalidRequest(f"`variant` must be one of {', '.join(previews.VARIANTS)}; got "
                                 f"{variant!r}", param="variant", code="invalid_value")
        job = service.get_job(video_id)
        live = service.live_video(video_id) if variant == "video" else None
        if live is not None:
            if _asks_a_part(request.headers.get("range")):
                raise APIError(f"video {video_id} is still being written: a byte range can be "
                               "asked once it is completed; without `Range` the response "
                               "follows it as it is written", code="range_not_satisfiable",
                               status=416)
            if await send_live(request, live, {"Accept-Ranges": "none"}):
                return None
            job = service.get_job(video_id)  # it ended unfinished
        path = service.store.video_path(job)
        if job.status != "completed" or path is None or not path.exists():
            raise APIError(f"video {video_id} is {job.status}, no content to download",
                           param="video_id", code="video_not_ready", status=404)
        loop = asyncio.get_running_loop()
        if variant == "thumbnail":
            image = await loop.run_in_executor(None, previews.thumbnail, path, job.num_frames)
            return raw(image, content_type=previews.THUMBNAIL_TYPE)
        if variant == "spritesheet":
            sheet = await loop.run_in_executor(None, previews.spritesheet, path, job.num_frames)
            return raw(sheet.image, content_type=previews.SPRITE_TYPE,
                       headers=previews.sprite_headers(sheet))
        data = await loop.run_in_executor(None, path.read_bytes)
        headers = {"Accept-Ranges": "bytes"}
        span = _byte_range(request.headers.get("range"), len(data))
        if span is None:
            return raw(data, content_type="video/mp4", headers=headers)
        start, end = span
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return raw(data[start:end + 1], status=206, content_type="video/mp4", headers=headers)

    @app.delete("/v1/videos/<video_id:str>")
    async def delete_video(request: Request, video_id: str):
        return json(service.cancel_or_delete(video_id))

    @app.get("/health")
    async def health(request: Request):
        engine = service.engine
        state = engine.state if engine else "starting"
        info = getattr(engine, "info", None) or {}
        body = {"status": "ok" if state == "ready" else state, "engine": state,
                "model": cfg.served_model_name, "queue_depth": engine.queue_depth if engine else 0,
                "current_job": engine.current_job if engine else None,
                "replicas": [r.public() for r in engine.replicas] if engine else [], **info}
        if engine and engine.error:
            body["error"] = engine.error
        if engine and engine.offload:
            body["expert_swaps"] = engine.offload.swaps
        if engine and engine.memory_plan is not None:
            body["memory_plan"] = plan_report(engine.memory_plan, cfg)
        return json(body, status=200 if state == "ready" else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        info = getattr(service.engine, "info", None) or {}
        created = int(app.ctx.started)
        # adapters as vLLM lists them: models whose `parent` is the base model
        adapters = [{"id": spec.name, "object": "model", "created": created, "owned_by": "wanserve",
                     "root": spec.high or spec.low, "parent": cfg.served_model_name,
                     "lora": spec.public()} for spec in cfg.adapters]
        return json({"object": "list", "data": [{
            "id": cfg.served_model_name, "object": "model", "created": created,
            "owned_by": "wanserve", "root": cfg.model, **info,
            "capabilities": model_capabilities(cfg, service.engine.features
                                               if service.engine else ModelFeatures()).model_dump(),
            "adapters": [spec.public() for spec in cfg.adapters]}, *adapters]})

    @app.get("/metrics")
    async def metrics(request: Request):
        return HTTPResponse(service.metrics.render(),
                            content_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/openapi.json")
    async def openapi(request: Request):
        engine = service.engine
        return json(openapi_spec(cfg, engine.features) if engine else openapi_spec(cfg))

    app.ctx.started = time.time()
    return app
