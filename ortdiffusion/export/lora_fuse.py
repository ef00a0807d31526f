"""A LoRA fused into a checkpoint's weights before export: W += scale · alpha / rank · up @ down,
the same reading of the file (runtime/lora.py) as the per-request path, so both give one image."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ..runtime.errors import ExportError, InvalidRequestError
from ..runtime.lora import LoraSpec, canonical_layer, read_lora, resolve_names
from ..runtime.manifest import TEXT_ENCODER, TEXT_ENCODER_2, UNET

logger = logging.getLogger(__name__)


#: One `--lora FILE:SCALE` of an export (the same parsing as `generate --lora`).
FusedLora = LoraSpec


def _adaptable(model: torch.nn.Module, component: str) -> dict[str, torch.nn.Module]:
    return {canonical_layer(component, name): m for name, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


@torch.no_grad()
def fuse_loras(models: dict[str, torch.nn.Module], loras: Sequence[FusedLora]) -> None:
    """Add each LoRA's scaled delta to the weights of `models` (component → module) in place."""
    for fused in loras:
        modules = {c: _adaptable(m, c) for c, m in models.items() if m is not None}
        try:
            lora = resolve_names(read_lora(fused.path), modules, "the checkpoint")
        except InvalidRequestError as e:
            raise ExportError(f"--lora {fused.path}: {str(e).removeprefix('lora: ')}") from None
        for component, layers in lora.layers.items():
            for name, layer in layers.items():
                weight = modules[component][name].weight
                delta = torch.from_numpy(layer.delta()).to(weight.dtype)
                if delta.numel() != weight.numel():
                    raise ExportError(f"--lora {fused.path}: layer {component}.{name} is {tuple(delta.shape)}, the "
                                      f"checkpoint's {tuple(weight.shape)}: a LoRA for another model")
                weight += fused.scale * delta.reshape(weight.shape)
        logger.info("fused LoRA %s at scale %g (%d layers)", fused.path, fused.scale, lora.count())


def checkpoint_models(ckpt) -> dict[str, torch.nn.Module]:
    """The modules of a loaded checkpoint a LoRA may address."""
    return {UNET: ckpt.unet, TEXT_ENCODER: getattr(ckpt, "text_encoder", None),
            TEXT_ENCODER_2: getattr(ckpt, "text_encoder_2", None)}


__all__ = ["FusedLora", "checkpoint_models", "fuse_loras"]
