"""Reading a diffusers-format Stable Diffusion checkpoint directory.

Its index and identity (`read_model_index`, `weights_sha256`) need only the standard library: the
runtime looks a checkpoint's cached bundle up with them, and must not import torch to do it (that
alone is ~190 MB resident in a serving or benchmarked process). Loading the models needs torch."""

from __future__ import annotations

import hashlib
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
#: SDXL: the second text encoder and tokenizer; the refiner has only these (no text_encoder/tokenizer).
SDXL_REQUIRED = ("text_encoder_2", "tokenizer_2", "unet", "vae", "scheduler")
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "LatentConsistencyModelPipeline", *SDXL_PIPELINES)
#: Every folder that may hold a checkpoint's weights or vocabulary (hashed where the index names it).
ALL_COMPONENTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae", "scheduler")


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
    #: SDXL (export/sdxl.py): the second text encoder and tokenizer, diffusers' pipeline class and
    #: its config (force_zeros_for_empty_prompt, requires_aesthetics_score). text_encoder and
    #: tokenizer are None in a refiner.
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: Any = None
    pipeline_class: str = "StableDiffusionPipeline"
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
    for name in SDXL_REQUIRED if pipeline_class in SDXL_PIPELINES else REQUIRED_COMPONENTS:
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
    names = [n for n in ALL_COMPONENTS if isinstance(index.get(n), list) and index[n][-1] is not None]
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

    def load(name: str, library: Any) -> Any:
        class_name = index[name][1]
        cls = getattr(library, class_name, None)
        if cls is None:
            raise BundleError(str(path / name), f"unknown class {class_name!r} in model_index.json")
        # Export runs and compares in fp32 whatever dtype the weights were saved in (transformers 5
        # would otherwise keep a checkpoint's fp16); the tokenizer takes no dtype.
        kwargs = {"torch_dtype": torch.float32} if name in ("unet", "vae") else {}
        if name.startswith("text_encoder"):
            kwargs = {"dtype": torch.float32}
        try:
            return cls.from_pretrained(str(path / name), **kwargs)
        except (OSError, ValueError, json.JSONDecodeError) as e:
            raise BundleError(str(path / name), f"cannot be loaded: {e}") from None

    scheduler_file = path / "scheduler" / "scheduler_config.json"
    if not scheduler_file.is_file():
        raise BundleError(str(scheduler_file), "missing")
    scheduler_config = json.loads(scheduler_file.read_text(encoding="utf-8"))
    def optional(name: str, library: Any) -> Any:
        entry = index.get(name)
        return load(name, library) if isinstance(entry, list) and entry[-1] is not None else None

    text_encoder, text_encoder_2 = optional("text_encoder", transformers), optional("text_encoder_2", transformers)
    pipeline_class = index["_class_name"]
    return Checkpoint(
        path=path,
        text_encoder=text_encoder.eval() if text_encoder is not None else None,
        text_encoder_2=text_encoder_2.eval() if text_encoder_2 is not None else None,
        tokenizer=optional("tokenizer", transformers),
        tokenizer_2=optional("tokenizer_2", transformers),
        pipeline_class=pipeline_class,
        pipeline_config={k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)},
        unet=load("unet", diffusers).eval(),
        vae=load("vae", diffusers).eval(),
        scheduler_class=str(scheduler_config.get("_class_name", index["scheduler"][1])),
        scheduler_config={k: v for k, v in scheduler_config.items() if not k.startswith("_")},
        weights_sha256=weights_sha256(path),
    )
