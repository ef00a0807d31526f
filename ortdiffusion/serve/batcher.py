"""Dynamic batching across requests, with a bounded queue, deadlines and cancellation.

One worker thread owns the pipeline. It takes the oldest waiting job, then for a short window
gathers more jobs that can share its denoising loop — same size, steps, scheduler and guidance —
up to a maximum number of images, and runs them as one batch. Every image keeps its own seed, so a
request gets the images it would get alone (up to float rounding in a larger batch). A batch larger
than `chunk_images(request)` runs as several pipeline calls, one after the other. A full queue
refuses at once (`OverloadedError`); a job whose client left or whose deadline passed is dropped
from the queue, and a running batch stops within one denoising step once none of its jobs is wanted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import numpy as np

from ..runtime.errors import DeadlineExceededError, OverloadedError
from ..runtime.pipeline import Pipeline, PipelineResult
from ..runtime.request import GenerationRequest
from ..runtime.trace import Timings
from .budget import chunks, second_prompts

logger = logging.getLogger(__name__)


#: (step, steps, latents, first image index) → None; see `Job.on_step`.
StepHook = Callable[[int, int, np.ndarray, int], None]


class Cancelled(Exception):
    """Every job of a running batch was abandoned."""


@dataclass(eq=False)
class Job:
    request: GenerationRequest
    deadline: float
    enqueued: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)
    started: float | None = None
    #: Called on the worker thread after each denoising step with this job's rows of the latents:
    #: (step, steps, latents, index of the first of them among the job's images). For streaming.
    on_step: StepHook | None = None
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def wanted(self) -> bool:
        return not self._cancelled.is_set() and time.monotonic() < self.deadline

    @property
    def compat_key(self) -> tuple:
        r = self.request
        # an image request runs only with its own chunks (the plan has one input image)
        return (r.width, r.height, r.steps, r.scheduler, r.guidance_scale, None if r.image is None else id(r.image),
                r.added, r.denoising_end, r.negative_prompt_given,  # SDXL's: one value per run
                r.guidance_rescale, r.decoder, r.long_prompts, r.lora,  # a LoRA set: other weights
                None if r.control is None else id(r.control))  # control images: only with its own chunks


@dataclass(frozen=True)
class BatchRecord:
    """What one batch did, for metrics: a chunk of a larger request counts as a batch of its own,
    with the number of requests merged into the run it is part of."""

    images: int
    jobs: int
    seconds: float


def merge(jobs: list[Job]) -> GenerationRequest:
    """One request whose images are every job's images, in job order."""
    pairs = [pair for job in jobs for pair in job.request.image_prompts()]
    first = jobs[0].request
    return replace(
        first,
        prompts=tuple(p for p, _ in pairs),
        negative_prompts=tuple(n for _, n in pairs),
        num_images_per_prompt=1,
        seeds=tuple(s for job in jobs for s in job.request.seeds),
        latents=None,
        **second_prompts([job.request for job in jobs]),
    )



def split(result: PipelineResult, jobs: list[Job]) -> list[PipelineResult]:
    out, start = [], 0
    for job in jobs:
        n = job.request.num_images
        out.append(replace(
            result, images=result.images[start:start + n], seeds=result.seeds[start:start + n],
            metadata=result.metadata[start:start + n],
        ))
        start += n
    return out


