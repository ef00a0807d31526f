"""Single-file checkpoints (`.safetensors`, `.ckpt`: the original Stable Diffusion key layout the
web UIs and model sites use) → a diffusers checkpoint directory, through diffusers' own
`from_single_file`; the directory is then exported like any checkpoint (same parity gate)."""

from __future__ import annotations

import logging
from pathlib import Path

from ..runtime.errors import BundleError

logger = logging.getLogger(__name__)


def convert_single_file(path: Path | str, out_dir: Path | str, config: str | None = None,
                        local_files_only: bool = False) -> Path:
    """Load `path` with `StableDiffusionPipeline.from_single_file` and save it as a diffusers
    directory at `out_dir`. `config`: a diffusers directory or hub name holding the model's
    configs (and tokenizer); None: the one diffusers infers from the keys (fetched from the hub
    unless it is in the local cache)."""
    import torch
    from diffusers import StableDiffusionPipeline

    path, out_dir = Path(path), Path(out_dir)
    kwargs = {"torch_dtype": torch.float32, "local_files_only": local_files_only}
    if config is not None:
        kwargs["config"] = str(config)
    try:
        pipe = StableDiffusionPipeline.from_single_file(str(path), safety_checker=None, requires_safety_checker=False,
                                                        **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        hint = "" if config is not None else (
            " (diffusers infers the model's configs from its keys and fetches them from the hub; name a diffusers "
            "directory or hub model with its configs with --config)")
        raise BundleError(str(path), f"cannot be read as a Stable Diffusion single-file checkpoint: {e}{hint}") from None
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir
