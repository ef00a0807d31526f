"""The plan of one generation, built once on the host, and the protocol of what runs it.

    request ─► build_plan ─► Plan ─► executor (host_loop.HostLoop or device_loop.DeviceLoop) ─► pixels

A `Plan` holds everything a denoising run needs that can be known before it starts: the
timesteps, each step's linear coefficients (every scheduler reduces to them:
`schedulers/linear_step.py`), all the noise, drawn from each image's own seed, the starting
latents, the decoder's unscale/shift, and the UNet's conditioning as named arrays, with where each
UNet input comes from read from the manifest (`Manifest.unet_feeds`). An executor only runs it: the
loop never branches on a model family or a task; those change the plan.

Image inputs change the plan only (`ImageLatents`, encoded by the caller before the plan is built):
image-to-image starts part way into the schedule from the image's latents, noised to that step;
inpainting with a plain UNet blends the kept region's latents back after every step (`blend_mask`,
`blend_known`); a 9-channel inpainting UNet reads the mask and the masked image's latents as one
more conditioning input (manifest feed "inpaint").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from .control import ControlPlan, control_plan, zero_residual
from .errors import InvalidRequestError
from .manifest import (FEED_CONTROLNET, FEED_GUIDANCE, FEED_INPAINT, FEED_LATENTS, FEED_REQUEST, FEED_TIME_IDS,
                       FEED_TIMESTEP, SPECIAL_FEEDS, Manifest)
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
    #: Inpainting with a plain UNet: after step i the latents become
    #: blend_mask · latents + blend_known[i] (the kept region, noised to the next step's level).
    blend_mask: np.ndarray | None = None  # (images, 1, h, w): 1 where the image is repainted
    blend_known: np.ndarray | None = None  # (steps, images, C, h, w)
    #: SDXL's `force_zeros_for_empty_prompt`: the unconditional rows of every text encoder output the
    #: UNet reads are zeros (the executors zero them after the text encoders run).
    zero_uncond: bool = False
    #: False: the executor returns the final latents (as the UNet sees them), not pixels (diffusers'
    #: output_type="latent": an SDXL base handing over to its refiner).
    decode: bool = True
    #: diffusers' `guidance_rescale` φ (Lin et al. 2023, §3.4): the guided prediction rescaled to the
    #: conditional one's standard deviation, mixed φ : 1 − φ with itself; 0 leaves it as it is.
    guidance_rescale: float = 0.0
    #: The decoder that turns the final latents into pixels: "full" or "tiny" (`manifest.DECODERS`).
    decoder: str = "full"
    #: Long prompts: each prompt's windows of tokens on this many consecutive text-encoder rows,
    #: joined after the text encoder (`join_chunks`); 1 for ordinary prompts.
    text_chunks: int = 1
    #: Inputs of a component that are the same for every row and step: the LoRA set's side-branch
    #: weights (runtime/lora.py), component → {input: array}; the executors add them to its feeds.
    adapter_feeds: Mapping[str, Mapping[str, np.ndarray]] = field(default_factory=dict)
    #: The ControlNets' part (runtime/control.py): run before the UNet at each step, their summed
    #: residuals replacing the zeros `conditioning` holds for those inputs. None: no control image.
    control: ControlPlan | None = None

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
        return {n: tuple(s.split("/", 1)) for n, s in self.feeds.items() if s not in SPECIAL_FEEDS}

    def join_chunks(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A text encoder's outputs with each prompt's windows joined: hidden states (rows × chunks,
        L, d) → (rows, chunks × L, d), concatenated along the sequence; a pooled output (rows ×
        chunks, d) → the first window's (as the web UIs do)."""
        k = self.text_chunks
        if k == 1:
            return outputs
        joined = {}
        for name, a in outputs.items():
            a = np.asarray(a)
            rows = a.reshape(a.shape[0] // k, k, *a.shape[1:])
            joined[name] = rows.reshape(rows.shape[0], k * a.shape[1], *a.shape[2:]) if a.ndim == 3 else rows[:, 0]
        return joined

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
            blend_mask=None if self.blend_mask is None else _pad(self.blend_mask, images),
            blend_known=None if self.blend_known is None else _pad(self.blend_known, images, axis=1),
        )

    def blend(self, latents: np.ndarray, step: int) -> np.ndarray:
        """The latents after step `step` with the kept region put back (inpainting, plain UNet)."""
        if self.blend_mask is None:
            return latents
        return self.blend_mask * latents + self.blend_known[step]