class Batcher:
    def __init__(self, pipeline: Pipeline, max_queue: int = 16, max_batch_images: int = 8,
                 window_s: float = 0.02, batching: bool = True,
                 on_batch: Callable[[BatchRecord], None] | None = None,
                 chunk_images: Callable[[GenerationRequest], int] | None = None):
        self.pipeline = pipeline
        self.chunk_images = chunk_images or (lambda request: max_batch_images)
        self.max_queue = max_queue
        self.max_batch_images = max_batch_images
        self.window_s = window_s
        self.batching = batching
        self.on_batch = on_batch
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self.in_flight = 0
        self._thread = threading.Thread(target=self._run, name="ortdiffusion-batcher", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def submit(self, request: GenerationRequest, timeout_s: float, on_step: StepHook | None = None) -> Job:
        job = Job(request, deadline=time.monotonic() + timeout_s, on_step=on_step)
        with self._cond:
            if self._stopping:
                raise OverloadedError("the service is shutting down")
            self._drop_unwanted()
            if len(self._queue) >= self.max_queue:
                raise OverloadedError(f"the queue is full ({self.max_queue} requests waiting); retry shortly")
            self._queue.append(job)
            self._cond.notify()
        return job

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued and running, then stop the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- worker ---------------------------------------------------------------------------------

    def _drop_unwanted(self) -> None:
        for job in [j for j in self._queue if not j.wanted]:
            self._queue.remove(job)
            _fail(job, DeadlineExceededError("the request's deadline passed while it was queued")
                  if not job._cancelled.is_set() else Cancelled())

    def _take_batch(self) -> list[Job]:
        with self._cond:
            while True:
                self._drop_unwanted()
                if self._queue:
                    break
                if self._stopping:
                    return []
                self._cond.wait(0.1)
            batch = [self._queue.popleft()]
            if not self.batching:
                return batch
            images, key = batch[0].request.num_images, batch[0].compat_key
            until = time.monotonic() + self.window_s
            while images < self.max_batch_images:
                fits = next((j for j in self._queue if j.compat_key == key and j.wanted
                             and images + j.request.num_images <= self.max_batch_images), None)
                if fits is not None:
                    self._queue.remove(fits)
                    batch.append(fits)
                    images += fits.request.num_images
                    continue
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                return
            self.in_flight = len(batch)
            started = time.monotonic()
            for job in batch:
                job.started = started

            def check(step: int, total: int, latents: np.ndarray, first: int) -> None:
                if not any(job.wanted for job in batch):
                    raise Cancelled()
                _report_step(batch, step, total, latents, first)

            try:
                result = self._generate(merge(batch), check, len(batch))
                for job, part in zip(batch, split(result, batch)):
                    if job.wanted:
                        job.future.set_result(part)
                    else:
                        _fail(job, Cancelled())
            except Cancelled:
                logger.info("batch of %d requests abandoned by its clients; stopped", len(batch))
                for job in batch:
                    _fail(job, Cancelled())
            except BaseException as e:  # noqa: BLE001 - hand every failure to its requests
                logger.exception("batch failed")
                for job in batch:
                    _fail(job, e)
            finally:
                self.in_flight = 0

    def _generate(self, request: GenerationRequest, check, jobs: int) -> PipelineResult:
        """The pipeline over `request` in chunks; one result, as if it had run at once."""
        parts, first = [], 0
        for part in chunks(request, self.chunk_images(request)):
            started = time.monotonic()
            parts.append(self.pipeline.generate(part, callback=lambda i, n, x, first=first: check(i, n, x, first)))
            first += part.num_images
            if self.on_batch is not None:
                self.on_batch(BatchRecord(part.num_images, jobs, time.monotonic() - started))
        if len(parts) == 1:
            return parts[0]
        timings = Timings(total=sum(p.timings.total for p in parts))
        for p in parts:
            for stage, seconds in p.timings.stages.items():
                timings.stages[stage] += seconds
            timings.unet_steps.extend(p.timings.unet_steps)
        return replace(parts[0], images=[i for p in parts for i in p.images], seeds=[s for p in parts for s in p.seeds],
                       metadata=[m for p in parts for m in p.metadata], timings=timings)


def _report_step(batch: list[Job], step: int, steps: int, latents: np.ndarray, first: int) -> None:
    """Hand each job with a step hook its own rows of a chunk's latents (images first … first + len)."""
    start = 0
    for job in batch:
        end = start + job.request.num_images
        lo, hi = max(start, first), min(end, first + len(latents))
        if job.on_step is not None and lo < hi and job.wanted:
            job.on_step(step, steps, latents[lo - first:hi - first], lo - start)
        start = end


def _fail(job: Job, error: BaseException) -> None:
    if not job.future.done():
        job.future.set_exception(error)
