"""The plan of one generation, built once on the host, and the protocol of what runs it.

    request ─► build_plan ─► Plan ─► executor (host_loop.HostLoop or device_loop.DeviceLoop) ─► pixels

A `Plan` holds everything a denoising run needs that can be known before it starts: the
timesteps, each step's linear coefficients (every scheduler reduces to them:
`schedulers/linear_step.py`), all the noise, drawn from each image's own seed, the starting
latents, the decoder's unscale/shift, and the UNet's conditioning as named arrays, with where each
UNet input comes from read from the manifest (`Manifest.unet_feeds`). An executor only runs it: the
loop never branches on a model family or a task; those change the plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from .manifest import FEED_LATENTS, FEED_REQUEST, FEED_TIMESTEP, Manifest
from .request import GenerationRequest
from .schedulers import make_scheduler
from .schedulers.linear_step import LinearStep
from .trace import Trace

#: Called after each denoising step with (step index, number of steps, the latents after it);
#: may raise to cancel. The latents are the executor's own array: copy them to keep them.
StepCallback = Callable[[int, int, np.ndarray], None]


@dataclass(frozen=True, eq=False)
class Plan:
    images: int
    #: None: unguided, one UNet row per image; else classifier-free guidance, rows [uncond; cond].
    guidance_scale: float | None
    timesteps: np.ndarray  # (steps,), the scheduler's
    steps: tuple[LinearStep, ...]  # step i's update as coefficients
    input_scales: tuple[float, ...]  # step i's factor on the latents that makes the UNet's input
    latents: np.ndarray  # (images, C, h, w) float32: the starting latents
    noise: np.ndarray | None  # (steps, images, C, h, w) float32: each step's fresh noise, or None
    #: text encoder component → its feeds (rows [uncond; cond] when guided)
    text_inputs: dict[str, dict[str, np.ndarray]]
    #: UNet input → where it comes from ("latents", "timestep", "request", "<component>/<output>")
    feeds: dict[str, str]
    #: the UNet inputs fed from the request, at the UNet's batch (rows [uncond; cond] when guided)
    conditioning: dict[str, np.ndarray]
    vae_scaling_factor: float
    vae_shift_factor: float | None

    @property
    def guided(self) -> bool:
        return self.guidance_scale is not None

    @property
    def latent_input(self) -> str:
        return next(n for n, s in self.feeds.items() if s == FEED_LATENTS)

    @property
    def timestep_input(self) -> str:
        return next(n for n, s in self.feeds.items() if s == FEED_TIMESTEP)

    def text_feeds(self) -> dict[str, tuple[str, str]]:
        """UNet input → (text encoder component, its output) for the inputs a text encoder feeds."""
        special = (FEED_LATENTS, FEED_TIMESTEP, FEED_REQUEST)
        return {n: tuple(s.split("/", 1)) for n, s in self.feeds.items() if s not in special}

    def model_input(self, latents: np.ndarray, step: int) -> np.ndarray:
        """The UNet's latent input at `step`: scaled by the scheduler, doubled when guided."""
        scale = self.input_scales[step]
        x = latents if scale == 1.0 else (latents * np.float32(scale)).astype(latents.dtype, copy=False)
        return np.concatenate([x, x]) if self.guided else x

    def padded(self, images: int) -> Plan:
        """This plan for `images` images, the extra ones copies of the last (a CUDA-graph bucket's
        fixed batch; the caller drops them again)."""
        if images <= self.images:
            return self
        rows = lambda a, axis=0: _pad_halves(a, self.images, images, self.guided, axis)  # noqa: E731
        return replace(
            self, images=images, latents=_pad(self.latents, images),
            noise=None if self.noise is None else _pad(self.noise, images, axis=1),
            text_inputs={c: {n: rows(a) for n, a in feeds.items()} for c, feeds in self.text_inputs.items()},
            conditioning={n: rows(a) for n, a in self.conditioning.items()},
        )


class Executor(Protocol):
    """Runs a plan: text encoder(s) → denoising loop → image decoder."""

    def __call__(self, plan: Plan, trace: Trace, callback: StepCallback | None = None) -> np.ndarray:
        """Pixels (images, 3, H, W) float32 in [-1, 1], finite (else `NumericalError`)."""
        ...


def build_plan(manifest: Manifest, request: GenerationRequest, text_inputs: dict[str, dict[str, np.ndarray]]) -> Plan:
    """The plan of `request`; `text_inputs`: each text encoder's feeds, tokenized by the caller."""
    c = manifest.pipeline
    # 1. timesteps and each step's coefficients
    scheduler = make_scheduler(request.scheduler, c.scheduler_config)
    scheduler.set_timesteps(request.steps)
    steps = tuple(scheduler.linear_step(i) for i in range(request.steps))
    scales = tuple(scheduler.input_scale(i) for i in range(request.steps))
    # 2. all noise, one generator per image, so that an image depends only on its own seed: the
    #    starting latents first, then each step's (for schedulers that add noise), in that order
    generators = [np.random.Generator(np.random.PCG64(s)) for s in request.seeds]
    shape = (c.latent_channels, request.height // c.vae_scale_factor, request.width // c.vae_scale_factor)
    start = request.latents if request.latents is not None else draw(generators, shape)
    noise = np.stack([draw(generators, shape) for _ in range(request.steps)]) if scheduler.needs_noise else None
    # 3. the UNet's conditioning: what the request gives, repeated for the unconditional half
    feeds = manifest.unet_feeds()
    conditioning = {}
    for name, source in feeds.items():
        if source == FEED_REQUEST:
            value = request.conditioning[name]
            conditioning[name] = np.concatenate([value, value]) if request.do_guidance else value
    return Plan(
        images=request.num_images,
        guidance_scale=request.guidance_scale if request.do_guidance else None,
        timesteps=scheduler.timesteps, steps=steps, input_scales=scales,
        latents=(start * np.float32(scheduler.init_noise_sigma)).astype(np.float32), noise=noise,
        text_inputs=text_inputs, feeds=feeds, conditioning=conditioning,
        vae_scaling_factor=c.vae_scaling_factor, vae_shift_factor=c.vae_shift_factor,
    )


def draw(generators: list[np.random.Generator], shape: tuple[int, ...]) -> np.ndarray:
    """One standard-normal array per image, stacked: (images, *shape) float32."""
    return np.stack([g.standard_normal(shape, dtype=np.float32) for g in generators])


def _pad(array: np.ndarray, to: int, axis: int = 0) -> np.ndarray:
    """`array` with its last entry along `axis` repeated until it has `to` entries."""
    missing = to - array.shape[axis]
    if missing <= 0:
        return array
    last = np.take(array, [-1], axis=axis)
    return np.concatenate([array, np.repeat(last, missing, axis=axis)], axis=axis)


def _pad_halves(array: np.ndarray, images: int, to: int, guided: bool, axis: int = 0) -> np.ndarray:
    """`_pad` of per-image rows; guided arrays are two halves [uncond; cond], each padded."""
    if not guided:
        return _pad(array, to, axis)
    return np.concatenate([_pad(array[:images], to, axis), _pad(array[images:], to, axis)], axis=axis)


__all__ = ["Executor", "Plan", "StepCallback", "build_plan", "draw"]
