"""The HTTP service: OpenAI's images API over one `Pipeline`, with batching, backpressure,
health and metrics. `create_app` builds it; `ortdiffusion serve` runs it under uvicorn."""

from __future__ import annotations

import asyncio
import base64
import inspect
import logging
import os
import socket
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..runtime.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    OrtDiffusionError,
)
from ..runtime.pipeline import Pipeline, PipelineResult
from ..runtime.request import make_request
from .batcher import Batcher, Cancelled
from .images import ImageStore
from .metrics import Metrics
from .schemas import (
    ErrorResponse,
    GenerateImageRequest,
    GenerateImageResponse,
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
)

logger = logging.getLogger(__name__)

# The pipeline's argument names → the API's field names, for error messages' `param`.
API_FIELDS = {"num_images_per_prompt": "n", "num_inference_steps": "steps", "width": "size", "height": "size"}


@dataclass(frozen=True)
class ServeConfig:
    model_name: str = "ortdiffusion"
    api_key: str | None = None
    max_queue: int = 16
    max_batch_images: int = 8
    batch_window_s: float = 0.02
    batching: bool = True
    request_timeout_s: float = 300.0
    max_body_bytes: int = 64 * 1024
    max_json_depth: int = 32
    image_ttl_s: float = 3600.0
    #: (width, height) shapes run once before /health/ready answers 200; empty: the model's default.
    warmup_sizes: tuple[tuple[int, int], ...] = field(default_factory=tuple)
    public_url: str | None = None


def error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    retry = "true" if status in (429, 503, 504) or status >= 500 else "false"
    return JSONResponse(body, status_code=status, headers={"x-should-retry": retry, **(headers or {})})


