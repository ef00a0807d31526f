"""SDXL (base and refiner) as data for the one export: its component specs, UNet feeds, constants,
second tokenizer, and random-weight checkpoints built from presets' configs.

    prompt   ─► tokenizer   ─► text_encoder   (CLIPTextModel)               ─► hidden_states ─┐ concatenated
    prompt_2 ─► tokenizer_2 ─► text_encoder_2 (CLIPTextModelWithProjection) ─► hidden_states ─┘ in the UNet
                                                                            ─► text_embeds (pooled)
    original size, crop, target size (refiner: aesthetic score) ─► time_ids (the plan's, per row)

As diffusers' `StableDiffusionXLPipeline.encode_prompt`: the *penultimate* hidden states of both
encoders (`hidden_states[-2]`), concatenated on the feature axis, and the pooled, projected
`text_embeds` of the second. The concatenation happens in the UNet's graph (`SdxlUNetWrapper`), so
that each UNet input is fed by exactly one text encoder output (the manifest's `unet_feeds`) and the
runtime's loops stay as they are. The refiner has only text_encoder_2, which then reads `prompt`
(diffusers zips prompts with the encoders present).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..runtime.errors import ExportError
from ..runtime.manifest import (
    FEED_LATENTS,
    FEED_TIME_IDS,
    FEED_TIMESTEP,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    TOKENIZER_2_NAME,
    DimRange,
    PipelineConstants,
)
from ..runtime.request import MAX_PROMPT_CHUNKS
from ..runtime.tokenizer import PromptTokenizer
from .specs import ComponentSpec, Distribution, InputSpec, _tensor, unet_size_multiple, vae_decoder_component, \
    vae_encoder_component

HIDDEN, POOLED = "hidden_states", "text_embeds"


class SdxlTextEncoderWrapper(torch.nn.Module):
    """input_ids → (penultimate hidden states[, projected pooled text_embeds])."""

    def __init__(self, model: torch.nn.Module, pooled: bool):
        super().__init__()
        self.model = model
        self.pooled = pooled

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(input_ids=input_ids, output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states[-2]
        return (hidden, out.text_embeds) if self.pooled else (hidden,)


def text_encoder_spec(name: str, model: torch.nn.Module, max_length: int,
                      batch: DimRange = DimRange(1, 2, 32)) -> tuple[ComponentSpec, torch.nn.Module]:
    c = model.config
    pooled = hasattr(c, "projection_dim") and type(model).__name__.endswith("WithProjection")
    outputs = [_tensor(HIDDEN, "float32", "batch", max_length, c.hidden_size)]
    if pooled:
        outputs.append(_tensor(POOLED, "float32", "batch", c.projection_dim))
    spec = ComponentSpec(
        name=name,
        inputs=(InputSpec(_tensor("input_ids", "int64", "batch", max_length), Distribution.INTEGER, 0, c.vocab_size),),
        outputs=tuple(outputs), dims={"batch": batch},
    )
    return spec, SdxlTextEncoderWrapper(model, pooled).eval()


class SdxlUNetWrapper(torch.nn.Module):
    """(sample, timestep, *hidden parts, text_embeds, time_ids) → the prediction; the hidden parts
    (one per text encoder) are concatenated on the feature axis as diffusers' encode_prompt does."""

    def __init__(self, unet: torch.nn.Module, parts: int):
        super().__init__()
        self.unet = unet
        self.parts = parts

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        hidden = torch.cat(rest[:self.parts], dim=-1) if self.parts > 1 else rest[0]
        text_embeds, time_ids = rest[self.parts:]
        return self.unet(sample, timestep, hidden, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
                         return_dict=False)[0]


