"""Every error the service answers, in OpenAI's shape — `{"error": {"message", "type", "param",
"code"}}` with `code` from `runtime.errors.ErrorCode` — whether it comes from validation, the engine,
the framework (unknown route, wrong method, an undecodable body) or a middleware."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..runtime.errors import ErrorCode, InvalidRequestError, OrtDiffusionError

INVALID = "invalid_request_error"
# The pipeline's argument names → the API's field names, for error messages' `param`.
API_FIELDS = {"num_images_per_prompt": "n", "num_inference_steps": "steps", "width": "size", "height": "size"}
#: On every API answer: no content sniffing; nothing cached (bodies carry images and prompts).
SAFE_HEADERS = {"x-content-type-options": "nosniff", "cache-control": "no-store"}


def error_response(status: int, message: str, type_: str = INVALID, param: str | None = None,
                   code: ErrorCode | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code.value if code else None}}
    retry = "true" if status in (429, 503, 504) or status >= 500 else "false"
    return JSONResponse(body, status_code=status, headers={"x-should-retry": retry, **SAFE_HEADERS, **(headers or {})})


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        kind = first.get("type", "")
        if kind == "json_invalid" or (not loc and kind in ("missing", "model_attributes_type", "dict_type")):
            message = "the body must be a JSON object" if kind != "missing" else "the body is empty; send a JSON object"
            return error_response(400, f"{message} ({first.get('msg', '')})", code=ErrorCode.INVALID_JSON)
        code = ErrorCode.UNKNOWN_PARAMETER if kind == "extra_forbidden" else ErrorCode.INVALID_VALUE
        param = ".".join(loc) or None
        return error_response(400, f"{param}: {first.get('msg', 'invalid')}", INVALID, param, code)

    @app.exception_handler(OrtDiffusionError)
    async def engine_error(request: Request, exc: OrtDiffusionError):
        param = API_FIELDS.get(getattr(exc, "field", ""), getattr(exc, "field", None))
        headers = {"retry-after": "1"} if exc.http_status == 429 else None
        message = str(exc)
        if isinstance(exc, InvalidRequestError) and param != exc.field:
            message = f"{param} ({exc.field}): {message.split(': ', 1)[-1]}"
        return error_response(exc.http_status, message, exc.error_type, param, exc.code, headers)

    @app.exception_handler(HTTPException)
    async def framework_error(request: Request, exc: HTTPException):
        # The framework's own answers: an unknown route, a method the route lacks, a body the JSON
        # parser could not decode (not UTF-8/16/32, a number past Python's digit limit).
        if exc.status_code == 404:
            return error_response(404, f"no route {request.method} {request.url.path}; the API is under /v1, e.g. "
                                       "POST /v1/images/generations", code=ErrorCode.NOT_FOUND)
        if exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            return error_response(405, f"{request.url.path} does not take {request.method}"
                                       + (f"; it takes {allowed}" if allowed else ""),
                                  code=ErrorCode.METHOD_NOT_ALLOWED, headers=exc.headers)
        if exc.status_code == 400:
            return error_response(400, f"the body is not valid JSON ({exc.detail})", code=ErrorCode.INVALID_JSON)
        return error_response(exc.status_code, str(exc.detail), INVALID if exc.status_code < 500 else "server_error",
                              code=ErrorCode.INVALID_VALUE if exc.status_code < 500 else ErrorCode.SERVER_ERROR,
                              headers=exc.headers)
