"""Component specs: what each network's inputs and outputs are, in one place.

A `ComponentSpec` holds a network's input and output names, dtypes and symbolic shapes, the range
of every symbolic dimension (min/opt/max — TensorRT's shape profile) and how to draw sample inputs.
Export, parity, fp16 block lists and the runtime's shape checks all read it; the manifest carries
it to the runtime. The spec builders below cover the text encoder, the UNet step, the VAE decoder
and the VAE encoder (image inputs); a user's own `torch.nn.Module` is exported by writing a
`ComponentSpec` for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from ..runtime.manifest import DimRange, TensorInfo, resolve_dim
from ..runtime.request import MAX_PROMPT_CHUNKS


class Distribution(str, Enum):
    NORMAL = "normal"  # standard normal floats
    UNIFORM = "uniform"  # floats in [low, high)
    INTEGER = "integer"  # integers in [low, high)


@dataclass(frozen=True)
class InputSpec:
    info: TensorInfo
    distribution: Distribution = Distribution.NORMAL
    low: float = 0.0
    high: float = 1.0

    def sample(self, dims: Mapping[str, int], generator: torch.Generator) -> torch.Tensor:
        shape = tuple(resolve_dim(d, dims) for d in self.info.shape)
        if self.distribution is Distribution.INTEGER:
            return torch.randint(int(self.low), int(self.high), shape, generator=generator, dtype=torch.int64)
        if self.distribution is Distribution.UNIFORM:
            return torch.rand(shape, generator=generator) * (self.high - self.low) + self.low
        return torch.randn(shape, generator=generator)


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[TensorInfo, ...]
    dims: dict[str, DimRange]

    @property
    def input_names(self) -> list[str]:
        return [i.info.name for i in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """The symbolic dimensions of every input and output, in `torch.onnx.export`'s form."""
        axes: dict[str, dict[int, str]] = {}
        for info in [i.info for i in self.inputs] + list(self.outputs):
            named = {k: d for k, d in enumerate(info.shape) if isinstance(d, str)}
            if named:
                axes[info.name] = named
        return axes

    def parity_points(self) -> tuple[dict[str, int], dict[str, int]]:
        """Two different shapes to check parity at: the opt shape, and a larger, non-square one."""
        opt = {k: r.opt for k, r in self.dims.items()}
        other = {}
        for k, r in self.dims.items():
            bump = r.multiple_of * (2 if k.endswith("width") else 1)
            other[k] = r.opt + bump if r.opt + bump <= r.max else max(r.opt - bump, r.min)
        return opt, other

    def sample_inputs(self, dims: Mapping[str, int], seed: int) -> tuple[torch.Tensor, ...]:
        generator = torch.Generator().manual_seed(seed)
        return tuple(i.sample(dims, generator) for i in self.inputs)


def _tensor(name: str, dtype: str, *shape: int | str) -> TensorInfo:
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape))


# -- the text encoder ---------------------------------------------------------------------------


class TextEncoderWrapper(torch.nn.Module):
    """input_ids → (last_hidden_state[, pooled]) for any transformers encoder a pipeline may use."""

    def __init__(self, model: torch.nn.Module, pooled_attr: str | None):
        super().__init__()
        self.model = model
        self.pooled_attr = pooled_attr

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(input_ids=input_ids, return_dict=True)
        if self.pooled_attr is None:
            return (out.last_hidden_state,)
        return out.last_hidden_state, getattr(out, self.pooled_attr)


# Where each encoder family keeps its pooled output: CLIPTextModelWithProjection's projected
# `text_embeds`, CLIP's and BERT's `pooler_output`; T5 and GPT-2 have none.
_POOLED_ATTRS = ("text_embeds", "pooler_output")


def text_encoder_component(
    model: torch.nn.Module, max_length: int, batch: DimRange = DimRange(1, 2, 32)
) -> tuple[ComponentSpec, torch.nn.Module]:
    """The spec of a transformers text encoder and the module that export runs."""
    config: Any = model.config
    with torch.no_grad():
        probe = model(input_ids=torch.zeros(1, max_length, dtype=torch.int64), return_dict=True)
    pooled_attr = next((a for a in _POOLED_ATTRS if getattr(probe, a, None) is not None), None)
    hidden = probe.last_hidden_state.shape[-1]
    outputs = [_tensor("last_hidden_state", "float32", "batch", max_length, hidden)]
    if pooled_attr is not None:
        outputs.append(_tensor("pooled_output", "float32", "batch", getattr(probe, pooled_attr).shape[-1]))
    spec = ComponentSpec(
        name="text_encoder",
        inputs=(
            InputSpec(_tensor("input_ids", "int64", "batch", max_length), Distribution.INTEGER, 0, config.vocab_size),
        ),
        outputs=tuple(outputs),
        dims={"batch": batch},
    )
    return spec, TextEncoderWrapper(model, pooled_attr).eval()


