"""Random-weight diffusers checkpoints built from configs: no downloads, real architectures.

`tiny` is small enough for tests and a first run on two CPU cores; `sd15-arch` and `sd21-arch`
carry Stable Diffusion 1.5's and 2.1's published configs with random weights, so their timings are
real while their pictures are noise. They are never used to judge quality.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@dataclass(frozen=True)
class Preset:
    """The configs of one checkpoint; each dict is what diffusers/transformers `from_config` takes."""

    name: str
    text_encoder: dict[str, Any] | None  # None: an SDXL refiner (text_encoder_2 only)
    unet: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any]
    scheduler_class: str = "PNDMScheduler"
    tokenizer_max_length: int = 77
    pad_token: str = EOS
    vocab_words: tuple[str, ...] = field(default_factory=tuple)
    #: SDXL (export/sdxl.py): the second text encoder (CLIPTextModelWithProjection), its tokenizer's
    #: pad token (SDXL's second tokenizer pads with "!"), diffusers' pipeline class and its config.
    text_encoder_2: dict[str, Any] | None = None
    pad_token_2: str = "!"
    #: model_index.json's `_class_name`: the diffusers pipeline that loads the checkpoint.
    pipeline_class: str = "StableDiffusionPipeline"
    pipeline_config: dict[str, Any] = field(default_factory=dict)
    #: An AutoencoderTiny config: the checkpoint carries a random-weight tiny decoder in
    #: `TINY_DECODER_DIR` (beside the diffusers components, which loaders ignore), added at export.
    tiny_decoder: dict[str, Any] | None = None


_SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}

_SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}


def _clip_text_config(hidden: int, layers: int, heads: int, inter: int, act: str) -> dict[str, Any]:
    return {
        "vocab_size": 49408,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 77,
        "hidden_act": act,
        "projection_dim": hidden,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }


SD15 = Preset(
    name="sd15-arch",
    text_encoder=_clip_text_config(768, 12, 12, 3072, "quick_gelu"),
    unet={
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
    },
    vae=_SD_VAE,
    scheduler=_SD_SCHEDULER,
)

SD21 = Preset(
    name="sd21-arch",
    text_encoder=_clip_text_config(1024, 23, 16, 4096, "gelu"),
    unet={
        **SD15.unet,
        "sample_size": 96,
        "cross_attention_dim": 1024,
        "attention_head_dim": [5, 10, 20, 20],  # SD 2.x: per-block head counts
        "use_linear_projection": True,
    },
    vae={**_SD_VAE, "sample_size": 768},
    scheduler={**_SD_SCHEDULER, "prediction_type": "v_prediction"},
    scheduler_class="DDIMScheduler",
    pad_token="!",
)

TINY = Preset(
    name="tiny",
    text_encoder={**_clip_text_config(32, 2, 4, 64, "quick_gelu"), "vocab_size": 1000},
    unet={
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
    vae={
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [16, 32, 32],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": 64,
        "scaling_factor": 0.18215,
    },
    scheduler=_SD_SCHEDULER,
    scheduler_class="DDIMScheduler",
    tiny_decoder={"encoder_block_out_channels": [16, 16, 16], "decoder_block_out_channels": [16, 16, 16],
                  "num_encoder_blocks": [1, 1, 1], "num_decoder_blocks": [1, 1, 1], "latent_channels": 4},
    tokenizer_max_length=77,
    vocab_words=tuple(
        "a an the of on in at to and with above below left right top bottom center small large big red green "
        "blue yellow orange purple pink white black gray circle square triangle star lighthouse dusk".split()
    ),
)

#: `tiny` with an inpainting UNet: 9 input channels (latents, mask, the masked image's latents), as
#: Stable Diffusion's inpainting checkpoints are made.
TINY_INPAINT = replace(TINY, name="tiny-inpaint", unet={**TINY.unet, "in_channels": 9})

#: `tiny` with an LCM UNet (diffusers' `time_cond_proj_dim`: the guidance scale's embedding as an
#: input) and the LCM scheduler, laid out as LCM checkpoints are (LatentConsistencyModelPipeline).
TINY_LCM = replace(TINY, name="tiny-lcm", unet={**TINY.unet, "time_cond_proj_dim": 32},
                   scheduler={**_SD_SCHEDULER, "original_inference_steps": 50}, scheduler_class="LCMScheduler",
                   pipeline_class="LatentConsistencyModelPipeline")

#: SD-Turbo's and SDXL-Turbo's scheduler: Euler on trailing timesteps (1–4 steps, no guidance).
_TURBO_SCHEDULER = {**_SD_SCHEDULER, "timestep_spacing": "trailing", "interpolation_type": "linear",
                    "use_karras_sigmas": False, "prediction_type": "epsilon"}

#: `tiny` laid out as SD-Turbo is: the Euler scheduler on trailing timesteps; the "turbo" in its
#: name gives it Turbo's defaults at export (1 step, guidance 0: bundle.family_defaults).
TINY_TURBO = replace(TINY, name="tiny-turbo", scheduler=_TURBO_SCHEDULER, scheduler_class="EulerDiscreteScheduler")

#: Where a preset checkpoint keeps its tiny decoder (an AutoencoderTiny directory).
TINY_DECODER_DIR = "taesd"
#: TAESD's published config (madebyollin/taesd: diffusers' AutoencoderTiny defaults).
TAESD = {"encoder_block_out_channels": [64, 64, 64, 64], "decoder_block_out_channels": [64, 64, 64, 64],
         "num_encoder_blocks": [1, 3, 3, 3], "num_decoder_blocks": [3, 3, 3, 1], "latent_channels": 4}

#: SD-Turbo's published configs (stabilityai/sd-turbo: SD 2.1's architecture at 512×512, epsilon
#: prediction, Euler on trailing timesteps) with random weights, for timing; with TAESD's.
SD_TURBO = replace(SD21, name="sd-turbo-arch", unet={**SD21.unet, "sample_size": 64}, vae={**_SD_VAE, "sample_size": 512},
                   scheduler=_TURBO_SCHEDULER, scheduler_class="EulerDiscreteScheduler", tiny_decoder=TAESD)

#: BERT-conditioned latent diffusion (diffusers' LDMTextToImagePipeline, CompVis' ldm-text2im):
#: an LDMBert text encoder with a WordPiece tokenizer, a UNet and a KL autoencoder (`vqvae`), 8×.
TINY_LDM = replace(
    TINY, name="tiny-ldm", pipeline_class="LDMTextToImagePipeline", tiny_decoder=None,
    text_encoder={"vocab_size": 0, "max_position_embeddings": 77, "encoder_layers": 2, "encoder_ffn_dim": 64,
                  "encoder_attention_heads": 2, "head_dim": 16, "d_model": 32},
    vae={**TINY.vae, "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
         "block_out_channels": [16, 16, 32, 32]},
)

# -- SDXL: two text encoders, the UNet's added conditions (text_embeds, time_ids), the refiner --------

#: SDXL's published scheduler config (EulerDiscreteScheduler, "leading" spacing).
_SDXL_SCHEDULER = {**_SD_SCHEDULER, "timestep_spacing": "leading", "interpolation_type": "linear",
                   "use_karras_sigmas": False, "prediction_type": "epsilon"}
_SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280], "layers_per_block": 2, "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 time ids × 256 + the pooled 1280
}
_SDXL_BASE_CONFIG = {"force_zeros_for_empty_prompt": True}
_SDXL_REFINER_CONFIG = {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True}

SDXL = Preset(
    name="sdxl-arch",
    text_encoder={**_clip_text_config(768, 12, 12, 3072, "quick_gelu"), "projection_dim": 768},
    text_encoder_2={**_clip_text_config(1280, 32, 20, 5120, "gelu"), "projection_dim": 1280},
    unet=_SDXL_UNET,
    vae={**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
    scheduler=_SDXL_SCHEDULER,
    scheduler_class="EulerDiscreteScheduler",
    pipeline_class="StableDiffusionXLPipeline",
    pipeline_config=_SDXL_BASE_CONFIG,
    tiny_decoder=TAESD,  # TAESDXL has TAESD's architecture
)

#: SDXL-Turbo's published configs (stabilityai/sdxl-turbo: SDXL base's architecture at 512×512,
#: Euler on trailing timesteps; "turbo" in the name gives 1 step at guidance 0), for timing.
SDXL_TURBO = replace(SDXL, name="sdxl-turbo-arch", unet={**_SDXL_UNET, "sample_size": 64},
                     vae={**SDXL.vae, "sample_size": 512}, scheduler=_TURBO_SCHEDULER)

#: The tiny SDXL of diffusers' own SDXL tests: two 32-wide CLIPs (hidden states concatenated: 64),
#: a 2-block UNet with the "text_time" added conditions (6 time ids × 8 + the pooled 32 = 80).
TINY_SDXL = Preset(
    name="tiny-sdxl",
    text_encoder={**TINY.text_encoder, "intermediate_size": 37},
    text_encoder_2={**TINY.text_encoder, "intermediate_size": 37, "hidden_act": "gelu"},
    unet={
        "sample_size": 16, "in_channels": 4, "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [32, 64], "layers_per_block": 1, "transformer_layers_per_block": [1, 2],
        "attention_head_dim": [2, 4], "cross_attention_dim": 64, "use_linear_projection": True,
        "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 80, "norm_num_groups": 32,
    },
    vae={**TINY.vae, "scaling_factor": 0.13025, "force_upcast": True},
    scheduler=_SDXL_SCHEDULER,
    scheduler_class="EulerDiscreteScheduler",
    vocab_words=TINY.vocab_words,
    pipeline_class="StableDiffusionXLPipeline",
    pipeline_config=_SDXL_BASE_CONFIG,
)

#: The tiny SDXL refiner: text_encoder_2 only (its hidden states alone: 32), 5 time ids (original
#: size, crop, aesthetic score) × 8 + the pooled 32 = 72.
TINY_SDXL_REFINER = replace(
    TINY_SDXL, name="tiny-sdxl-refiner", text_encoder=None,
    unet={**TINY_SDXL.unet, "cross_attention_dim": 32, "projection_class_embeddings_input_dim": 72},
    pipeline_class="StableDiffusionXLImg2ImgPipeline", pipeline_config=_SDXL_REFINER_CONFIG,
)

#: The tiny SDXL laid out as SDXL-Turbo is (Euler on trailing timesteps; "turbo" in the name gives
#: Turbo's defaults at export: 1 step, guidance 0).
TINY_SDXL_TURBO = replace(TINY_SDXL, name="tiny-sdxl-turbo", scheduler=_TURBO_SCHEDULER)

PRESETS: dict[str, Preset] = {p.name: p for p in (TINY, TINY_INPAINT, TINY_LCM, TINY_TURBO, TINY_LDM, SD15, SD21,
                                                  SD_TURBO, SDXL, SDXL_TURBO, TINY_SDXL, TINY_SDXL_REFINER,
                                                  TINY_SDXL_TURBO)}


def write_clip_tokenizer(out_dir: Path, words: Iterable[str] = (), max_length: int = 77, pad_token: str = EOS) -> None:
    """Write a CLIP byte-level BPE tokenizer (vocab.json, merges.txt, tokenizer.json) to `out_dir`.

    The vocabulary is CLIP's layout (256 byte symbols, the same with `</w>`, merges, then the two
    special tokens); merges are learned from `words` so that each given word is one token. Written
    by hand because no public tokenizer can be downloaded here; loading goes through transformers'
    own `CLIPTokenizer`, so the result is what diffusers pipelines use.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_order)
    merges: list[tuple[str, str]] = []
    words = sorted(set(w.lower() for w in words))
    if words:
        bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
        bpe.normalizer = normalizers.Lowercase()
        bpe.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        trainer = trainers.BpeTrainer(
            vocab_size=100_000, min_frequency=1, initial_alphabet=alphabet,
            end_of_word_suffix="</w>", show_progress=False,
        )
        bpe.train_from_iterator([" ".join(words)], trainer)
        merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    vocab: dict[str, int] = {}
    for token in [*alphabet, *(a + "</w>" for a in alphabet), *("".join(m) for m in merges), BOS, EOS]:
        vocab.setdefault(token, len(vocab))
    tokenizer = CLIPTokenizer(
        vocab=vocab, merges=merges, bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=pad_token,
        model_max_length=max_length,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    # transformers 4's (slow) CLIPTokenizer reads these two files, not tokenizer.json; writing them
    # keeps the checkpoint loadable by tools pinned to it (e.g. Optimum's exporter).
    (out_dir / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


def _build_ldm_checkpoint(preset: Preset, out: Path) -> Path:
    """A latent-diffusion checkpoint laid out as CompVis' ldm-text2im is (bert/, tokenizer/, unet/,
    vqvae/, scheduler/), with a WordPiece vocabulary of the preset's words."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers import schedulers as diffusers_schedulers
    from diffusers.pipelines.latent_diffusion import LDMBertModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig
    from transformers import BertTokenizer

    logger.info("building %s checkpoint with random weights in %s", preset.name, out)
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(preset.vocab_words)),
             *"abcdefghijklmnopqrstuvwxyz0123456789.,;!?"]
    vocab_file = out / "tokenizer" / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # transformers 5 builds a WordPiece tokenizer from the vocabulary itself; vocab.txt is written
    # too, for tools that read it (transformers 4's slow BertTokenizer)
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, model_max_length=preset.tokenizer_max_length)
    tokenizer.save_pretrained(str(out / "tokenizer"))
    LDMBertModel(LDMBertConfig(**{**preset.text_encoder, "vocab_size": len(vocab)})).eval().save_pretrained(out / "bert")
    UNet2DConditionModel(**preset.unet).eval().save_pretrained(out / "unet")
    AutoencoderKL(**preset.vae).eval().save_pretrained(out / "vqvae")
    getattr(diffusers_schedulers, preset.scheduler_class).from_config(preset.scheduler).save_pretrained(out / "scheduler")
    model_index = {
        "_class_name": preset.pipeline_class, "_diffusers_version": "0.30.0",
        "bert": ["latent_diffusion", "LDMBertModel"], "tokenizer": ["transformers", "BertTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vqvae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", preset.scheduler_class],
    }
    (out / "model_index.json").write_text(json.dumps(model_index, indent=2), encoding="utf-8")
    return out


def _nest_clip_keys(weights: Path) -> None:
    """Store CLIP's weights under `text_model.`, as the published checkpoints and transformers < 5.6
    do (transformers 5 reads both; it writes them flattened, which Optimum's pinned transformers 4
    reads as missing keys, exporting a randomly initialised text encoder)."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights))
    save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}, str(weights),
              metadata={"format": "pt"})


