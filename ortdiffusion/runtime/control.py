"""ControlNet at run time: the control images of a call, validated at the edge, and their part of a plan.

    control image(s) ─► (Canny edges) ─► resized RGB in [0, 1] ─┐
    each step: latents, timestep, text ─► controlnet_<k> ─► residuals × scale ─► Σ over k ─► UNet inputs

As diffusers' `StableDiffusionControlNetPipeline` (and its `MultiControlNetModel`, a list of
ControlNets): the control image is prepared by its control image processor (RGB, Lanczos resize to
the output size, [0, 1], not normalized), repeated per image and doubled for classifier-free
guidance; each ControlNet's residuals are multiplied by its `controlnet_conditioning_scale` while
the step lies inside [`control_guidance_start`, `control_guidance_end`] of the schedule (diffusers'
`controlnet_keep`), and summed over the ControlNets. `guess_mode` runs the ControlNets on the
conditional half only (zeros for the unconditional one) with per-block scales from 0.1 to 1
(diffusers' `torch.logspace(-1, 0, blocks + 1)`).

The scales are applied here, not in the graph: one exported ControlNet serves every scale. A step
whose scale is 0 skips its ControlNet (diffusers runs it and multiplies by 0: the same zeros).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .canny import canny_edges
from .errors import InvalidRequestError
from .image_input import ImageSource, open_image, to_rgb
from .manifest import Manifest, resolve_dim

#: The largest conditioning scale a call may give (diffusers sets none; past ~2 the image breaks up).
MAX_CONTROL_SCALE = 10.0
#: diffusers' default conditioning scale: 1 for text-to-image, 0.8 with an input image
#: (`StableDiffusionControlNetImg2ImgPipeline`'s own default).
DEFAULT_SCALE, DEFAULT_SCALE_IMAGE = 1.0, 0.8
#: The field names, shared by the Python API, the CLI's flags and the HTTP service.
CONTROL_IMAGE, CONTROL_SCALE = "control_image", "controlnet_conditioning_scale"
CONTROL_START, CONTROL_END, GUESS_MODE = "control_guidance_start", "control_guidance_end", "guess_mode"


@dataclass(frozen=True)
class ControlRequest:
    """A call's control: one opened image per ControlNet of the bundle, and per ControlNet its scale
    and the part of the schedule it acts in."""

    images: tuple[Image.Image, ...] = field(compare=False)
    scales: tuple[float, ...]
    starts: tuple[float, ...]
    ends: tuple[float, ...]
    guess_mode: bool = False
    #: Whether the images were turned into Canny edges (recorded in the PNG's parameters).
    canny: bool = False


def make_control(manifest: Manifest, control_image: ImageSource | Sequence[ImageSource] | None,
                 scale: float | Sequence[float] | None = None, start: float | Sequence[float] = 0.0,
                 end: float | Sequence[float] = 1.0, guess_mode: bool = False, canny: bool = False,
                 image_input: bool = False) -> ControlRequest | None:
    """Validate a call's control arguments (diffusers' names) against the bundle's ControlNets; None
    without a control image. `scale` None: diffusers' default for the task (`image_input`: an
    image-to-image request). Every refusal names the field."""
    if control_image is None:
        return None
    nets = len(manifest.controlnets)
    if nets == 0:
        raise InvalidRequestError(CONTROL_IMAGE, "this model has no ControlNet; export it with one "
                                                 "(`ortdiffusion export ... --controlnet DIR`) to use control images")
    given = list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
    if len(given) != nets:
        raise InvalidRequestError(CONTROL_IMAGE, f"give one control image per ControlNet of this model ({nets}), "
                                                 f"got {len(given)}")
    names = [CONTROL_IMAGE if nets == 1 else f"{CONTROL_IMAGE}[{k}]" for k in range(nets)]
    images = tuple(open_image(source, name) for source, name in zip(given, names))
    if canny:
        images = tuple(canny_edges(image) for image in images)
    if scale is None:
        scale = DEFAULT_SCALE_IMAGE if image_input else DEFAULT_SCALE
    scales = _per_net(scale, CONTROL_SCALE, nets, 0.0, MAX_CONTROL_SCALE)
    starts = _per_net(start, CONTROL_START, nets, 0.0, 1.0)
    ends = _per_net(end, CONTROL_END, nets, 0.0, 1.0)
    for s, e in zip(starts, ends):
        if s >= e:  # diffusers' check_inputs
            raise InvalidRequestError(CONTROL_START, f"must be before {CONTROL_END} ({s:g} ≥ {e:g})")
    if not isinstance(guess_mode, (bool, np.bool_)):
        raise InvalidRequestError(GUESS_MODE, f"must be true or false, got {guess_mode!r}")
    return ControlRequest(images, scales, starts, ends, bool(guess_mode), bool(canny))


def _per_net(value: object, name: str, nets: int, low: float, high: float) -> tuple[float, ...]:
    """One number for every ControlNet, or a list with one each (diffusers broadcasts a single one)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * nets
    if len(values) != nets:
        raise InvalidRequestError(name, f"give one number, or one per ControlNet ({nets}), got {len(values)}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not math.isfinite(v) \
                or not low <= v <= high:
            raise InvalidRequestError(name, f"must be a number from {low:g} to {high:g}, got {v!r}")
    return tuple(float(v) for v in values)


def control_array(image: Image.Image, width: int, height: int) -> np.ndarray:
    """(1, 3, height, width) float32 in [0, 1]: diffusers' control image processor (`VaeImageProcessor`
    with do_convert_rgb and no normalization): RGB, Lanczos resize, /255."""
    rgb = to_rgb(image)
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.LANCZOS)
    return (np.asarray(rgb, dtype=np.float32) / 255.0).transpose(2, 0, 1)[None].copy()