class BodyGuard:
    """ASGI middleware: refuse a body over the limit (413) before reading it, and JSON nested
    deeper than the limit (400) before any parser recurses into it."""

    def __init__(self, app, max_bytes: int, max_depth: int):
        self.app, self.max_bytes, self.max_depth = app, max_bytes, max_depth

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await _send(error_response(413, f"request body exceeds {self.max_bytes} bytes", "invalid_request_error",
                                              code="request_too_large"), scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await _send(error_response(413, f"request body exceeds {self.max_bytes} bytes",
                                                  "invalid_request_error", code="request_too_large"), scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        if _json_depth(body) > self.max_depth:
            return await _send(error_response(400, f"JSON nested deeper than {self.max_depth} levels",
                                              "invalid_request_error", code="invalid_json"), scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: the real channel, so disconnects are seen

        await self.app(scope, replay, send)


class AuthAndCount:
    """ASGI middleware: the optional API key on the API routes (not health, metrics or image URLs,
    whose unguessable tokens are their credential), and a count of every response by status."""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        protected = (path.startswith("/v1/") and not path.startswith("/v1/images/files/")) or path == "/generate-image"
        if self.api_key and protected:
            headers = dict(scope.get("headers") or [])
            if headers.get(b"authorization", b"").decode("latin-1") != f"Bearer {self.api_key}":
                self.metrics.count(path, 401)
                return await _send(error_response(401, "missing or wrong API key (Authorization: Bearer …)",
                                                  "invalid_request_error", code="invalid_api_key"), scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.count(path, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


async def _send(response: Response, scope, receive, send) -> None:
    await response(scope, receive, send)


def _json_depth(body: bytes) -> int:
    """The deepest nesting of [ and { outside strings, without parsing (no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def default_instance() -> str:
    """This process's name in `x-ortdiffusion-instance`: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


async def _resolved(value):
    """The value, awaited if it is awaitable: image stores may be local (sync) or remote (async)."""
    return await value if inspect.isawaitable(value) else value


def create_app(pipeline: Pipeline, config: ServeConfig = ServeConfig(), store=None, instance: str | None = None) -> FastAPI:
    """The service over one pipeline. `store` keeps PNGs for `response_format=url` (`put(png) →
    token`, `get(token) → png | None`, either may be async; default: in this process). `instance`
    names this copy of the service in the `x-ortdiffusion-instance` header (default host:pid)."""
    metrics = Metrics()
    store = store if store is not None else ImageStore(config.image_ttl_s)
    instance = instance or default_instance()
    state = {"ready": False}
    batcher_holder: dict[str, Batcher] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher = Batcher(pipeline, config.max_queue, config.max_batch_images, config.batch_window_s,
                          config.batching, on_batch=metrics.observe_batch)
        batcher_holder["b"] = batcher
        metrics.bind(batcher)
        await asyncio.to_thread(_warm_up, pipeline, config)
        state["ready"] = True
        logger.info("ready: %s on %s", config.model_name, pipeline.providers)
        yield
        state["ready"] = False
        await asyncio.to_thread(batcher.stop)

    app = FastAPI(
        title="ortdiffusion", version="1", lifespan=lifespan,
        description="OpenAI-compatible images API over ONNX Runtime.",
        responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
                   413: {"model": ErrorResponse}, 429: {"model": ErrorResponse}},
    )

    # -- errors in OpenAI's shape ---------------------------------------------------------------

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        kind = first.get("type", "")
        if kind == "json_invalid" or (not loc and kind in ("missing", "model_attributes_type", "dict_type")):
            message = "the body must be a JSON object" if kind != "missing" else "the body is empty; send a JSON object"
            return error_response(400, f"{message} ({first.get('msg', '')})", "invalid_request_error", code="invalid_json")
        code = "unknown_parameter" if kind == "extra_forbidden" else "invalid_value"
        param = ".".join(loc) or None
        return error_response(400, f"{param}: {first.get('msg', 'invalid')}", "invalid_request_error", param, code)

    @app.exception_handler(OrtDiffusionError)
    async def engine_error(request: Request, exc: OrtDiffusionError):
        param = API_FIELDS.get(getattr(exc, "field", ""), getattr(exc, "field", None))
        headers = {"retry-after": "1"} if exc.http_status == 429 else None
        message = str(exc)
        if isinstance(exc, InvalidRequestError) and param != exc.field:
            message = f"{param} ({exc.field}): {message.split(': ', 1)[-1]}"
        return error_response(exc.http_status, message, exc.error_type, param, type(exc).__name__, headers)

    # -- the API --------------------------------------------------------------------------------

    async def run(body: GenerateImageRequest, n: int, request: Request) -> tuple[PipelineResult, dict[str, str]]:
        """Queue the generation and wait for it; also the timing headers for the response."""
        width, height = _parse_size(body.size)
        generation = make_request(
            pipeline.manifest, body.prompt, body.negative_prompt, n,
            body.steps, body.guidance_scale,
            body.scheduler, body.seed, None, width, height,
        )
        job = batcher_holder["b"].submit(generation, config.request_timeout_s)
        waiter = asyncio.wrap_future(job.future)
        try:
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=0.1)
                if done:
                    break
                if await request.is_disconnected():
                    job.cancel()
                    raise Cancelled()
                if time.monotonic() > job.deadline:
                    job.cancel()
                    raise DeadlineExceededError(f"the request took longer than {config.request_timeout_s:g} s")
            result = waiter.result()
        except asyncio.CancelledError:
            job.cancel()  # the task was cancelled (e.g. by Ray Serve when its client went away)
            raise
        finally:
            if job.started is not None:
                metrics.queue_seconds.observe(job.started - job.enqueued)
        metrics.compute_seconds.observe(result.timings.total)
        headers = {
            "x-ortdiffusion-providers": ",".join(f"{k}={v}" for k, v in result.providers.items()),
            "x-ortdiffusion-queue-ms": f"{((job.started or job.enqueued) - job.enqueued) * 1e3:.1f}",
            "x-ortdiffusion-compute-ms": f"{result.timings.total * 1e3:.1f}",
            "x-ortdiffusion-instance": instance,
        }
        return result, headers

    async def image_url(request: Request, png: bytes) -> str:
        base = (config.public_url or str(request.base_url)).rstrip("/")
        return f"{base}/v1/images/files/{await _resolved(store.put(png))}.png"

    @app.post("/v1/images/generations", response_model=ImagesResponse, tags=["images"])
    async def images_generations(body: ImageGenerationRequest, request: Request):
        if body.model is not None and body.model != config.model_name:
            return error_response(404, f"model {body.model!r} is not loaded; this service has {config.model_name!r}",
                                  "invalid_request_error", "model", "model_not_found")
        try:
            result, headers = await run(body, body.n, request)
        except Cancelled:
            return Response(status_code=499)
        data = []
        # CPU work of tens of ms per image: on threads, off the event loop that serves every request
        pngs = await asyncio.to_thread(result.pngs)
        for png, seed in zip(pngs, result.seeds):
            if body.response_format == "b64_json":
                data.append(ImageData(b64_json=base64.b64encode(png).decode(), seed=seed))
            else:
                data.append(ImageData(url=await image_url(request, png), seed=seed))
        payload = ImagesResponse(created=int(time.time()), data=data, providers=result.providers)
        return JSONResponse(payload.model_dump(exclude_none=True), headers=headers)

    @app.post("/generate-image", response_model=GenerateImageResponse, tags=["images"])
    async def generate_image(body: GenerateImageRequest, request: Request):
        try:
            result, headers = await run(body, 1, request)
        except Cancelled:
            return Response(status_code=499)
        (png,) = await asyncio.to_thread(result.pngs)
        payload = GenerateImageResponse(image_url=await image_url(request, png), seed=result.seeds[0])
        return JSONResponse(payload.model_dump(), headers=headers)

    @app.get("/v1/images/files/{token}.png", tags=["images"], response_class=Response,
             responses={200: {"content": {"image/png": {}}}, 404: {"model": ErrorResponse}})
    async def image_file(token: str):
        png = await _resolved(store.get(token))
        if png is None:
            return error_response(404, "no such image, or it expired", "invalid_request_error", "url", "image_not_found")
        return Response(png, media_type="image/png")

    @app.get("/v1/models", response_model=ModelList, tags=["models"])
    async def models():
        return ModelList(data=[ModelCard(id=config.model_name, created=int(time.time()))])

    @app.get("/health/live", tags=["health"])
    async def live():
        return {"status": "live"}

    @app.get("/health/ready", tags=["health"], responses={503: {"model": ErrorResponse}})
    async def ready():
        if not state["ready"]:
            return error_response(503, "warming up", "server_error", code="not_ready")
        return {"status": "ready", "model": config.model_name, "providers": pipeline.providers}

    @app.get("/metrics", tags=["health"], response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.state.metrics = metrics
    app.state.store = store
    app.state.batcher = batcher_holder
    # Plain ASGI middleware, not BaseHTTPMiddleware: that one hides client disconnects from the
    # handlers, and cancelling abandoned work depends on seeing them.
    app.add_middleware(BodyGuard, max_bytes=config.max_body_bytes, max_depth=config.max_json_depth)
    app.add_middleware(AuthAndCount, api_key=config.api_key, metrics=metrics)
    return app


def _parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None:
        return None, None
    w, h = size.split("x")
    return int(w), int(h)


def _warm_up(pipeline: Pipeline, config: ServeConfig) -> None:
    c = pipeline.manifest.pipeline
    for width, height in config.warmup_sizes or ((c.default_width, c.default_height),):
        pipeline("warm up", num_inference_steps=1, width=width, height=height, seed=0)


__all__ = ["ServeConfig", "create_app"]