# -- the denoising step (UNet) ------------------------------------------------------------------


class UNetWrapper(torch.nn.Module):
    """(sample, timestep, encoder_hidden_states, *extra) → the prediction; `extra` are the UNet's
    further inputs, passed by name (diffusers' keyword arguments, e.g. `class_labels`), except
    `inpaint_condition`: an inpainting UNet's extra input channels (the mask and the masked image's
    latents), concatenated after the latents as diffusers' inpainting pipeline does. Kept as an
    input of its own so the latents stay the loop's (latent-channel) state on every UNet."""

    def __init__(self, unet: torch.nn.Module, extra: tuple[str, ...] = ()):
        super().__init__()
        self.unet = unet
        self.extra = extra

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *extra: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.extra, extra))
        inpaint = kwargs.pop(INPAINT_CONDITION, None)
        if inpaint is not None:
            sample = torch.cat([sample, inpaint], dim=1)
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False, **kwargs)[0]


#: The name of an inpainting UNet's condition input (see `UNetWrapper`).
INPAINT_CONDITION = "inpaint_condition"
#: diffusers' name of an LCM UNet's guidance scale embedding input.
TIMESTEP_COND = "timestep_cond"


def unet_class_labels(unet: torch.nn.Module) -> InputSpec | None:
    """The `class_labels` input of a class-conditioned UNet (diffusers' `num_class_embeds`: integer
    labels into an embedding; `class_embed_type` "timestep"/"identity": a float per image, as SD's
    upscaler feeds its noise level), or None."""
    c = unet.config
    if c.class_embed_type is None and c.num_class_embeds is not None:
        return InputSpec(_tensor("class_labels", "int64", "batch"), Distribution.INTEGER, 0, c.num_class_embeds)
    if c.class_embed_type in ("timestep", "identity"):
        return InputSpec(_tensor("class_labels", "float32", "batch"), Distribution.UNIFORM, 0, 1000)
    return None


def unet_size_multiple(unet: torch.nn.Module) -> int:
    """Latent sizes must divide by 2 per downsampling block, or the skip connections misalign."""
    return 2 ** (len(unet.config.block_out_channels) - 1)


def unet_component(
    unet: torch.nn.Module, text_length: int, batch: DimRange = DimRange(1, 2, 64), latent_channels: int | None = None
) -> tuple[ComponentSpec, torch.nn.Module]:
    """`latent_channels`: the VAE's; a UNet that takes more input channels than that is an
    inpainting UNet, whose extra channels become the `inpaint_condition` input."""
    c = unet.config
    multiple = unet_size_multiple(unet)
    opt = int(c.sample_size)
    side = DimRange(min=multiple, opt=opt, max=max(opt * 4, multiple), multiple_of=multiple)
    latent_channels = latent_channels or c.in_channels
    extra = tuple(i for i in (unet_class_labels(unet),) if i is not None)
    if getattr(c, "time_cond_proj_dim", None):  # an LCM UNet: the guidance scale's embedding
        extra += (InputSpec(_tensor(TIMESTEP_COND, "float32", "batch", int(c.time_cond_proj_dim)),
                            Distribution.UNIFORM, -1, 1),)
    if c.in_channels > latent_channels:
        extra += (InputSpec(_tensor(INPAINT_CONDITION, "float32", "batch", c.in_channels - latent_channels,
                                    "height", "width"), Distribution.UNIFORM, 0, 1),)
    spec = ComponentSpec(
        name="unet",
        inputs=(
            InputSpec(_tensor("sample", "float32", "batch", latent_channels, "height", "width")),
            InputSpec(_tensor("timestep", "float32", "batch"), Distribution.UNIFORM, 0, 1000),
            InputSpec(_tensor("encoder_hidden_states", "float32", "batch", "sequence", c.cross_attention_dim)),
            *extra,
        ),
        outputs=(_tensor("out_sample", "float32", "batch", c.out_channels, "height", "width"),),
        # the text length: one window of tokens, or up to MAX_PROMPT_CHUNKS of them (long prompts)
        dims={"batch": batch, "height": side, "width": side,
              "sequence": DimRange(text_length, text_length, text_length * MAX_PROMPT_CHUNKS, text_length)},
    )
    return spec, UNetWrapper(unet, tuple(i.info.name for i in extra)).eval()