def time_id_count(unet: torch.nn.Module, pooled_dim: int) -> int:
    """6 (original size, crop, target size) for the base, 5 (… aesthetic score) for the refiner."""
    c = unet.config
    count, rest = divmod(int(c.projection_class_embeddings_input_dim) - pooled_dim, int(c.addition_time_embed_dim))
    if rest or count not in (5, 6):
        raise ExportError(f"unet: projection_class_embeddings_input_dim {c.projection_class_embeddings_input_dim} is "
                          f"not 5 or 6 time ids × {c.addition_time_embed_dim} + the pooled {pooled_dim}")
    return count


def encoders(ckpt) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in ((TEXT_ENCODER, ckpt.text_encoder), (TEXT_ENCODER_2, ckpt.text_encoder_2)) if m is not None]


def unet_spec(ckpt, max_length: int, batch: DimRange = DimRange(1, 2, 64)) -> tuple[ComponentSpec, torch.nn.Module]:
    unet, c = ckpt.unet, ckpt.unet.config
    multiple = unet_size_multiple(unet)
    opt = int(c.sample_size)
    side = DimRange(min=multiple, opt=opt, max=max(opt * 4, multiple), multiple_of=multiple)
    pooled_dim = int(ckpt.text_encoder_2.config.projection_dim)
    names = ["encoder_hidden_states", "encoder_hidden_states_2"]
    # the text length: one window of tokens, or up to MAX_PROMPT_CHUNKS of them (long prompts)
    hidden = tuple(InputSpec(_tensor(names[k], "float32", "batch", "sequence", m.config.hidden_size))
                   for k, (_, m) in enumerate(encoders(ckpt)))
    spec = ComponentSpec(
        name="unet",
        inputs=(
            InputSpec(_tensor("sample", "float32", "batch", c.in_channels, "height", "width")),
            InputSpec(_tensor("timestep", "float32", "batch"), Distribution.UNIFORM, 0, 1000),
            *hidden,
            InputSpec(_tensor(POOLED, "float32", "batch", pooled_dim)),
            InputSpec(_tensor("time_ids", "float32", "batch", time_id_count(unet, pooled_dim)),
                      Distribution.UNIFORM, 0, 1024),
        ),
        outputs=(_tensor("out_sample", "float32", "batch", c.out_channels, "height", "width"),),
        dims={"batch": batch, "height": side, "width": side,
              "sequence": DimRange(max_length, max_length, max_length * MAX_PROMPT_CHUNKS, max_length)},
    )
    return spec, SdxlUNetWrapper(unet, len(hidden)).eval()


def unet_feeds(ckpt) -> dict[str, str]:
    names = ["encoder_hidden_states", "encoder_hidden_states_2"]
    feeds = {"sample": FEED_LATENTS, "timestep": FEED_TIMESTEP}
    feeds.update({names[k]: f"{n}/{HIDDEN}" for k, (n, _) in enumerate(encoders(ckpt))})
    return {**feeds, POOLED: f"{TEXT_ENCODER_2}/{POOLED}", "time_ids": FEED_TIME_IDS}


def pipeline_components(ckpt) -> list[tuple[ComponentSpec, torch.nn.Module]]:
    max_length = int(ckpt.tokenizer_2.model_max_length)
    latent = int(ckpt.unet.config.sample_size)
    return [
        *(text_encoder_spec(n, m, max_length) for n, m in encoders(ckpt)),
        unet_spec(ckpt, max_length),
        vae_decoder_component(ckpt.vae, latent),
        vae_encoder_component(ckpt.vae, latent),
    ]


def pipeline_constants(ckpt, constants: PipelineConstants) -> PipelineConstants:
    """The SD constants `bundle.pipeline_constants` made, with SDXL's data: which prompt feeds which
    text encoder, each tokenizer's pad id, the UNet's feeds and diffusers' pipeline config."""
    config = ckpt.pipeline_config or {}
    names = [n for n, _ in encoders(ckpt)]
    prompts = dict(zip(names, ("prompt", "prompt_2")))  # the refiner's one encoder reads `prompt`
    pads = {n: int(t.pad_token_id) for n, t in ((TEXT_ENCODER, ckpt.tokenizer), (TEXT_ENCODER_2, ckpt.tokenizer_2))
            if t is not None}
    refiner = bool(config.get("requires_aesthetics_score", False))
    return replace(
        constants,
        family="stable-diffusion-xl-refiner" if refiner else "stable-diffusion-xl",
        pad_token_id=pads[names[0]],
        text_encoders=prompts,
        pad_token_ids=pads,
        force_zeros_for_empty_prompt=bool(config.get("force_zeros_for_empty_prompt", True)),
        requires_aesthetics_score=refiner,
        default_strength=0.3,  # StableDiffusionXLImg2ImgPipeline's
        unet_feeds=unet_feeds(ckpt),
    )


