"""The HTTP service: OpenAI's images API over one `Pipeline`, with an admission budget, batching,
backpressure, health and metrics. `create_app` builds it; `ortdiffusion serve` runs it under uvicorn."""

from __future__ import annotations

import asyncio
import base64
import inspect
import logging
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..runtime.errors import DeadlineExceededError, ErrorCode
from ..runtime.pipeline import Pipeline, PipelineResult
from ..runtime.png import ImageFormat, check_compression, encode_images
from ..runtime.request import GenerationRequest, make_request, parse_size, size_limits
from ..runtime.schedulers import SchedulerName
from ..runtime.vocabulary import load_vocabulary, prompt_warnings
from .batcher import Batcher, Cancelled
from .budget import admit, chunk_size
from .control_inputs import control_from_body
from .errors import error_response, install_error_handlers
from .image_inputs import image_request_args, read_form
from .images import ImageStore
from .metrics import Metrics
from .middleware import BodyGuard, Gate
from .page import page_file
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
from .settings import ServeConfig
from .stream import EDIT, GENERATION, StepEvents, StreamOptions, stream_events

logger = logging.getLogger(__name__)

#: What an image's first bytes say it is, for the media type of its URL.
_MAGIC = {b"\x89PNG": ImageFormat.PNG, b"\xff\xd8\xff": ImageFormat.JPEG, b"RIFF": ImageFormat.WEBP}


def default_instance() -> str:
    """This copy's name in `x-ortdiffusion-instance`: random, so it tells a client which copy
    answered (to compare or report) without naming the host or the process."""
    return secrets.token_hex(6)


async def _resolved(value):
    """The value, awaited if it is awaitable: image stores may be local (sync) or remote (async)."""
    return await value if inspect.isawaitable(value) else value