#: Where the UNet inputs the specs above declare come from at run time (the manifest's `unet_feeds`):
#: the loop's latents and timestep, the text encoder's hidden states, and what the caller gives.
UNET_FEEDS = {"sample": "latents", "timestep": "timestep", "encoder_hidden_states": "text_encoder/last_hidden_state",
              "class_labels": "request", INPAINT_CONDITION: "inpaint", TIMESTEP_COND: "guidance_embedding"}


# -- the image decoder (VAE decoder) ------------------------------------------------------------


class VaeDecoderWrapper(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


def vae_decoder_component(
    vae: torch.nn.Module, latent_opt: int, batch: DimRange = DimRange(1, 1, 32)
) -> tuple[ComponentSpec, torch.nn.Module]:
    c = vae.config
    side = DimRange(min=1, opt=latent_opt, max=latent_opt * 4)
    spec = ComponentSpec(
        name="vae_decoder",
        inputs=(InputSpec(_tensor("latent_sample", "float32", "batch", c.latent_channels, "height", "width")),),
        outputs=(_tensor("sample", "float32", "batch", c.out_channels, "image_height", "image_width"),),
        dims={"batch": batch, "height": side, "width": side},
    )
    return spec, VaeDecoderWrapper(vae).eval()


# -- the tiny image decoder (AutoencoderTiny, TAESD) ---------------------------------------------


class TinyDecoderWrapper(torch.nn.Module):
    """The VAE decoder's input (latents / the VAE's scaling factor) → pixels in [-1, 1], through an
    AutoencoderTiny: a drop-in for `vae_decoder`. The tiny decoder reads latents as the UNet sees
    them, scaled by its own factor (1 for TAESD), so the input is first scaled back: diffusers does
    the same when `pipe.vae` is an AutoencoderTiny (`latents / vae.config.scaling_factor`)."""

    def __init__(self, tiny: torch.nn.Module, vae_scaling_factor: float):
        super().__init__()
        self.tiny = tiny
        self.scale = float(vae_scaling_factor) / float(tiny.config.scaling_factor)

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.tiny.decode(latent_sample * self.scale, return_dict=False)[0]


def tiny_decoder_component(
    tiny: torch.nn.Module, vae_scaling_factor: float, latent_opt: int, batch: DimRange = DimRange(1, 1, 32)
) -> tuple[ComponentSpec, torch.nn.Module]:
    c = tiny.config
    side = DimRange(min=1, opt=latent_opt, max=latent_opt * 4)
    spec = ComponentSpec(
        name="vae_decoder_tiny",
        inputs=(InputSpec(_tensor("latent_sample", "float32", "batch", c.latent_channels, "height", "width")),),
        outputs=(_tensor("sample", "float32", "batch", c.out_channels, "image_height", "image_width"),),
        dims={"batch": batch, "height": side, "width": side},
    )
    return spec, TinyDecoderWrapper(tiny, vae_scaling_factor).eval()


# -- the image encoder (VAE encoder) ------------------------------------------------------------


class VaeEncoderWrapper(torch.nn.Module):
    """pixels in [-1, 1] → the latent distribution's mean and standard deviation (diffusers'
    `vae.encode(x).latent_dist`: std = exp(½ · clamp(logvar, −30, 20))). The sample drawn from it
    is the runtime's, with each image's own seed, so the graph itself is deterministic."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(sample, return_dict=False)[0]
        return dist.mean, dist.std


def vae_encoder_component(
    vae: torch.nn.Module, latent_opt: int, batch: DimRange = DimRange(1, 1, 8)
) -> tuple[ComponentSpec, torch.nn.Module]:
    c = vae.config
    scale = 2 ** (len(c.block_out_channels) - 1)
    side = DimRange(min=scale, opt=latent_opt * scale, max=latent_opt * scale * 4, multiple_of=scale)
    spec = ComponentSpec(
        name="vae_encoder",
        inputs=(InputSpec(_tensor("sample", "float32", "batch", c.in_channels, "image_height", "image_width"),
                          Distribution.UNIFORM, -1, 1),),
        outputs=(_tensor("latent_mean", "float32", "batch", c.latent_channels, "height", "width"),
                 _tensor("latent_std", "float32", "batch", c.latent_channels, "height", "width")),
        dims={"batch": batch, "image_height": side, "image_width": side},
    )
    return spec, VaeEncoderWrapper(vae).eval()
