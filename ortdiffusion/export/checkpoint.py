"""Reading a diffusers-format Stable Diffusion checkpoint directory.

Its index and identity (`read_model_index`, `weights_sha256`) need only the standard library: the
runtime looks a checkpoint's cached bundle up with them, and must not import torch to do it (that
alone is ~190 MB resident in a serving or benchmarked process). Loading the models needs torch."""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..runtime.errors import BundleError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

REQUIRED_COMPONENTS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")
#: The pipelines whose checkpoints export; LCM checkpoints are Stable Diffusion ones with an LCM UNet
#: (its guidance embedding input, `timestep_cond`) and the LCM scheduler.
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "LatentConsistencyModelPipeline", "LDMTextToImagePipeline")
#: SDXL: the second text encoder and tokenizer; the refiner has only these (no text_encoder/tokenizer).
SDXL_REQUIRED = ("text_encoder_2", "tokenizer_2", "unet", "vae", "scheduler")
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
SUPPORTED_PIPELINES += SDXL_PIPELINES
#: Every role whose folder may hold a checkpoint's weights or vocabulary (hashed where the index names it).
ALL_COMPONENTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae", "scheduler")
#: Where a family's checkpoint keeps each role's folder, where it is not the role's own name:
#: latent diffusion (LDMTextToImagePipeline) calls its text encoder `bert` (LDMBert) and its VAE
#: `vqvae` (a VQModel or an AutoencoderKL).
FOLDERS = {"LDMTextToImagePipeline": {"text_encoder": "bert", "vae": "vqvae"}}


def folder(index: dict[str, Any], role: str) -> str:
    """The checkpoint folder of `role` ("text_encoder", "vae", …) in the family `index` names."""
    return FOLDERS.get(index.get("_class_name"), {}).get(role, role)


def names_folder(index: dict[str, Any], role: str) -> bool:
    """Whether the checkpoint has `role` (an SDXL refiner has no text_encoder)."""
    entry = index.get(folder(index, role))
    return isinstance(entry, list) and entry[-1] is not None


@dataclass
class Checkpoint:
    path: Path
    text_encoder: torch.nn.Module
    tokenizer: Any  # a transformers fast tokenizer
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler_class: str
    scheduler_config: dict[str, Any]
    weights_sha256: str
    #: model_index.json's `_class_name`: the diffusers pipeline, which names the family.
    pipeline_class: str = "StableDiffusionPipeline"
    #: SDXL (export/sdxl.py): the second text encoder and tokenizer, and diffusers' pipeline config
    #: (force_zeros_for_empty_prompt, requires_aesthetics_score). text_encoder and tokenizer are
    #: None in a refiner.
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: Any = None
    pipeline_config: dict[str, Any] | None = None

    @property
    def is_sdxl(self) -> bool:
        return self.pipeline_class in SDXL_PIPELINES


def read_model_index(path: Path) -> dict[str, Any]:
    index_path = path / "model_index.json"
    if not path.is_dir():
        raise BundleError(str(path), "not a directory; expected a diffusers checkpoint directory")
    if not index_path.is_file():
        raise BundleError(str(index_path), "missing: a diffusers checkpoint directory has a model_index.json")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(str(index_path), f"unreadable JSON ({e})") from None
    pipeline_class = index.get("_class_name")
    if pipeline_class not in SUPPORTED_PIPELINES:
        raise BundleError(
            str(index_path), f"_class_name {pipeline_class!r} is not supported; allowed: {', '.join(SUPPORTED_PIPELINES)}"
        )
    for role in SDXL_REQUIRED if pipeline_class in SDXL_PIPELINES else REQUIRED_COMPONENTS:
        name = folder(index, role)
        entry = index.get(name)
        if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            raise BundleError(str(index_path), f"no {name} entry; a Stable Diffusion checkpoint needs {', '.join(REQUIRED_COMPONENTS)}")
        if not (path / name).is_dir():
            raise BundleError(str(path / name), f"missing: model_index.json names {entry[1]} but the {name}/ folder is absent")
    return index


def weights_sha256(path: Path) -> str:
    """One hash over the configs and weights of every component: the checkpoint's identity."""
    h = hashlib.sha256()
    index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    # the folders the index names (an SD checkpoint's five hash as they always did)
    names = [folder(index, role) for role in ALL_COMPONENTS if names_folder(index, role)]
    files = [path / "model_index.json"] + sorted(
        f for name in names for f in (path / name).rglob("*") if f.is_file()
    )
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def load_checkpoint(path: Path | str) -> Checkpoint:
    import diffusers
    import torch
    import transformers

    path = Path(path)
    index = read_model_index(path)

    def load(role: str, library: Any) -> Any:
        name = folder(index, role)
        package, class_name = index[name]
        if package not in ("diffusers", "transformers"):  # a class of a diffusers pipeline's own module (LDMBert)
            library = importlib.import_module(f"diffusers.pipelines.{package}")
        cls = getattr(library, class_name, None)
        if cls is None:
            raise BundleError(str(path / name), f"unknown class {class_name!r} in model_index.json")
        # Export runs and compares in fp32 whatever dtype the weights were saved in (transformers 5
        # would otherwise keep a checkpoint's fp16); the tokenizer takes no dtype.
        kwargs = {"torch_dtype": torch.float32} if role in ("unet", "vae") else {}
        if role.startswith("text_encoder"):
            kwargs = {"dtype": torch.float32}
        try:
            return cls.from_pretrained(str(path / name), **kwargs)
        except (OSError, ValueError, json.JSONDecodeError) as e:
            raise BundleError(str(path / name), f"cannot be loaded: {e}") from None

    scheduler_file = path / "scheduler" / "scheduler_config.json"
    if not scheduler_file.is_file():
        raise BundleError(str(scheduler_file), "missing")
    scheduler_config = json.loads(scheduler_file.read_text(encoding="utf-8"))
    def optional(role: str, library: Any) -> Any:
        return load(role, library) if names_folder(index, role) else None

    text_encoder, text_encoder_2 = optional("text_encoder", transformers), optional("text_encoder_2", transformers)
    tokenizer = optional("tokenizer", transformers)
    # the text encoder takes no more positions than it has (a BERT tokenizer says 512; LDMBert has 77)
    positions = getattr(getattr(text_encoder, "config", None), "max_position_embeddings", None)
    if positions and tokenizer.model_max_length > positions:
        tokenizer.model_max_length = int(positions)
    return Checkpoint(
        path=path,
        text_encoder=text_encoder.eval() if text_encoder is not None else None,
        text_encoder_2=text_encoder_2.eval() if text_encoder_2 is not None else None,
        tokenizer=tokenizer,
        tokenizer_2=optional("tokenizer_2", transformers),
        pipeline_config={k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)},
        unet=load("unet", diffusers).eval(),
        vae=load("vae", diffusers).eval(),
        scheduler_class=str(scheduler_config.get("_class_name", index["scheduler"][1])),
        scheduler_config={k: v for k, v in scheduler_config.items() if not k.startswith("_")},
        weights_sha256=weights_sha256(path),
        pipeline_class=str(index["_class_name"]),
    )
