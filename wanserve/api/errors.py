"""One error model, the OpenAI shape: {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

from sanic.response import JSONResponse, json


class APIError(Exception):
    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 status: int | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}


class InvalidRequest(APIError):
    status = 400


class NotFound(APIError):
    status = 404
    type = "not_found_error"


class PayloadTooLarge(APIError):
    status = 413


class UnsupportedMediaType(APIError):
    status = 415


class RateLimited(APIError):
    status = 429
    type = "rate_limit_error"


class EngineUnavailable(APIError):
    status = 503
    type = "server_error"


class InsufficientStorage(APIError):
    status = 507
    type = "server_error"


class GenerationFailed(APIError):
    status = 500
    type = "server_error"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: Exception) -> JSONResponse:
    if isinstance(exc, APIError):
        return json(error_body(exc.message, exc.type, exc.param, exc.code), status=exc.status,
                    headers=exc.headers)
    return json(error_body("internal server error", "server_error"), status=500)