def create_app(pipeline: Pipeline, config: ServeConfig = ServeConfig(), store=None, instance: str | None = None) -> FastAPI:
    """The service over one pipeline. `store` keeps images for `response_format=url` (`put(bytes) →
    token`, `get(token) → bytes | None`, either may be async; default: in this process's memory).
    `instance` names this copy in the `x-ortdiffusion-instance` header (default: random)."""
    config.validate()
    model_name = config.model_name or "ortdiffusion"
    metrics = Metrics()
    store = store if store is not None else ImageStore(config.image_ttl_s, max_bytes=config.image_store_bytes)
    instance = instance or default_instance()
    vocabulary = load_vocabulary(pipeline.bundle_dir)
    if config.lora_dir:  # registered before the first request; a bad file stops the start, naming it
        logger.info("LoRAs from %s: %s", config.lora_dir, pipeline.loras.register_dir(config.lora_dir))
    state = {"ready": False}
    batcher_holder: dict[str, Batcher] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher = Batcher(pipeline, config.max_queue, config.max_batch_images, config.batch_window_s,
                          config.batching, on_batch=metrics.observe_batch,
                          chunk_images=lambda request: chunk_size(request, config))
        batcher_holder["b"] = batcher
        metrics.bind(batcher)
        await asyncio.to_thread(_warm_up, pipeline, config)
        state["ready"] = True
        logger.info("ready: %s on %s", model_name, pipeline.providers)
        yield
        state["ready"] = False
        await asyncio.to_thread(batcher.stop)

    # /docs and /redoc are off: FastAPI's pages load their scripts from a CDN, which an offline or
    # locked-down machine cannot reach; /openapi.json stays (behind the API key when one is set).
    app = FastAPI(
        title="ortdiffusion", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
        description="OpenAI-compatible images API over ONNX Runtime.",
        responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
                   413: {"model": ErrorResponse}, 421: {"model": ErrorResponse}, 429: {"model": ErrorResponse}},
    )
    install_error_handlers(app)

    def validated(body: GenerateImageRequest, n: int) -> GenerationRequest:
        width, height = (None, None) if body.size in (None, "auto") else parse_size(body.size)
        generation = make_request(pipeline.manifest, body.prompt, body.negative_prompt, n, body.steps,
                                  body.guidance_scale, body.scheduler, body.seed, None, width, height,
                                  prompt_2=body.prompt_2, negative_prompt_2=body.negative_prompt_2,
                                  schedule={"denoising_end": body.denoising_end},
                                  guidance_rescale=body.guidance_rescale, decoder=body.decoder,
                                  long_prompts=bool(body.long_prompts),
                                  control=control_from_body(pipeline.manifest, body))
        if body.lora:
            generation = replace(generation, lora=pipeline.loras.selection(body.lora))
        admit(generation, config)
        return generation

    async def run(generation: GenerationRequest, request: Request) -> tuple[PipelineResult, dict[str, str]]:
        """Queue the generation and wait for it; also the timing headers for the response."""
        job = batcher_holder["b"].submit(generation, config.request_timeout_s)
        waiter = asyncio.wrap_future(job.future)
        # An abandoned job's future fails after its handler has returned: read it, so asyncio does
        # not log "Future exception was never retrieved" for every client that left.
        waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
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
        queue_ms = ((job.started or job.enqueued) - job.enqueued) * 1e3
        request.state.images, request.state.queue_ms = len(result.images), f"{queue_ms:.1f}"
        request.state.compute_ms = f"{result.timings.total * 1e3:.1f}"
        headers = {
            "x-ortdiffusion-providers": ",".join(f"{k}={v}" for k, v in result.providers.items()),
            "x-ortdiffusion-queue-ms": request.state.queue_ms,
            "x-ortdiffusion-compute-ms": request.state.compute_ms,
            "x-ortdiffusion-instance": instance,
        }
        return result, headers

    async def encoded(result: PipelineResult, fmt: ImageFormat = ImageFormat.PNG,
                      compression: int | None = None) -> list[bytes]:
        metadata = [config.image_metadata.select(m) for m in result.metadata]
        # CPU work of tens of ms per image: on threads, off the event loop that serves every request
        return await asyncio.to_thread(encode_images, result.images, metadata, fmt, compression)

    async def image_url(request: Request, data: bytes, fmt: ImageFormat) -> str:
        # The Host header was checked against the allow-list (Gate) before it is used here.
        base = (config.public_url or str(request.base_url)).rstrip("/")
        return f"{base}/v1/images/files/{await _resolved(store.put(data))}{fmt.suffix}"

    @app.post("/v1/images/generations", response_model=ImagesResponse, tags=["images"])
    async def images_generations(body: ImageGenerationRequest, request: Request):
        if body.model is not None and body.model != model_name:
            return error_response(404, f"model {body.model!r} is not loaded; this service has {model_name!r}",
                                  param="model", code=ErrorCode.MODEL_NOT_FOUND)
        fmt = ImageFormat.parse(body.output_format)
        compression = check_compression(body.output_compression)
        generation = validated(body, body.n)
        if body.stream:
            return streamed(generation, StreamOptions(
                GENERATION, body.partial_images or 0, bool(body.progress), fmt, compression,
                f"{generation.width}x{generation.height}", quality=body.quality or "auto"))
        return await answer(generation, request, fmt, compression, body.response_format)

    def warnings_for(generation: GenerationRequest) -> list[str]:
        prompts = [p for p in generation.prompts if p]
        return prompt_warnings(pipeline.bundle_dir, prompts, generation.width, generation.height,
                               vocabulary) if vocabulary is not None and prompts else []

    def streamed(generation: GenerationRequest, options: StreamOptions) -> StreamingResponse:
        """Queue the generation and answer with its event stream (stream.py). A full queue is refused
        here, before the stream begins, as a plain 429."""
        events = StepEvents(asyncio.get_running_loop(), pipeline.previewer, options)
        job = batcher_holder["b"].submit(generation, config.request_timeout_s, on_step=events)
        events.watch(job)

        async def finish(result: PipelineResult) -> tuple[list[bytes], dict]:
            queue_s = (job.started or job.enqueued) - job.enqueued
            metrics.queue_seconds.observe(queue_s)
            metrics.compute_seconds.observe(result.timings.total)
            extra = {"providers": result.providers, "queue_ms": round(queue_s * 1e3, 1),
                     "timings": {stage.value: round(seconds, 4) for stage, seconds in result.timings.stages.items()}
                     | {"total": round(result.timings.total, 4)}}
            warnings = warnings_for(generation)
            if warnings:
                extra["warnings"] = warnings
            return await encoded(result, options.fmt, options.compression), extra

        return StreamingResponse(stream_events(job, events, config.request_timeout_s, finish),
                                 media_type="text/event-stream",
                                 headers={"x-ortdiffusion-instance": instance, "x-accel-buffering": "no"})

    async def answer(generation: GenerationRequest, request: Request, fmt: ImageFormat, compression: int | None,
                     response_format: str):
        """Run a validated request and answer it as OpenAI's images API does."""
        try:
            result, headers = await run(generation, request)
        except Cancelled:
            return Response(status_code=499)
        data = []
        for image, seed in zip(await encoded(result, fmt, compression), result.seeds):
            if response_format == "b64_json":
                data.append(ImageData(b64_json=base64.b64encode(image).decode(), seed=seed))
            else:
                data.append(ImageData(url=await image_url(request, image, fmt), seed=seed))
        warnings = warnings_for(generation)
        payload = ImagesResponse(created=int(time.time()), data=data, providers=result.providers,
                                 output_format=fmt.value, size=f"{generation.width}x{generation.height}",
                                 warnings=warnings or None)
        return JSONResponse(payload.model_dump(exclude_none=True), headers=headers)

    async def image_input(request: Request, edit: bool):
        """edits and variations: the multipart form → an image request → the same queue as generations."""
        form, files = await read_form(request, config.max_upload_bytes)
        if form.model is not None and form.model != model_name:
            return error_response(404, f"model {form.model!r} is not loaded; this service has {model_name!r}",
                                  param="model", code=ErrorCode.MODEL_NOT_FOUND)
        fmt = ImageFormat.parse(form.output_format)
        compression = check_compression(form.output_compression)
        args = image_request_args(form, files, pipeline, edit)
        generation = make_request(pipeline.manifest, args.pop("prompt"), form.negative_prompt, form.n, form.steps,
                                  form.guidance_scale, form.scheduler, form.seed, None, **args)
        admit(generation, config)
        if form.stream:
            return streamed(generation, StreamOptions(
                EDIT, form.partial_images or 0, bool(form.progress), fmt, compression,
                f"{generation.width}x{generation.height}", quality=form.quality or "auto"))
        return await answer(generation, request, fmt, compression, form.response_format)

    @app.post("/v1/images/edits", response_model=ImagesResponse, tags=["images"])
    async def images_edits(request: Request):
        """OpenAI's edits: `image`, `mask` (transparent = edit), `prompt`, as multipart/form-data."""
        return await image_input(request, edit=True)

    @app.post("/v1/images/variations", response_model=ImagesResponse, tags=["images"])
    async def images_variations(request: Request):
        """OpenAI's variations: `image` alone, as multipart/form-data."""
        return await image_input(request, edit=False)

    @app.post("/generate-image", response_model=GenerateImageResponse, tags=["images"])
    async def generate_image(body: GenerateImageRequest, request: Request):
        generation = validated(body, 1)
        try:
            result, headers = await run(generation, request)
        except Cancelled:
            return Response(status_code=499)
        (png,) = await encoded(result)
        payload = GenerateImageResponse(image_url=await image_url(request, png, ImageFormat.PNG), seed=result.seeds[0])
        return JSONResponse(payload.model_dump(), headers=headers)

    @app.get("/v1/images/files/{name}", tags=["images"], response_class=Response,
             responses={200: {"content": {f.media_type: {} for f in ImageFormat}}, 404: {"model": ErrorResponse}})
    async def image_file(name: str):
        token, _, suffix = name.partition(".")
        data = await _resolved(store.get(token))
        if data is None:
            return error_response(404, "no such image, or it expired (images live in memory: a restart forgets "
                                       "them)", param="url", code=ErrorCode.IMAGE_NOT_FOUND)
        fmt = next((f for magic, f in _MAGIC.items() if data.startswith(magic)), ImageFormat.PNG)
        return Response(data, media_type=fmt.media_type)

    @app.get("/v1/models", response_model=ModelList, tags=["models"])
    async def models():
        c = pipeline.manifest.pipeline
        low, high, multiple = size_limits(pipeline.manifest)
        defaults = {"width": c.default_width, "height": c.default_height, "steps": c.default_steps,
                    "guidance_scale": c.default_guidance, "scheduler": c.default_scheduler,
                    "size_min": low, "size_max": high, "size_multiple": multiple, "max_images": config.max_images}
        return ModelList(data=[ModelCard(id=model_name, created=int(time.time()),
                                         tasks=[t.value for t in pipeline.manifest.tasks()],
                                         defaults=defaults, schedulers=[s.value for s in SchedulerName],
                                         loras=pipeline.loras.names if pipeline.loras.enabled else None)])

    @app.get("/", include_in_schema=False)
    async def page():
        return page_file("index.html")

    @app.get("/page/{name}", include_in_schema=False)
    async def page_asset(name: str):
        return page_file(name)

    @app.get("/health/live", tags=["health"])
    async def live():
        return {"status": "live"}

    @app.get("/health/ready", tags=["health"], responses={503: {"model": ErrorResponse}})
    async def ready():
        if not state["ready"]:
            return error_response(503, "warming up", "server_error", code=ErrorCode.NOT_READY)
        return {"status": "ready", "model": model_name, "providers": pipeline.providers, "instance": instance}

    @app.get("/metrics", tags=["health"], response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.state.metrics = metrics
    app.state.store = store
    app.state.batcher = batcher_holder
    app.add_middleware(BodyGuard, max_bytes=config.max_body_bytes, max_depth=config.max_json_depth,
                       upload_bytes=2 * config.max_upload_bytes + 64 * 1024)
    app.add_middleware(Gate, api_key=config.api_key, hosts=config.hosts(), metrics=metrics)
    return app


def _warm_up(pipeline: Pipeline, config: ServeConfig) -> None:
    pipeline.sessions.load_all()  # the sessions made on first use too: an edit request should not pay for one
    c = pipeline.manifest.pipeline
    for width, height in config.warmup_sizes or ((c.default_width, c.default_height),):
        pipeline("warm up", num_inference_steps=1, width=width, height=height, seed=0)


__all__ = ["ServeConfig", "create_app"]
