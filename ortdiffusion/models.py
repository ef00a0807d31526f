"""Turning what a user names as a model into a loaded bundle.

A model is `builtin` (the shipped model), a bundle directory, a diffusers checkpoint directory (exported once into a cache keyed
by the hash of its weights, then reused), or a preset name (`tiny`, `sd15-arch`, `sd21-arch`:
random-weight checkpoints built from configs, for timing). Checkpoints and presets need the
`export` extra; bundles need only the runtime.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from .runtime.cache import cache_dir
from .runtime.errors import BundleError, ExportError
from .runtime.manifest import MANIFEST_NAME

logger = logging.getLogger(__name__)

BUILTIN = "builtin"
PRESET_NAMES = ("tiny", "sd15-arch", "sd21-arch")
BUILTIN_DIR = Path(__file__).parent / "builtin"


def builtin_bundle() -> Path:
    """The shipped model's bundle (package data): runs with the runtime alone."""
    return BUILTIN_DIR / "bundle"


def builtin_checkpoint() -> Path:
    """The shipped model's diffusers checkpoint (package data), the source of its bundle."""
    return BUILTIN_DIR / "checkpoint"


DEFAULT_MODEL = BUILTIN if (builtin_bundle() / MANIFEST_NAME).is_file() else "tiny"


def _needs_export_extra(what: str) -> ImportError:
    return ImportError(f"{what} needs the export extra (torch, diffusers, transformers): pip install 'ortdiffusion[export]'")


def preset_checkpoint(name: str) -> Path:
    """The checkpoint directory of a random-weight preset, built on first use."""
    path = cache_dir() / "checkpoints" / name
    if not (path / "model_index.json").is_file():
        try:
            from .export.presets import build_checkpoint
        except ImportError:
            raise _needs_export_extra(f"the preset {name!r}") from None
        tmp = path.with_name(f".{name}.partial-{os.getpid()}")
        build_checkpoint(name, tmp)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.rename(path)
        except OSError:  # another process built it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return path


#: Export variants a cached bundle can be made in: (target, precision) → its cache-name suffix.
VARIANTS = {("generic", "fp32"): "", ("cpu", "fp32"): "-cpu", ("cpu", "int8"): "-cpu-int8",
            ("generic", "fp16"): "-fp16", ("cuda", "fp16"): "-cuda-fp16"}


def resolve_bundle(model: str | Path | None, progress: Callable[[str], None] | None = None,
                   target: str = "generic", precision: str = "fp32", allow_export: bool = True) -> Path:
    """A bundle directory for `model`, exporting (and caching) a checkpoint when needed. A bundle
    or the built-in model is used as it is; a checkpoint or preset is exported once per variant
    (`target`, `precision`; see VARIANTS). `allow_export=False`: a cached bundle or a BundleError."""
    model = str(model) if model is not None else DEFAULT_MODEL
    if (target, precision) not in VARIANTS:
        allowed = ", ".join(f"{t}/{p}" for t, p in VARIANTS)
        raise BundleError(str(model), f"no export variant {target}/{precision}; allowed: {allowed}")
    if model == BUILTIN and (target, precision) == ("generic", "fp32"):
        return builtin_bundle()
    defaults = None
    if model == BUILTIN:  # another variant of the built-in model keeps its shipped defaults
        from .runtime.manifest import load_manifest

        shipped = load_manifest(builtin_bundle()).pipeline
        defaults = (shipped.default_steps, shipped.default_guidance)
        model = str(builtin_checkpoint())
    path = Path(model)
    if (path / MANIFEST_NAME).is_file():
        return path
    if model in PRESET_NAMES and not path.exists():
        path = preset_checkpoint(model)
    if not (path / "model_index.json").is_file():
        raise BundleError(
            str(path), f"not a bundle (no {MANIFEST_NAME}), a diffusers checkpoint (no model_index.json) "
            f"or a preset ({', '.join(PRESET_NAMES)})"
        )
    from .export.checkpoint import read_model_index, weights_sha256  # the standard library only

    read_model_index(path)
    bundle = cache_dir() / "bundles" / (weights_sha256(path)[:16] + VARIANTS[target, precision])
    if (bundle / MANIFEST_NAME).is_file():  # found without importing torch: it stays out of the process
        logger.info("using cached bundle %s for %s", bundle, path)
        return bundle
    if not allow_export:
        raise BundleError(str(path), f"no cached {target}/{precision} bundle for it in {cache_dir() / 'bundles'}; "
                          "export it first")
    try:
        from .export.bundle import export_checkpoint
    except ImportError:
        raise _needs_export_extra(f"exporting the checkpoint {path}") from None
    (progress or logger.info)(f"exporting {path} ({target}, {precision}) once into {bundle}")
    try:
        export_checkpoint(path, bundle, _variant_options(model, target, precision, defaults), progress=progress)
    except ExportError:
        if not (bundle / MANIFEST_NAME).is_file():  # not a concurrent export that won the race
            raise
    return bundle


def _variant_options(model: str, target: str, precision: str, defaults: tuple[int, float] | None):
    from .export.bundle import ExportOptions
    from .export.optimize import Target
    from .export.quantize import Calibration
    from .runtime.manifest import Precision

    calibration = Calibration()
    if model in PRESET_NAMES:
        # Random weights: speed does not depend on the calibration, so a short one does.
        calibration = Calibration(prompts=("a red circle", "a blue square on the left"), steps=4)
    steps, guidance = defaults or (ExportOptions.default_steps, ExportOptions.default_guidance)
    return ExportOptions(target=Target(target), precision=Precision(precision), calibration=calibration,
                         default_steps=steps, default_guidance=guidance)


def resolve_checkpoint(model: str | Path | None) -> Path:
    """The diffusers checkpoint behind `model` (for the torch side of benchmarks and comparisons)."""
    model = str(model) if model is not None else DEFAULT_MODEL
    if model == BUILTIN:
        return builtin_checkpoint()
    path = Path(model)
    if model in PRESET_NAMES and not path.exists():
        return preset_checkpoint(model)
    if (path / "model_index.json").is_file():
        return path
    if (path / MANIFEST_NAME).is_file():
        from .runtime.manifest import load_manifest

        source = Path(load_manifest(path).source.checkpoint)
        if (source / "model_index.json").is_file():
            return source
        raise BundleError(str(path), f"its source checkpoint {source} is not on this machine")
    raise BundleError(str(path), "not a diffusers checkpoint, a bundle or a preset")


def load_pipeline(model: str | Path | None = None, progress: Callable[[str], None] | None = None, **load_options):
    """`Pipeline.load` for any model `resolve_bundle` accepts."""
    from .runtime.pipeline import Pipeline

    return Pipeline.load(resolve_bundle(model, progress), **load_options)