@dataclass(frozen=True)
class ImageLatents:
    """The image encoder's latent distribution of one input image: (1, C, h, w) mean and standard
    deviation (diffusers' `latent_dist`), sampled in the plan with each image's own seed."""

    mean: np.ndarray
    std: np.ndarray


class Executor(Protocol):
    """Runs a plan: text encoder(s) → denoising loop → image decoder."""

    def __call__(self, plan: Plan, trace: Trace, callback: StepCallback | None = None) -> np.ndarray:
        """Pixels (images, 3, H, W) float32 in [-1, 1], finite (else `NumericalError`)."""
        ...


def build_plan(manifest: Manifest, request: GenerationRequest, text_inputs: dict[str, dict[str, np.ndarray]],
               encoded: dict[str, ImageLatents] | None = None, text_chunks: int = 1) -> Plan:
    """The plan of `request`; `text_inputs`: each text encoder's feeds, tokenized by the caller
    (`text_chunks` windows per prompt for long prompts); `encoded`: the image encoder's output for
    "image" and, when inpainting, "masked_image"."""
    c = manifest.pipeline
    # 1. timesteps and each step's coefficients, from the first step the request runs (an input
    #    image's strength skips the noisiest ones: diffusers' `get_timesteps`)
    scheduler = make_scheduler(request.scheduler, c.scheduler_config)
    # (LCM shortens its schedule to the strength instead, and runs every step of it)
    strength_in_schedule = getattr(scheduler, "schedules_strength", False) and request.has_image \
        and request.denoising_start is None
    if strength_in_schedule:
        scheduler.set_timesteps(request.steps, strength=request.strength)
    else:
        scheduler.set_timesteps(request.steps)
    first, stop = _window(request, scheduler.timesteps, int(c.scheduler_config.get("num_train_timesteps", 1000)),
                          0 if strength_in_schedule else request.first_step)
    scheduler.begin_index = first
    run = range(first, stop)
    steps = tuple(scheduler.linear_step(i) for i in run)
    scales = tuple(scheduler.input_scale(i) for i in run)
    # 2. all noise, one generator per image, so that an image depends only on its own seed, drawn
    #    in the order diffusers draws it: the starting latents (for an input image: its latent
    #    sample, then the noise added to it, then the masked image's sample), then each step's
    generators = [np.random.Generator(np.random.PCG64(s)) for s in request.seeds]
    shape = (c.latent_channels, request.height // c.vae_scale_factor, request.width // c.vae_scale_factor)
    feeds = manifest.unet_feeds()
    blend_mask = blend_known = None
    conditioning = {}
    if not request.has_image:
        start = request.latents if request.latents is not None else draw(generators, shape)
        latents = start * np.float32(scheduler.init_noise_sigma)
    else:
        latents, image_latents, start_noise, masked = _image_start(manifest, request, scheduler, encoded or {},
                                                                   generators, shape)
        if request.mask is not None:
            mask = np.repeat(request.mask[:, :, ::c.vae_scale_factor, ::c.vae_scale_factor], len(generators), axis=0)
            inpaint = [n for n, source in feeds.items() if source == FEED_INPAINT]
            if inpaint:  # a 9-channel inpainting UNet reads [mask; masked image latents] beside its latents
                value = np.concatenate([mask, masked], axis=1)
                conditioning[inpaint[0]] = np.concatenate([value, value]) if request.do_guidance else value
            else:  # any other UNet: the kept region's latents go back in after every step
                blend_mask, blend_known = mask, _known_region(scheduler, run, image_latents, start_noise, mask)
    noise = np.stack([draw(generators, shape) for _ in run]) if scheduler.needs_noise else None
    # 3. the UNet's conditioning: what the request gives, repeated for the unconditional half; an
    #    LCM UNet's guidance scale embedding (diffusers' w = scale − 1); SDXL's time ids from the
    #    request's sizes (the refiner's: and aesthetic scores), their own per half
    for name, source in feeds.items():
        if source == FEED_REQUEST:
            value = request.conditioning[name]
            conditioning[name] = np.concatenate([value, value]) if request.do_guidance else value
        elif source == FEED_GUIDANCE:
            dim = next(i.shape[-1] for i in manifest.components["unet"].inputs if i.name == name)
            w = np.full(request.num_images, request.guidance_scale - 1.0, dtype=np.float32)
            conditioning[name] = guidance_embedding(w, dim)
        elif source == FEED_TIME_IDS:
            negative, positive = request.added.time_ids(request.height, request.width, c.requires_aesthetics_score,
                                                        request.has_image)
            rows = [negative] * request.num_images * request.do_guidance + [positive] * request.num_images
            conditioning[name] = np.asarray(rows, dtype=np.float32)
        elif source == FEED_CONTROLNET:  # zeros: no effect, unless a control image's ControlNets replace them
            conditioning[name] = zero_residual(manifest, name, request.num_images * (1 + request.do_guidance),
                                               shape[1], shape[2])
    control = None
    if request.control is not None:
        control = control_plan(manifest, request.control, request.num_images, request.do_guidance, len(run),
                               request.width, request.height)
    return Plan(
        images=request.num_images,
        guidance_scale=request.guidance_scale if request.do_guidance else None,
        timesteps=scheduler.timesteps[first:stop], steps=steps, input_scales=scales,
        latents=latents.astype(np.float32), noise=noise,
        text_inputs=text_inputs, feeds=feeds, conditioning=conditioning,
        vae_scaling_factor=c.vae_scaling_factor, vae_shift_factor=c.vae_shift_factor,
        blend_mask=blend_mask, blend_known=blend_known,
        zero_uncond=request.do_guidance and c.force_zeros_for_empty_prompt and not request.negative_prompt_given,
        decode=request.output_type != "latent",
        guidance_rescale=request.guidance_rescale if request.do_guidance else 0.0,
        decoder=request.decoder, text_chunks=text_chunks, control=control,
    )


def _window(request: GenerationRequest, timesteps: np.ndarray, train_steps: int, first: int) -> tuple[int, int]:
    """(first, stop): the steps of the schedule the request runs. An input image's strength skips the
    noisiest (diffusers' `get_timesteps`); diffusers' ensemble of experts cuts the schedule at a
    timestep: the base runs the steps at or above it (`denoising_end`), the refiner the ones below
    (`denoising_start`)."""
    stop = len(timesteps)
    if request.denoising_start is not None:
        cutoff = int(round(train_steps - request.denoising_start * train_steps))
        first = len(timesteps) - int((timesteps < cutoff).sum())
    if request.denoising_end is not None:
        cutoff = int(round(train_steps - request.denoising_end * train_steps))
        stop = int((timesteps >= cutoff).sum())
    if stop <= first:
        raise InvalidRequestError("denoising_end" if request.denoising_end is not None else "denoising_start",
                                  f"leaves no denoising step of the {request.steps} to run")
    return first, stop


def guidance_embedding(w: np.ndarray, dim: int) -> np.ndarray:
    """(len(w), dim) float32: the sinusoidal embedding of the guidance scale an LCM UNet reads as
    `timestep_cond` (diffusers' `get_guidance_scale_embedding`, after VDM), in float32 as diffusers."""
    half = dim // 2
    frequencies = np.exp(np.arange(half, dtype=np.float32) * -(np.log(np.float32(10000.0)) / np.float32(half - 1)))
    angles = (w.astype(np.float32) * np.float32(1000.0))[:, None] * frequencies[None, :]
    embedding = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    if dim % 2:
        embedding = np.pad(embedding, ((0, 0), (0, 1)))
    return embedding.astype(np.float32)


def rescale_guidance(guided: np.ndarray, cond: np.ndarray, rescale: float) -> np.ndarray:
    """diffusers' `rescale_noise_cfg`: the guided prediction at the conditional one's standard
    deviation (per image), mixed `rescale` : 1 − `rescale` with itself."""
    axes = tuple(range(1, guided.ndim))
    rescaled = guided * (cond.std(axis=axes, keepdims=True) / guided.std(axis=axes, keepdims=True))
    return (np.float32(rescale) * rescaled + np.float32(1 - rescale) * guided).astype(guided.dtype, copy=False)


def _image_start(manifest: Manifest, request: GenerationRequest, scheduler, encoded: dict[str, ImageLatents],
                 generators: list[np.random.Generator], shape: tuple[int, ...]):
    """(starting latents, the image's latents, the noise added to them, the masked image's latents)
    of a request with an input image, as diffusers' img2img and inpainting pipelines make them:
    inpainting at strength 1 starts from pure noise; everything else from the image's latents
    noised to the first step's level."""
    inpaint_unet = FEED_INPAINT in manifest.unet_feeds().values()
    pure_noise = request.mask is not None and request.strength == 1.0
    # a 9-channel UNet starting from noise never needs the image's own latents (diffusers skips it)
    if request.image_latents is not None:  # latents given as the image (SDXL's refiner): no sample drawn
        image_latents = request.image_latents
    else:
        image_latents = None if inpaint_unet and pure_noise else _sample(manifest, encoded["image"], generators)
    if request.denoising_start is not None:  # the ensemble's hand-off: the latents as they are, no noise
        return image_latents, image_latents, None, None
    start_noise = draw(generators, shape)
    if pure_noise:
        latents = start_noise * np.float32(scheduler.init_noise_sigma)
    else:
        a, b = scheduler.noising(scheduler.begin_index)
        latents = np.float32(a) * image_latents + np.float32(b) * start_noise
    # diffusers encodes the masked image for both kinds of UNet (and so draws its sample)
    masked = _sample(manifest, encoded["masked_image"], generators) if request.mask is not None else None
    return latents, image_latents, start_noise, masked


def _sample(manifest: Manifest, encoded: ImageLatents, generators: list[np.random.Generator]) -> np.ndarray:
    """One latent sample of the encoded image per generator, scaled as the UNet sees latents."""
    c = manifest.pipeline
    x = np.concatenate([encoded.mean + encoded.std * g.standard_normal(encoded.mean.shape[1:], dtype=np.float32)[None]
                        for g in generators])
    if c.vae_shift_factor is not None:
        x = x - np.float32(c.vae_shift_factor)
    return (x * np.float32(c.vae_scaling_factor)).astype(np.float32)


def _known_region(scheduler, run: range, image_latents: np.ndarray, noise: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per step of `run`: the kept region (mask 0) of the image's latents, noised to the level the
    latents have after that step (none after the last), as diffusers' inpainting with a plain UNet."""
    rows = []
    for i in run:
        if i + 1 < run.stop:
            a, b = scheduler.noising(i + 1)
            known = np.float32(a) * image_latents + np.float32(b) * noise
        else:
            known = image_latents
        rows.append((1 - mask) * known)
    return np.stack(rows).astype(np.float32)


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


__all__ = ["Executor", "ImageLatents", "Plan", "StepCallback", "build_plan", "draw", "guidance_embedding",
           "rescale_guidance"]
