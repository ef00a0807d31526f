"""LoRA files for tests, made from a tiny checkpoint's own modules (nothing downloads): a PEFT/
diffusers file written by diffusers' `save_lora_weights` with PEFT's adapter config as metadata,
and a kohya file (`lora_unet_…`, `lora_te_…`, `.lora_down` / `.lora_up` / `.alpha`) as the web UIs
write them."""

from __future__ import annotations

from pathlib import Path

import torch

UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _random_layers(model: torch.nn.Module, suffixes: list[str], rank: int, seed: int,
                   magnitude: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module path → (down (rank, in[, 1, 1]), up (out, rank[, 1, 1])) for every Linear / 1×1 Conv
    whose path ends with one of `suffixes`."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in model.named_modules():
        if not any(name == s or name.endswith("." + s) for s in suffixes):
            continue
        if isinstance(module, torch.nn.Linear):
            down = torch.randn(rank, module.in_features, generator=g) / module.in_features ** 0.5
            up = torch.randn(module.out_features, rank, generator=g) * magnitude
        elif isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1):
            down = torch.randn(rank, module.in_channels, 1, 1, generator=g) / module.in_channels ** 0.5
            up = torch.randn(module.out_channels, rank, 1, 1, generator=g) * magnitude
        else:
            continue
        layers[name] = (down, up)
    return layers


def peft_lora(checkpoint: Path, out: Path, rank: int, alpha: float, seed: int, text_encoder: bool = True,
              unet_targets: list[str] = UNET_ATTENTION, magnitude: float = 0.3) -> Path:
    """A diffusers/PEFT LoRA file, as `StableDiffusionPipeline.save_lora_weights` writes it."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(str(checkpoint / "unet"))
    unet_layers = _random_layers(unet, unet_targets, rank, seed, magnitude)
    state = {}
    for name, (down, up) in unet_layers.items():
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = down, up
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=unet_targets).to_dict()
    te_state, te_config = None, None
    if text_encoder:
        te = CLIPTextModel.from_pretrained(str(checkpoint / "text_encoder"))
        te_state = {}
        for name, (down, up) in _random_layers(te, TEXT_ATTENTION, rank, seed + 1, magnitude).items():
            te_state[f"{name}.lora_A.weight"], te_state[f"{name}.lora_B.weight"] = down, up
        te_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TEXT_ATTENTION).to_dict()
    out.mkdir(parents=True, exist_ok=True)
    name = f"peft-{seed}.safetensors"
    StableDiffusionPipeline.save_lora_weights(
        str(out), unet_lora_layers=state, text_encoder_lora_layers=te_state, weight_name=name,
        unet_lora_adapter_metadata=config, text_encoder_lora_adapter_metadata=te_config)
    return out / name


def kohya_lora(checkpoint: Path, out: Path, rank: int, alpha: float, seed: int, magnitude: float = 0.3) -> Path:
    """A kohya LoRA file: the transformer blocks' attention, feed-forward and 1×1 projections of
    the UNet, and the text encoder's attention and MLP, with `.alpha` per layer, fp16 as kohya saves."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(str(checkpoint / "unet"))
    te = CLIPTextModel.from_pretrained(str(checkpoint / "text_encoder"))
    tensors = {}
    groups = (("lora_unet_", _random_layers(unet, [*UNET_ATTENTION, "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"],
                                            rank, seed, magnitude)),
              ("lora_te_", _random_layers(te, [*TEXT_ATTENTION, "fc1", "fc2"], rank, seed + 1, magnitude)))
    for prefix, layers in groups:
        for name, (down, up) in layers.items():
            key = prefix + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = down.half().contiguous()
            tensors[f"{key}.lora_up.weight"] = up.half().contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kohya-{seed}.safetensors"
    save_file(tensors, str(path))
    return path