def write_tokenizer_2(ckpt, bundle_dir: Path, probes: tuple[str, ...]) -> Path:
    """tokenizer_2.json, checked against transformers' tokenizer_2 (its own pad token: "!" in SDXL)."""
    path = bundle_dir / TOKENIZER_2_NAME
    tok = ckpt.tokenizer_2
    tok.backend_tokenizer.save(str(path))
    length = int(tok.model_max_length)
    ours = PromptTokenizer(path, length, int(tok.pad_token_id))(list(probes), warn_truncation=False)
    ref = tok(list(probes), padding="max_length", max_length=length, truncation=True, return_tensors="np").input_ids
    if ours.shape != ref.shape or (ours != ref).any():
        raise ExportError("tokenizer_2: tokenizer_2.json gives other ids than transformers' tokenizer_2")
    return path


def build_sdxl_checkpoint(preset, out: Path, seed: int = 0) -> Path:
    """A diffusers-format SDXL (base or refiner) checkpoint with random weights from `preset`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers import schedulers as diffusers_schedulers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from .presets import write_clip_tokenizer

    torch.manual_seed(seed)

    def encoder(folder: str, tokenizer_folder: str, config: dict[str, Any], pad: str, cls) -> None:
        write_clip_tokenizer(out / tokenizer_folder, preset.vocab_words, preset.tokenizer_max_length, pad)
        tok = CLIPTokenizer.from_pretrained(str(out / tokenizer_folder))
        cfg = dict(config, max_position_embeddings=preset.tokenizer_max_length,
                   vocab_size=max(config["vocab_size"], len(tok)), bos_token_id=tok.bos_token_id,
                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        cls(CLIPTextConfig(**cfg)).eval().save_pretrained(out / folder)

    index: dict[str, Any] = {"_class_name": preset.pipeline_class, "_diffusers_version": "0.30.0",
                             "text_encoder": [None, None], "tokenizer": [None, None], **preset.pipeline_config}
    if preset.text_encoder is not None:
        encoder("text_encoder", "tokenizer", preset.text_encoder, preset.pad_token, CLIPTextModel)
        index.update(text_encoder=["transformers", "CLIPTextModel"], tokenizer=["transformers", "CLIPTokenizer"])
    encoder("text_encoder_2", "tokenizer_2", preset.text_encoder_2, preset.pad_token_2, CLIPTextModelWithProjection)
    UNet2DConditionModel(**preset.unet).eval().save_pretrained(out / "unet")
    AutoencoderKL(**preset.vae).eval().save_pretrained(out / "vae")
    if preset.tiny_decoder is not None:
        from diffusers import AutoencoderTiny

        from .presets import TINY_DECODER_DIR

        AutoencoderTiny(**preset.tiny_decoder).eval().save_pretrained(out / TINY_DECODER_DIR)
    getattr(diffusers_schedulers, preset.scheduler_class).from_config(preset.scheduler).save_pretrained(out / "scheduler")
    index.update(
        text_encoder_2=["transformers", "CLIPTextModelWithProjection"], tokenizer_2=["transformers", "CLIPTokenizer"],
        unet=["diffusers", "UNet2DConditionModel"], vae=["diffusers", "AutoencoderKL"],
        scheduler=["diffusers", preset.scheduler_class], feature_extractor=[None, None], image_encoder=[None, None],
    )
    (out / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return out
