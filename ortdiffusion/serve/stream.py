"""Streaming answers (`stream: true`), as OpenAI's images API streams them: server-sent events,
`<kind>.partial_image` events with a preview (`partial_images` of them, 0–3, per image) while the
image denoises, then one `<kind>.completed` event per image; `<kind>` is `image_generation` for
generations and `image_edit` for edits. An error after the stream began is an `error` event with
the API's error body, which OpenAI's client raises as an `APIError`.

Extensions, which OpenAI's client keeps as extra fields: every event names its `image_index`;
a completed event carries the image's `seed`, the `providers` that ran, each stage's `timings`
(seconds) and the prompt's `warnings`. With `progress: true` (the page asks for it) a
`<kind>.progress` event follows every denoising step: `step` of `steps`.

The worker thread hands each step's latents to `StepEvents` (the batcher's `Job.on_step`); it
projects the latents to small previews there (runtime/preview.py: one small matrix product) and
queues them to the event loop, which encodes and sends them. A client that leaves cancels the job:
Starlette cancels the stream, and the stream's `finally` cancels the job, which stops within a step.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from ..runtime.errors import DeadlineExceededError, ErrorCode, OrtDiffusionError
from ..runtime.pipeline import PipelineResult
from ..runtime.png import ImageFormat, encode_images
from ..runtime.preview import Previewer
from .batcher import Cancelled, Job

GENERATION, EDIT = "image_generation", "image_edit"
_DONE = object()


def preview_steps(steps: int, partial_images: int) -> frozenset[int]:
    """The 0-based steps after which a partial image is sent: evenly spaced, never after the last
    step (the final image follows it); fewer than asked when there are too few steps."""
    if partial_images <= 0 or steps < 2:
        return frozenset()
    return frozenset(min(steps - 2, max(0, round(steps * (j + 1) / (partial_images + 1)) - 1))
                     for j in range(partial_images))


@dataclass(frozen=True)
class StreamOptions:
    kind: str  # GENERATION or EDIT
    partial_images: int
    progress: bool
    fmt: ImageFormat
    compression: int | None
    size: str
    background: str = "opaque"
    quality: str = "auto"


class StepEvents:
    """A job's step hook (worker thread) → a queue the stream reads (event loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, previewer: Previewer, options: StreamOptions):
        self.loop, self.previewer, self.options = loop, previewer, options
        self.queue: asyncio.Queue = asyncio.Queue()

    def _put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def __call__(self, step: int, steps: int, latents: np.ndarray, first: int) -> None:
        if self.options.progress:
            self._put(("progress", step, steps, first, len(latents)))
        if step in preview_steps(steps, self.options.partial_images):
            self._put(("partial", step, steps, first, self.previewer.pixels(latents)))

    def watch(self, job: Job) -> None:
        job.future.add_done_callback(lambda _: self._put(_DONE))


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def error_event(error: BaseException) -> bytes:
    if isinstance(error, OrtDiffusionError):
        body = {"message": str(error), "type": error.error_type, "param": getattr(error, "field", None),
                "code": error.code.value}
    else:
        body = {"message": "internal error", "type": "server_error", "param": None, "code": ErrorCode.SERVER_ERROR.value}
    return sse("error", {"type": "error", "error": body})


async def stream_events(job: Job, events: StepEvents, deadline_s: float,
                        finish: Callable[[PipelineResult], Awaitable[tuple[list[bytes], dict]]]) -> AsyncIterator[bytes]:
    """The job's events until its images are done. `finish(result)`: the encoded images and the
    completed events' extension fields."""
    o = events.options
    common = {"background": o.background, "output_format": o.fmt.value, "quality": o.quality, "size": o.size}
    partial_index: dict[int, int] = {}
    try:
        while True:
            left = job.deadline - time.monotonic()
            try:
                item = await asyncio.wait_for(events.queue.get(), timeout=max(left, 0.001))
            except TimeoutError:
                job.cancel()
                yield error_event(DeadlineExceededError(f"the request took longer than {deadline_s:g} s"))
                return
            if item is _DONE:
                break
            kind, step, steps, first, payload = item
            if kind == "progress":
                for k in range(first, first + payload):
                    yield sse(f"{o.kind}.progress", {"type": f"{o.kind}.progress", "image_index": k,
                                                    "step": step + 1, "steps": steps})
                continue
            encoded = await asyncio.to_thread(encode_images, events.previewer.upscale(payload),
                                              [{}] * len(payload), o.fmt, o.compression)
            for k, data in enumerate(encoded, start=first):
                index = partial_index[k] = partial_index.get(k, -1) + 1
                yield sse(f"{o.kind}.partial_image", {
                    "type": f"{o.kind}.partial_image", "b64_json": base64.b64encode(data).decode(),
                    "created_at": int(time.time()), "partial_image_index": index, "image_index": k,
                    **common})
        try:
            result = job.future.result()
        except Cancelled:
            return
        except BaseException as e:  # noqa: BLE001 - every failure goes to the client as an error event
            yield error_event(e)
            return
        images, extra = await finish(result)
        for k, (data, seed) in enumerate(zip(images, result.seeds)):
            yield sse(f"{o.kind}.completed", {
                "type": f"{o.kind}.completed", "b64_json": base64.b64encode(data).decode(),
                "created_at": int(time.time()), "image_index": k, "seed": seed, **common, **extra})
    finally:
        job.cancel()  # a client that left (Starlette cancels the stream) or a finished job: stop work


__all__ = ["EDIT", "GENERATION", "StepEvents", "StreamOptions", "preview_steps", "stream_events"]