def controlnet_keep(steps: int, start: float, end: float) -> list[float]:
    """1 where step i of `steps` lies in [start, end] of the schedule, else 0 (diffusers' `controlnet_keep`)."""
    return [1.0 - float(i / steps < start or (i + 1) / steps > end) for i in range(steps)]


@dataclass(frozen=True, eq=False)
class ControlPlan:
    """The ControlNets' part of a plan: what each runs on, and each step's scale."""

    #: The ControlNet components, in the request's order.
    components: tuple[str, ...]
    #: Per ControlNet its control image at the ControlNet's batch: one row per image, doubled
    #: ([uncond; cond]) when guided outside guess mode.
    images: tuple[np.ndarray, ...]
    #: (steps, ControlNets): each ControlNet's conditioning scale at each step (0 outside its window).
    step_scales: np.ndarray
    #: Guess mode: the ControlNets see the conditional rows only; their residuals are scaled per
    #: block (0.1 … 1) and the unconditional rows get zeros.
    guess_mode: bool
    #: The number of images; the UNet's batch is twice that when guided.
    rows: int
    guided: bool
    #: The ControlNet inputs, in order: (latents, timestep, text hidden states, control image).
    input_names: tuple[str, str, str, str]
    #: The residual outputs, named as the UNet inputs they add to.
    output_names: tuple[str, ...]

    def residuals(self, step: int, sample: np.ndarray, timestep: np.ndarray, text: np.ndarray,
                  run: Callable[[str, dict[str, np.ndarray]], Mapping[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
        """The UNet's residual inputs at `step` for its inputs (sample, timestep, text) at UNet batch,
        summed over the ControlNets; None when every ControlNet is outside its window (zeros)."""
        if self.guess_mode and self.guided:  # diffusers: the conditional half alone
            sample, timestep, text = sample[self.rows:], timestep[self.rows:], text[self.rows:]
        total: dict[str, np.ndarray] | None = None
        for k, component in enumerate(self.components):
            scale = float(self.step_scales[step, k])
            if scale == 0.0:
                continue
            names = self.input_names
            out = run(component, {names[0]: sample, names[1]: timestep, names[2]: text, names[3]: self.images[k]})
            block = _guess_scales(len(self.output_names), scale) if self.guess_mode else [np.float32(scale)] * len(
                self.output_names)
            scaled = {n: (np.asarray(out[n], dtype=np.float32) * s).astype(np.float32, copy=False)
                      for n, s in zip(self.output_names, block)}
            total = scaled if total is None else {n: total[n] + scaled[n] for n in self.output_names}
        if total is not None and self.guess_mode and self.guided:
            total = {n: np.concatenate([np.zeros_like(a), a]) for n, a in total.items()}
        return total


def _guess_scales(blocks: int, scale: float) -> list[np.float32]:
    """diffusers' guess mode: `torch.logspace(-1, 0, blocks) * conditioning_scale`, in float32."""
    return [np.float32(s) * np.float32(scale) for s in np.logspace(-1, 0, blocks, dtype=np.float32)]


def control_plan(manifest: Manifest, control: ControlRequest, images: int, guided: bool, steps: int,
                 width: int, height: int) -> ControlPlan:
    """The ControlPlan of a request's control over a run of `steps` steps."""
    components = tuple(info.component for info in manifest.controlnets)
    repeat = 1 if control.guess_mode or not guided else 2
    arrays = []
    for image in control.images:
        rows = np.repeat(control_array(image, width, height), images, axis=0)
        arrays.append(np.concatenate([rows] * repeat) if repeat > 1 else rows)
    keep = np.array([controlnet_keep(steps, s, e) for s, e in zip(control.starts, control.ends)]).T
    first = manifest.components[components[0]]
    return ControlPlan(
        components=components, images=tuple(arrays),
        step_scales=(keep * np.array(control.scales)[None, :]).reshape(steps, len(components)),
        guess_mode=control.guess_mode, rows=images, guided=guided,
        input_names=tuple(i.name for i in first.inputs[:4]),  # type: ignore[arg-type]
        output_names=tuple(o.name for o in first.outputs))


def zero_residual(manifest: Manifest, name: str, batch: int, height: int, width: int) -> np.ndarray:
    """The UNet's residual input `name` as zeros: what it gets without a control image (no effect)."""
    info = next(i for i in manifest.components["unet"].inputs if i.name == name)
    sizes = {"batch": batch, "height": height, "width": width}
    return np.zeros(tuple(resolve_dim(d, sizes) for d in info.shape), dtype=np.float32)


__all__ = ["CONTROL_IMAGE", "ControlPlan", "ControlRequest", "control_array", "control_plan", "controlnet_keep",
           "make_control", "zero_residual"]