def _byte_order(symbol: str) -> int:
    """CLIP's `bytes_to_unicode` order: the printable bytes first, then the remapped ones."""
    code = ord(symbol)
    return code if code < 256 else code + 1000


def build_checkpoint(preset: Preset | str, out_dir: Path | str, seed: int = 0) -> Path:
    """Build a diffusers-format checkpoint with random weights from a preset's configs."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers import schedulers as diffusers_schedulers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    preset = PRESETS[preset] if isinstance(preset, str) else preset
    out = Path(out_dir)
    if preset.text_encoder_2 is not None:
        from .sdxl import build_sdxl_checkpoint

        return build_sdxl_checkpoint(preset, out, seed)
    torch.manual_seed(seed)
    if preset.pipeline_class == "LDMTextToImagePipeline":
        return _build_ldm_checkpoint(preset, out)
    logger.info("building %s checkpoint with random weights in %s", preset.name, out)
    write_clip_tokenizer(out / "tokenizer", preset.vocab_words, preset.tokenizer_max_length, preset.pad_token)
    tokenizer = CLIPTokenizer.from_pretrained(str(out / "tokenizer"))
    # The special-token ids must be the tokenizer's: CLIP pools the hidden state at the EOS token.
    text_config = dict(
        preset.text_encoder,
        max_position_embeddings=preset.tokenizer_max_length,
        vocab_size=max(preset.text_encoder["vocab_size"], len(tokenizer)),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    CLIPTextModel(CLIPTextConfig(**text_config)).eval().save_pretrained(out / "text_encoder")
    _nest_clip_keys(out / "text_encoder" / "model.safetensors")
    UNet2DConditionModel(**preset.unet).eval().save_pretrained(out / "unet")
    AutoencoderKL(**preset.vae).eval().save_pretrained(out / "vae")
    if preset.tiny_decoder is not None:
        from diffusers import AutoencoderTiny

        AutoencoderTiny(**preset.tiny_decoder).eval().save_pretrained(out / TINY_DECODER_DIR)
    scheduler_cls = getattr(diffusers_schedulers, preset.scheduler_class)
    scheduler_cls.from_config(preset.scheduler).save_pretrained(out / "scheduler")
    model_index = {
        "_class_name": preset.pipeline_class,
        "_diffusers_version": "0.30.0",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", preset.scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(model_index, indent=2), encoding="utf-8")
    return out
