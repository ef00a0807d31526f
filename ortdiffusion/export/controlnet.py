"""ControlNets (diffusers' ControlNetModel) as bundle components, and the UNet that takes their residuals.

DESIGN.md: adapters change the networks' inputs, not the loop. A bundle exported with ControlNets has

- one component per ControlNet, `controlnet_<k>`: (sample, timestep, encoder_hidden_states,
  controlnet_cond) → its residuals at scale 1, named as the UNet inputs they add to
  (`down_block_additional_residual_<i>`, `mid_block_additional_residual`). The conditioning scale
  (and guess mode's per-block scales) is applied on the host: a product diffusers also takes in
  fp32 after the network, so one graph serves every scale;
- a UNet with those residuals as inputs (manifest feed "controlnet"): zeros when a call gives no
  control image, so the bundle still does plain text-to-image.

A bundle exported without ControlNets keeps the plain UNet: no extra inputs, no extra work.
The residual shapes are derived dims ("height/2") of the UNet's latent dims, and the control image's
are "height*8": the runtime checks and allocates them from the latent size alone.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from ..runtime.errors import ExportError
from ..runtime.manifest import FEED_CONTROLNET, UNET, ControlNetInfo, PipelineConstants, TensorInfo
from .specs import ComponentSpec, Distribution, InputSpec, UNetWrapper

logger = logging.getLogger(__name__)

#: diffusers' UNet keyword arguments, as one input per tensor (ONNX inputs are flat).
DOWN_RESIDUAL, MID_RESIDUAL = "down_block_additional_residual", "mid_block_additional_residual"
CONTROL_IMAGE = "controlnet_cond"


def controlnet_name(k: int) -> str:
    return f"controlnet_{k}"


def residual_names(downs: int) -> tuple[str, ...]:
    return tuple(f"{DOWN_RESIDUAL}_{i}" for i in range(downs)) + (MID_RESIDUAL,)


class ControlNetWrapper(torch.nn.Module):
    """(sample, timestep, encoder_hidden_states, controlnet_cond) → (*down residuals, mid residual),
    unscaled (conditioning_scale 1, no guess mode: the host scales them)."""

    def __init__(self, controlnet: torch.nn.Module):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                                    guess_mode=False, return_dict=False)
        return (*down, mid)


class ResidualUNet(torch.nn.Module):
    """A diffusers UNet whose ControlNet residuals come as named keyword tensors (one per residual,
    as `UNetWrapper` passes its extra inputs), regrouped into diffusers' two arguments."""

    def __init__(self, unet: torch.nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.unet = unet
        self.names = names

    def forward(self, sample, timestep, encoder_hidden_states, return_dict: bool = False, **kwargs):
        residuals = [kwargs.pop(n) for n in self.names]
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=return_dict,
                         down_block_additional_residuals=tuple(residuals[:-1]),
                         mid_block_additional_residual=residuals[-1], **kwargs)


def load_controlnet(path: Path | str) -> torch.nn.Module:
    """A diffusers ControlNetModel directory → the model in fp32 eval mode; ExportError naming the path."""
    from diffusers import ControlNetModel

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ExportError(f"{path}: not a diffusers ControlNetModel directory (no config.json); --controlnet takes "
                          "one, e.g. a local copy of lllyasviel/sd-controlnet-canny")
    try:
        model = ControlNetModel.from_pretrained(str(path), torch_dtype=torch.float32).eval()
    except (OSError, ValueError, EnvironmentError) as e:
        raise ExportError(f"{path}: not a diffusers ControlNetModel directory ({e})") from None
    c = model.config
    if c.addition_embed_type is not None or c.class_embed_type is not None or c.global_pool_conditions:
        raise ExportError(f"{path}: ControlNets with added conditions (SDXL's), class embeddings or pooled "
                          "conditions (shuffle) are not supported; Stable Diffusion 1/2 ControlNets are")
    return model


def _derived(axis: str, opt: int, size: int) -> str:
    """The symbolic name of a residual's side: the latent axis at 1/ratio."""
    if size == opt:
        return axis
    if opt % size:
        raise ExportError(f"a ControlNet residual's side {size} does not divide the latent side {opt}")
    return f"{axis}/{opt // size}"


