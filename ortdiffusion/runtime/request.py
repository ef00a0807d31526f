"""Validation of a generation request at the edge, into one frozen, typed value.

Every check names the field and what is allowed (`InvalidRequestError`). The CLI, the Python API
and the HTTP service all go through `make_request`, so they refuse the same things the same way.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import InvalidRequestError
from .control import ControlRequest
from .image_input import ImageSource, default_size, image_array, mask_array, open_image
from .manifest import FEED_INPAINT, FEED_REQUEST, FEED_TIME_IDS, SPECIAL_FEEDS, UNET, VAE_ENCODER, Manifest
from .schedulers import SchedulerName

# The one set of limits: the CLI, the Python API and the HTTP service all validate through
# `make_request` with these (the service reads them from here). 150 steps: past ~50 no scheduler
# here changes the picture (README's adherence table), and a service must bound a request's work;
# the CLI allowed 1000 and the service 150 before, so the same request got two answers.
MAX_STEPS = 150
MAX_IMAGES = 32  # per call: prompts × images per prompt
MAX_GUIDANCE = 100.0
MAX_SEED = 2**63 - 1
#: A prompt must say something: OpenAI's images API refuses an empty one and so did the service;
#: an empty (or blank) prompt from the CLI or Python was mostly a shell slip (an unset variable),
#: answered with a random picture. Refused everywhere, naming the field. (Negative prompts may be empty.)
MIN_PROMPT_CHARS = 1
#: diffusers' defaults: img2img keeps some of the image (0.8), inpainting repaints the region fully (1.0).
DEFAULT_STRENGTH_IMAGE, DEFAULT_STRENGTH_INPAINT = 0.8, 1.0
#: A variation (`ortdiffusion vary`, `/v1/images/variations`) of an SD-family bundle is image-to-image
#: with the empty prompt at this strength: the composition and colours stay, the details change.
VARIATION_STRENGTH = 0.7
#: Long prompts (`long_prompts=True`): at most this many windows of the tokenizer's length (4 × 75
#: tokens for CLIP); the export gives the UNet a text length from one window to this many.
MAX_PROMPT_CHUNKS = 4


Size = tuple[int, int]  # (height, width), diffusers' order


@dataclass(frozen=True)
class AddedConditions:
    """SDXL's added conditions (diffusers' argument names): the sizes and crop its `time_ids` encode,
    and the refiner's aesthetic scores. A size left None is the image's (height, width)."""

    original_size: Size | None = None
    crops_coords_top_left: Size = (0, 0)
    target_size: Size | None = None
    negative_original_size: Size | None = None
    negative_crops_coords_top_left: Size = (0, 0)
    negative_target_size: Size | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5

    @classmethod
    def parse(cls, given: Mapping[str, object]) -> AddedConditions:
        names = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(given) - names)
        if unknown:
            raise InvalidRequestError(unknown[0], f"not an argument; SDXL's added conditions are {', '.join(sorted(names))}")
        values = {}
        for name, value in given.items():
            if value is None:
                continue
            if name.endswith("aesthetic_score"):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise InvalidRequestError(name, f"must be a finite number, got {value!r}")
                values[name] = float(value)
                continue
            if (not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2
                    or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v <= 65536
                               for v in value)):
                raise InvalidRequestError(name, f"must be two integers (height, width) from 0 to 65536, got {value!r}")
            values[name] = (int(value[0]), int(value[1]))
        return cls(**values)

    def time_ids(self, height: int, width: int, aesthetic: bool, image_input: bool) -> tuple[list[float], list[float]]:
        """(negative, positive) time ids as diffusers' SDXL pipelines make them: the text-to-image
        pipeline uses the negative sizes only when both are given; the image-to-image pipeline
        defaults each to the positive one (and, without aesthetics, uses the positive crop)."""
        size = (height, width)
        original, target = self.original_size or size, self.target_size or size
        if aesthetic:
            return ([*(self.negative_original_size or original), *self.negative_crops_coords_top_left,
                     self.negative_aesthetic_score], [*original, *self.crops_coords_top_left, self.aesthetic_score])
        positive = [*original, *self.crops_coords_top_left, *target]
        if image_input:
            return [*(self.negative_original_size or original), *self.crops_coords_top_left,
                    *(self.negative_target_size or target)], positive
        if self.negative_original_size is not None and self.negative_target_size is not None:
            return [*self.negative_original_size, *self.negative_crops_coords_top_left, *self.negative_target_size], positive
        return positive, positive


@dataclass(frozen=True)
class GenerationRequest:
    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]  # one per prompt
    num_images_per_prompt: int
    steps: int
    guidance_scale: float
    scheduler: SchedulerName
    seeds: tuple[int, ...]  # one per image, in output order
    width: int
    height: int
    latents: np.ndarray | None = field(default=None, compare=False)
    #: UNet inputs the family takes from the caller (manifest: fed "request"), one row per image.
    conditioning: dict[str, np.ndarray] = field(default_factory=dict, compare=False)
    #: The input image (1, 3, height, width) in [-1, 1] (image-to-image, inpainting), or None.
    image: np.ndarray | None = field(default=None, compare=False)
    #: The inpainting mask (1, 1, height, width), 1 where to repaint, or None.
    mask: np.ndarray | None = field(default=None, compare=False)
    #: How much of the schedule runs on the image: 1 starts from noise, 0.3 keeps most of it.
    strength: float = 1.0
    #: Inpainting: paste the input's own pixels back outside the mask after decoding (OpenAI's edits
    #: change only the masked area; diffusers' default, False, returns the decoded image everywhere).
    keep_unmasked: bool = False
    #: diffusers' `guidance_rescale` (0 to 1): the guided prediction pulled back to the conditional
    #: one's standard deviation (Lin et al. 2023, for zero-terminal-SNR models); 0 leaves it alone.
    guidance_rescale: float = 0.0
    #: The UNet takes the guidance scale as an input (LCM): no classifier-free guidance batch.
    embedded_guidance: bool = False
    #: The image decoder: "full" (the VAE's) or "tiny" (the bundle's AutoencoderTiny, where it has one).
    decoder: str = "full"
    #: Prompts past the tokenizer's length are encoded in windows and concatenated (opt-in).
    long_prompts: bool = False
    #: The prompts of a second text encoder (SDXL's `prompt_2`, `negative_prompt_2`); None: the first's.
    prompts_2: tuple[str, ...] | None = None
    negative_prompts_2: tuple[str, ...] | None = None
    #: Whether the caller gave a negative prompt (SDXL's `force_zeros_for_empty_prompt` zeroes the
    #: negative embeddings when not).
    negative_prompt_given: bool = True
    added: AddedConditions = AddedConditions()
    #: Starting latents of image-to-image given as latents (an SDXL base's output for its refiner):
    #: (1 or images, C, h, w), already scaled as the UNet sees them; or None.
    image_latents: np.ndarray | None = field(default=None, compare=False)
    #: diffusers' ensemble of experts: stop the schedule where this fraction of it is done (the base),
    #: or start there (the refiner, on the base's latents, adding no noise). None: the whole schedule.
    denoising_end: float | None = None
    denoising_start: float | None = None
    #: "pil" (images) or "latent" (the final latents, not decoded: diffusers' output_type).
    output_type: str = "pil"
    #: The LoRA set, ((name, scale), ...) in name order (`LoraRegistry.selection`): part of the
    #: batching key, as requests with other sets run other weights.
    lora: tuple[tuple[str, float], ...] = ()
    #: The ControlNets' control images and settings (runtime/control.py), or None.
    control: ControlRequest | None = field(default=None, compare=False)

    @property
    def has_image(self) -> bool:
        return self.image is not None or self.image_latents is not None

    def texts(self, source: str) -> tuple[list[str], list[str]]:
        """(prompts, negative prompts) per output image for the prompt argument `source`
        ("prompt" or "prompt_2", which defaults to the first: diffusers' `prompt_2 or prompt`)."""
        prompts, negatives = self.prompts, self.negative_prompts
        if source == "prompt_2":
            prompts, negatives = self.prompts_2 or prompts, self.negative_prompts_2 or negatives
        n = self.num_images_per_prompt
        return [p for p in prompts for _ in range(n)], [q for q in negatives for _ in range(n)]

    @property
    def first_step(self) -> int:
        """The scheduler step the run starts at (diffusers' `get_timesteps`): 0 without an image.
        (With `denoising_start` the plan finds it from the timesteps.)"""
        if not self.has_image:
            return 0
        return self.steps - min(int(self.steps * self.strength), self.steps)

    @property
    def num_images(self) -> int:
        return len(self.prompts) * self.num_images_per_prompt

    @property
    def do_guidance(self) -> bool:
        """Classifier-free guidance runs only when it changes anything: scale > 1 (as diffusers), and
        never where the UNet embeds the scale itself (diffusers' LatentConsistencyModelPipeline)."""
        return self.guidance_scale > 1.0 and not self.embedded_guidance

    def image_prompts(self) -> list[tuple[str, str]]:
        """(prompt, negative prompt) for each output image: each prompt's images together."""
        return [(p, n) for p, n in zip(self.prompts, self.negative_prompts) for _ in range(self.num_images_per_prompt)]


def _prompts(value: object, field_name: str, allow_empty: bool = True) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
        names = [field_name]
    elif isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        if len(value) == 0:
            raise InvalidRequestError(field_name, "empty list; give at least one prompt")
        names = [f"{field_name}[{i}]" for i in range(len(value))]
    else:
        raise InvalidRequestError(field_name, f"must be a string or a list of strings, got {type(value).__name__}")
    for name, p in zip(names, value):
        if not isinstance(p, str):
            raise InvalidRequestError(name, f"must be a string, got {type(p).__name__}")
        if not allow_empty and len(p.strip()) < MIN_PROMPT_CHARS:
            raise InvalidRequestError(name, "is empty; describe the image to draw")
    return tuple(value)


def _int(value: object, field_name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidRequestError(field_name, f"must be an integer from {low} to {high}, got {value!r}")
    if not low <= int(value) <= high:
        raise InvalidRequestError(field_name, f"must be from {low} to {high}, got {value}")
    return int(value)


def _seeds(seed: object, count: int) -> tuple[int, ...]:
    """One seed per image: a single seed s gives s, s+1, …; a list gives one each; None draws them."""
    if seed is None:
        base = secrets.randbelow(2**31)
        return tuple(base + i for i in range(count))
    if isinstance(seed, Sequence) and not isinstance(seed, (str, bytes)):
        if len(seed) != count:
            raise InvalidRequestError("seed", f"a list of seeds needs one per image ({count}), got {len(seed)}")
        return tuple(_int(s, f"seed[{i}]", 0, MAX_SEED) for i, s in enumerate(seed))
    first = _int(seed, "seed", 0, MAX_SEED - count + 1)
    return tuple(first + i for i in range(count))


def size_limits(manifest: Manifest) -> tuple[int, int, int]:
    """(min, max, multiple) of an image side in pixels, from the UNet's latent dims."""
    dims, scale = manifest.components[UNET].dims, manifest.pipeline.vae_scale_factor
    h = dims["height"]
    return h.min * scale, h.max * scale, h.multiple_of * scale


def _side(value: object, field_name: str, manifest: Manifest, default: int) -> int:
    if value is None:
        return default
    low, high, multiple = size_limits(manifest)
    side = _int(value, field_name, low, high)
    if side % multiple:
        raise InvalidRequestError(field_name, f"must be a multiple of {multiple} (from {low} to {high}), got {side}")
    return side


def make_request(
    manifest: Manifest,
    prompt: str | Sequence[str],
    negative_prompt: str | Sequence[str] | None = None,
    num_images_per_prompt: int = 1,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    scheduler: str | SchedulerName | None = None,
    seed: int | Sequence[int] | None = None,
    latents: np.ndarray | None = None,
    width: int | None = None,
    height: int | None = None,
    conditioning: Mapping[str, object] | None = None,
    image: ImageSource | None = None,
    mask_image: ImageSource | None = None,
    strength: float | None = None,
    keep_unmasked: bool = False,
    guidance_rescale: float | None = None,
    decoder: str | None = None,
    long_prompts: bool = False,
    prompt_2: str | Sequence[str] | None = None,
    negative_prompt_2: str | Sequence[str] | None = None,
    added: Mapping[str, object] | None = None,
    schedule: Mapping[str, object] | None = None,
    control: ControlRequest | None = None,
) -> GenerationRequest:
    """`added`: SDXL's added conditions by diffusers' names (`AddedConditions`); `schedule`:
    diffusers' `denoising_start`, `denoising_end` and `output_type`; `control`: the ControlNets'
    images and settings (`control.make_control`); without width and height, the first control
    image's size."""
    if num_inference_steps is None:
        num_inference_steps = manifest.pipeline.default_steps
    if guidance_scale is None:
        guidance_scale = manifest.pipeline.default_guidance
    # an image may come with the empty prompt (a variation: the image alone says what to draw)
    prompts = _prompts(prompt, "prompt", allow_empty=image is not None)
    if negative_prompt is None:
        negatives = ("",) * len(prompts)
    else:
        negatives = _prompts(negative_prompt, "negative_prompt")
        if manifest.embedded_guidance and any(n.strip() for n in negatives):
            # diffusers' LCM pipeline takes none: the UNet learned guidance against the empty prompt
            raise InvalidRequestError("negative_prompt", "this model embeds guidance in its UNet (LCM), which was "
                                                         "distilled against the empty prompt: leave it empty")
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        elif len(negatives) != len(prompts):
            raise InvalidRequestError(
                "negative_prompt", f"give one, or one per prompt ({len(prompts)}), got {len(negatives)}"
            )
    per_prompt = _int(num_images_per_prompt, "num_images_per_prompt", 1, MAX_IMAGES)
    if len(prompts) * per_prompt > MAX_IMAGES:
        raise InvalidRequestError(
            "num_images_per_prompt", f"{len(prompts)} prompts × {per_prompt} images exceeds {MAX_IMAGES} images per call"
        )
    train_steps = int(manifest.pipeline.scheduler_config.get("num_train_timesteps", MAX_STEPS))
    steps = _int(num_inference_steps, "num_inference_steps", 1, min(MAX_STEPS, train_steps))
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, np.floating)):
        raise InvalidRequestError("guidance_scale", f"must be a number from 0 to {MAX_GUIDANCE:g}, got {guidance_scale!r}")
    if not math.isfinite(guidance_scale) or not 0 <= guidance_scale <= MAX_GUIDANCE:
        raise InvalidRequestError("guidance_scale", f"must be a finite number from 0 to {MAX_GUIDANCE:g}, got {guidance_scale}")
    rescale = 0.0 if guidance_rescale is None else guidance_rescale
    if isinstance(rescale, bool) or not isinstance(rescale, (int, float, np.floating)) or not 0 <= rescale <= 1:
        raise InvalidRequestError("guidance_rescale", f"must be a number from 0 to 1, got {guidance_rescale!r}")
    decoder = "full" if decoder is None else decoder
    if decoder not in manifest.decoders():
        raise InvalidRequestError("decoder", f"{decoder!r} is not one of this bundle's decoders; allowed: "
                                             f"{', '.join(manifest.decoders())}"
                                  + ("" if "tiny" in manifest.decoders() else " (export with --tiny-decoder to add one)"))
    if long_prompts and not long_prompt_capable(manifest):
        raise InvalidRequestError("long_prompts", "this bundle's UNet takes one window of "
                                                  f"{manifest.pipeline.tokenizer_max_length} tokens; export it again "
                                                  "with this ortdiffusion (`ortdiffusion export`) for long prompts")
    scheduler_name = SchedulerName.parse(scheduler if scheduler is not None else manifest.pipeline.default_scheduler)
    image_latents = _image_latents(manifest, image, len(prompts) * per_prompt)
    if image_latents is not None:
        image = None
        if mask_image is not None:
            raise InvalidRequestError("mask_image", "not with latents as the image (inpainting takes pixels)")
        if latents is not None:
            raise InvalidRequestError("latents", "not with an image: an input image makes the starting latents")
        shape = [d * manifest.pipeline.vae_scale_factor for d in image_latents.shape[2:]]
        for name, value, side in (("height", height, shape[0]), ("width", width, shape[1])):
            if value is not None and value != side:
                raise InvalidRequestError(name, f"{value}: the latents given as the image make {side}")
        height, width = shape
    opened = _image_inputs(manifest, image, mask_image)
    default_w, default_h = manifest.pipeline.default_width, manifest.pipeline.default_height
    if opened is not None and width is None and height is None:
        default_w, default_h = _size_of_image(manifest, opened[0])
    if control is not None:
        if mask_image is not None or image_latents is not None:
            raise InvalidRequestError("control_image", "not with a mask_image (inpainting) or latents as the image yet: "
                                                       "ControlNets run on text-to-image and image-to-image requests")
        if opened is None and width is None and height is None:  # diffusers: the control image's own size
            default_w, default_h = _size_of_image(manifest, control.images[0], "control_image")
    w = _side(width, "width", manifest, default_w)
    h = _side(height, "height", manifest, default_h)
    image_pixels = mask_pixels = None
    if opened is not None:
        image_pixels = image_array(opened[0], w, h)
        mask_pixels = mask_array(opened[1], w, h) if opened[1] is not None else None
    timing = _schedule(schedule or {}, opened is not None or image_latents is not None)
    if timing["denoising_start"] is not None and mask_image is not None:
        raise InvalidRequestError("denoising_start", "not with a mask_image: inpainting runs the image's own schedule")
    # (the LCM scheduler fits its schedule to the strength, so strength skips none of its steps)
    strength_value = _strength(strength, opened or image_latents is not None, mask_pixels is not None, steps,
                               manifest.pipeline.default_strength,
                               timing["denoising_start"] is not None or scheduler_name is SchedulerName.LCM)
    count = len(prompts) * per_prompt
    if latents is not None and opened is not None:
        raise InvalidRequestError("latents", "not with an image: an input image makes the starting latents")
    if latents is not None:
        expected = (count, manifest.pipeline.latent_channels, h // manifest.pipeline.vae_scale_factor,
                    w // manifest.pipeline.vae_scale_factor)
        latents = np.asarray(latents)
        if latents.shape != expected or not np.issubdtype(latents.dtype, np.floating):
            raise InvalidRequestError("latents", f"must be a float array of shape {expected}, got {latents.dtype} {latents.shape}")
        if not np.isfinite(latents).all():
            raise InvalidRequestError("latents", "contains NaN or Inf")
        latents = latents.astype(np.float32)
    return GenerationRequest(
        prompts=prompts, negative_prompts=negatives, num_images_per_prompt=per_prompt, steps=steps,
        guidance_scale=float(guidance_scale), scheduler=scheduler_name, seeds=_seeds(seed, count),
        width=w, height=h, latents=latents, conditioning=_conditioning(manifest, conditioning or {}, count),
        image=image_pixels, mask=mask_pixels, strength=strength_value,
        keep_unmasked=bool(keep_unmasked) and mask_pixels is not None,
        guidance_rescale=float(rescale), embedded_guidance=manifest.embedded_guidance, decoder=decoder,
        long_prompts=bool(long_prompts),
        prompts_2=_second(manifest, prompt_2, "prompt_2", len(prompts)),
        negative_prompts_2=_second(manifest, negative_prompt_2, "negative_prompt_2", len(prompts)),
        negative_prompt_given=negative_prompt is not None, added=_added(manifest, added or {}),
        image_latents=image_latents, **timing, control=control,
    )


def long_prompt_capable(manifest: Manifest) -> bool:
    """Whether the UNet's text inputs take more than one window of tokens (a symbolic length)."""
    feeds = manifest.unet_feeds()
    # hidden states (batch, tokens, width); a pooled output (SDXL's text_embeds) is the first window's
    text = [i for i in manifest.components[UNET].inputs if feeds[i.name] not in SPECIAL_FEEDS and len(i.shape) == 3]
    return bool(text) and all(isinstance(i.shape[1], str) for i in text)


def _added(manifest: Manifest, given: Mapping[str, object]) -> AddedConditions:
    added = AddedConditions.parse(given)
    if added != AddedConditions() and FEED_TIME_IDS not in manifest.unet_feeds().values():
        name = next(k for k, v in given.items() if v is not None)
        raise InvalidRequestError(name, "this model's UNet takes no added conditions (SDXL's time_ids)")
    return added


def _second(manifest: Manifest, value: object, field_name: str, count: int) -> tuple[str, ...] | None:
    """A second text encoder's prompts: one, or one per prompt; None: the first's."""
    if value is None:
        return None
    if "prompt_2" not in manifest.prompt_sources().values():
        raise InvalidRequestError(field_name, "this model has no second text encoder that reads it (SDXL's)")
    prompts = _prompts(value, field_name)
    if len(prompts) == 1:
        return prompts * count
    if len(prompts) != count:
        raise InvalidRequestError(field_name, f"give one, or one per prompt ({count}), got {len(prompts)}")
    return prompts


def _schedule(given: Mapping[str, object], image_input: bool) -> dict[str, object]:
    """diffusers' `denoising_start` / `denoising_end` (fractions in (0, 1)) and `output_type`."""
    unknown = sorted(set(given) - {"denoising_start", "denoising_end", "output_type"})
    if unknown:
        raise InvalidRequestError(unknown[0], "not an argument")
    out = {"denoising_start": None, "denoising_end": None, "output_type": given.get("output_type") or "pil"}
    for name in ("denoising_start", "denoising_end"):
        value = given.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise InvalidRequestError(name, f"must be a fraction of the schedule between 0 and 1, got {value!r}")
        out[name] = float(value)
    if out["denoising_start"] is not None and not image_input:
        raise InvalidRequestError("denoising_start", "applies to an input image (the base's latents, for a refiner)")
    if None not in (out["denoising_start"], out["denoising_end"]) and out["denoising_start"] >= out["denoising_end"]:
        raise InvalidRequestError("denoising_end", "must be after denoising_start")
    if out["output_type"] not in ("pil", "latent"):
        raise InvalidRequestError("output_type", f"must be 'pil' or 'latent', got {out['output_type']!r}")
    return out


def _image_latents(manifest: Manifest, image: object, count: int) -> np.ndarray | None:
    """`image` given as latents (a float array (1 or images, C, h, w)), as diffusers' SDXL
    img2img takes the base's output; None for any other image."""
    if not isinstance(image, np.ndarray) or not np.issubdtype(image.dtype, np.floating):
        return None
    c = manifest.pipeline
    if image.ndim != 4 or image.shape[1] != c.latent_channels or image.shape[0] not in (1, count):
        raise InvalidRequestError("image", f"a float array image is latents of shape (1 or {count}, "
                                           f"{c.latent_channels}, h, w), got {image.shape}")
    if not np.isfinite(image).all():
        raise InvalidRequestError("image", "latents contain NaN or Inf")
    low, high, multiple = size_limits(manifest)
    for side in image.shape[2:]:
        pixels = side * c.vae_scale_factor
        if not low <= pixels <= high or pixels % multiple:
            raise InvalidRequestError("image", f"latents of {image.shape[2]}×{image.shape[3]} make a side of {pixels} "
                                               f"pixels; this model draws {low} to {high}, a multiple of {multiple}")
    return np.repeat(image, count // image.shape[0], axis=0).astype(np.float32)


def _image_inputs(manifest: Manifest, image: ImageSource | None, mask_image: ImageSource | None):
    """(image, mask or None) opened, or None for text-to-image; refused where the bundle cannot take them."""
    inpainting_unet = FEED_INPAINT in manifest.unet_feeds().values()
    if image is None:
        if mask_image is not None:
            raise InvalidRequestError("mask_image", "given without an image: inpainting needs both `image` and `mask_image`")
        if inpainting_unet:
            raise InvalidRequestError("image", "required: this bundle's UNet is an inpainting UNet (it takes an image "
                                               "and a mask_image, not a prompt alone)")
        return None
    if VAE_ENCODER not in manifest.components:
        raise InvalidRequestError("image", "this bundle has no image encoder (vae_encoder), so it takes no image "
                                           "inputs; export it again with this ortdiffusion (`ortdiffusion export`), "
                                           "which adds one")
    if inpainting_unet and mask_image is None:
        raise InvalidRequestError("mask_image", "required: this bundle's UNet is an inpainting UNet")
    opened = open_image(image, "image")
    mask = open_image(mask_image, "mask_image") if mask_image is not None else None
    if mask is not None and mask.size != opened.size:
        raise InvalidRequestError("mask_image", f"is {mask.size[0]}×{mask.size[1]}; it must be the image's size "
                                                f"({opened.size[0]}×{opened.size[1]})")
    return opened, mask


def _size_of_image(manifest: Manifest, image, field_name: str = "image") -> tuple[int, int]:
    low, high, multiple = size_limits(manifest)
    w, h = default_size(image, multiple)
    if not (low <= w <= high and low <= h <= high):
        raise InvalidRequestError(field_name, f"is {image.size[0]}×{image.size[1]}; this model draws sides from {low} to "
                                           f"{high} pixels: give width and height (the image is resized to them)")
    return w, h


def _strength(value: object, opened, has_mask: bool, steps: int, default: float | None = None,
              starts_at: bool = False) -> float:
    """`default`: the family's img2img default (diffusers' SDXL: 0.3); `starts_at`: strength skips no
    step (denoising_start decides where the run starts, as diffusers; the LCM scheduler checks the
    strength against its own schedule)."""
    if not opened:
        if value is not None:
            raise InvalidRequestError("strength", "applies only with an input image (`image`)")
        return 1.0
    if value is None:
        value = DEFAULT_STRENGTH_INPAINT if has_mask else (default or DEFAULT_STRENGTH_IMAGE)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0 <= value <= 1:
        raise InvalidRequestError("strength", f"must be a number from 0 to 1, got {value!r}")
    if int(steps * value) < 1 and not starts_at:
        raise InvalidRequestError("strength", f"{value:g} × {steps} steps leaves no denoising step to run; "
                                              f"raise strength to at least {1 / steps:.3g} or the number of steps")
    return float(value)


def _conditioning(manifest: Manifest, given: Mapping[str, object], count: int) -> dict[str, np.ndarray]:
    """The UNet inputs the bundle takes from the caller, each (images, …) of the dtype and fixed
    dims the manifest records; a missing or unknown one is refused by name."""
    wanted = {i.name: i for i in manifest.components[UNET].inputs if manifest.unet_feeds()[i.name] == FEED_REQUEST}
    unknown = sorted(set(given) - set(wanted))
    if unknown:
        allowed = ", ".join(sorted(wanted)) or "none for this bundle"
        raise InvalidRequestError(f"conditioning.{unknown[0]}", f"not an input this bundle's UNet takes from the caller "
                                                                 f"(it takes: {allowed})")
    out = {}
    for name, info in wanted.items():
        if name not in given:
            raise InvalidRequestError(f"conditioning.{name}", f"required by this bundle's UNet: one value per image ({count})")
        value = np.asarray(given[name])
        fixed = tuple(d if isinstance(d, int) else None for d in info.shape[1:])
        shape_ok = value.ndim == len(info.shape) and value.shape[0] == count and all(
            f is None or f == v for f, v in zip(fixed, value.shape[1:]))
        integral = np.issubdtype(info.dtype, np.integer)
        kind_ok = np.issubdtype(value.dtype, np.integer if integral else np.number) and not np.issubdtype(value.dtype, np.bool_)
        if not shape_ok or not kind_ok:
            rest = "".join(f", {d}" for d in info.shape[1:])
            raise InvalidRequestError(f"conditioning.{name}", f"must be a {info.dtype} array of shape ({count}{rest}), "
                                                              f"got {value.dtype} {value.shape}")
        if not integral and not np.isfinite(value).all():
            raise InvalidRequestError(f"conditioning.{name}", "contains NaN or Inf")
        out[name] = value.astype(info.dtype)
    return out


def parse_size(text: str | None, field: str = "size") -> tuple[int | None, int | None]:
    """"WIDTHxHEIGHT" → (width, height); None → (None, None): the model's default."""
    if text is None:
        return None, None
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise InvalidRequestError(field, f"must be WIDTHxHEIGHT such as 512x512, got {text!r}")
    return int(parts[0]), int(parts[1])
