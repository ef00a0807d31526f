"""Write a diffusers checkpoint as one file in Stable Diffusion's original (LDM) key layout.

The key mapping of diffusers' `scripts/convert_diffusers_to_original_stable_diffusion.py`, which
hard-codes SD 1.x's four blocks of two layers; here the block and layer counts come from the
configs, so the tiny test models convert too. Current diffusers VAE attention names (`to_q`, ...)
map to the original `q`, `k`, `v`, `proj_out` 1×1 convolutions, as that script's reshape does.
"""

from __future__ import annotations

import json
from pathlib import Path


def _unet_prefixes(config: dict) -> list[tuple[str, str]]:
    layers = config["layers_per_block"]
    blocks = len(config["block_out_channels"])
    pairs = []
    for i in range(blocks):
        for j in range(layers):
            pairs.append((f"input_blocks.{(layers + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            pairs.append((f"input_blocks.{(layers + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(layers + 1):
            pairs.append((f"output_blocks.{(layers + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            pairs.append((f"output_blocks.{(layers + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < blocks - 1:
            pairs.append((f"input_blocks.{(layers + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            has_attention = "CrossAttn" in config["up_block_types"][i]
            pairs.append((f"output_blocks.{(layers + 1) * i + layers}.{2 if has_attention else 1}.",
                          f"up_blocks.{i}.upsamplers.0."))
    pairs.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        pairs.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return pairs


UNET_FIXED = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
              ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]
UNET_RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
               ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]


def convert_unet(state: dict, config: dict) -> dict:
    prefixes = _unet_prefixes(config)
    out = {}
    for key, value in state.items():
        new = key
        for sd, hf in UNET_FIXED:
            if new.startswith(hf):
                new = sd + new[len(hf):]
        if "resnets" in key:
            for sd, hf in UNET_RESNET:
                new = new.replace(hf, sd)
        for sd, hf in prefixes:
            if new.startswith(hf):
                new = sd + new[len(hf):]
                break
        out["model.diffusion_model." + new] = value
    return out


def convert_vae(state: dict, config: dict) -> dict:
    blocks = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    pairs = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(blocks):
        for j in range(layers):
            pairs.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        if i < blocks - 1:
            pairs.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            pairs.append((f"up.{blocks - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
        for j in range(layers + 1):
            pairs.append((f"decoder.up.{blocks - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
    for i in range(2):
        pairs.append((f"mid.block_{i + 1}.", f"mid_block.resnets.{i}."))
    attention = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]
    out = {}
    for key, value in state.items():
        new = key
        for sd, hf in pairs:
            new = new.replace(hf, sd)
        if "attentions" in key:
            for sd, hf in attention:
                new = new.replace(hf, sd)
            if new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")) and value.ndim == 2:
                value = value.reshape(*value.shape, 1, 1)
        out["first_stage_model." + new] = value
    return out


def write_single_file(checkpoint: Path, out: Path) -> Path:
    """The checkpoint's UNet, VAE and (SD 1.x CLIP) text encoder as one .safetensors file."""
    from safetensors.torch import load_file, save_file

    def weights(name: str) -> dict:
        folder = checkpoint / name
        return load_file(str(next(folder.glob("*.safetensors"))))

    def config(name: str) -> dict:
        return json.loads((checkpoint / name / "config.json").read_text())

    state = {**convert_unet(weights("unet"), config("unet")), **convert_vae(weights("vae"), config("vae")),
             # the original layout keeps CLIP's `text_model.` level, which transformers >= 5.6 flattened away
             **{"cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v
                for k, v in weights("text_encoder").items()}}
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out