def controlnet_component(controlnet: torch.nn.Module, unet_spec: ComponentSpec, vae_scale: int,
                         name: str) -> tuple[ComponentSpec, torch.nn.Module]:
    """The spec of a ControlNet beside the UNet spec it feeds: the UNet's first three inputs, the
    control image at `vae_scale` × the latents, and one output per residual (shapes probed once)."""
    c = controlnet.config
    cond_scale = 2 ** (len(c.conditioning_embedding_out_channels) - 1)
    if cond_scale != vae_scale:
        raise ExportError(f"{name}: its conditioning embedding reads control images at {cond_scale}× the latents; "
                          f"the checkpoint's VAE makes images at {vae_scale}× them: a ControlNet for another model")
    sample, timestep, text = unet_spec.inputs[:3]
    if controlnet.config.in_channels != sample.info.shape[1] or \
            controlnet.config.cross_attention_dim != text.info.shape[2]:
        raise ExportError(f"{name}: made for a UNet with {c.in_channels} input channels and cross-attention width "
                          f"{c.cross_attention_dim}; this checkpoint's has {sample.info.shape[1]} and "
                          f"{text.info.shape[2]}")
    channels = int(c.conditioning_channels)
    image = InputSpec(TensorInfo(CONTROL_IMAGE, "float32", ("batch", channels, f"height*{vae_scale}",
                                                             f"width*{vae_scale}")), Distribution.UNIFORM, 0, 1)
    spec = ComponentSpec(name=name, inputs=(sample, timestep, text, image), outputs=(), dims=dict(unet_spec.dims))
    module = ControlNetWrapper(controlnet).eval()
    opt = {k: r.opt for k, r in spec.dims.items()}
    with torch.no_grad():
        probe = module(*spec.sample_inputs(opt, seed=0))
    names = residual_names(len(probe) - 1)
    outputs = tuple(TensorInfo(n, "float32", ("batch", int(t.shape[1]), _derived("height", opt["height"], t.shape[2]),
                                              _derived("width", opt["width"], t.shape[3])))
                    for n, t in zip(names, probe))
    return replace(spec, outputs=outputs), module


def controlled_unet(unet_spec: ComponentSpec, unet_module: UNetWrapper,
                    residuals: tuple[TensorInfo, ...]) -> tuple[ComponentSpec, torch.nn.Module]:
    """The UNet spec and module with the ControlNet residuals as further inputs."""
    names = tuple(r.name for r in residuals)
    spec = replace(unet_spec, inputs=unet_spec.inputs + tuple(InputSpec(r) for r in residuals))
    module = UNetWrapper(ResidualUNet(unet_module.unet, names), unet_module.extra + names).eval()
    return spec, module


def with_controlnets(specs: list[tuple[ComponentSpec, torch.nn.Module]], paths: tuple[Path, ...], vae_scale: int
                     ) -> tuple[list[tuple[ComponentSpec, torch.nn.Module]], tuple[ControlNetInfo, ...]]:
    """A pipeline's component specs with `paths`' ControlNets added and the UNet taking their residuals."""
    at = next(i for i, (spec, _) in enumerate(specs) if spec.name == UNET)
    unet_spec, unet_module = specs[at]
    added, infos, residuals = [], [], None
    for k, path in enumerate(paths):
        spec, module = controlnet_component(load_controlnet(path), unet_spec, vae_scale, controlnet_name(k))
        if residuals is not None and [(o.name, o.shape) for o in spec.outputs] != [(o.name, o.shape) for o in residuals]:
            raise ExportError(f"{path}: its residuals ({len(spec.outputs)}) do not match the first ControlNet's "
                              f"({len(residuals)}): ControlNets for different UNets")
        residuals = spec.outputs
        added.append((spec, module))
        infos.append(ControlNetInfo(spec.name, str(Path(path).resolve()), int(spec.inputs[3].info.shape[1])))
    out = list(specs)
    out[at] = controlled_unet(unet_spec, unet_module, residuals)
    return out + added, tuple(infos)


def controlnet_feeds(constants: PipelineConstants, residuals: tuple[TensorInfo, ...]) -> PipelineConstants:
    """The manifest's `unet_feeds` with the residual inputs fed from the ControlNets."""
    return replace(constants, unet_feeds={**constants.unet_feeds, **{r.name: FEED_CONTROLNET for r in residuals}})


def random_controlnet(unet_dir: Path | str, out: Path | str, seed: int, vae_scale: int = 8,
                      std: float = 0.3) -> Path:
    """A ControlNet for the UNet at `unet_dir` (diffusers' `from_unet`: its encoder's weights), its
    conditioning embedding reading images at `vae_scale` × the latents, and its zero-initialized
    convolutions given random weights (`std`) so that it changes the picture: for tests and
    benchmarks on the presets, which have no trained ControlNet."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(unet_dir))
    widths = (16, 32, 96, 256)[:vae_scale.bit_length()]  # diffusers' default for 8×: 4 blocks, 3 halvings
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=widths)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")):
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    net.save_pretrained(str(out))
    return Path(out)
