"""Turning what a user names as a model into a loaded bundle: the one resolver of the CLI
(`generate`, `info`, `export`, `compare`, `bench`, `serve`), `Pipeline.load` and the service.

A model is `builtin` (the shipped model), a bundle directory, a diffusers checkpoint directory (exported once into a cache keyed
by the hash of its weights, then reused), or a preset name (`tiny`, `sd15-arch`, `sd21-arch`:
random-weight checkpoints built from configs, for timing). Checkpoints and presets need the
`export` extra the first time (to build and export them); bundles, the built-in model and cached
exports need only the runtime, and `find_bundle` finds them without importing torch.
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
PRESET_NAMES = ("tiny", "sd15-arch", "sd21-arch", "sd-turbo-arch", "sdxl-arch", "sdxl-turbo-arch", "tiny-sdxl",
                "tiny-sdxl-refiner")
BUILTIN_DIR = Path(__file__).parent / "builtin"


def builtin_bundle() -> Path:
    """The shipped model's bundle (package data): runs with the runtime alone."""
    return BUILTIN_DIR / "bundle"


def builtin_checkpoint() -> Path:
    """The shipped model's diffusers checkpoint (package data), the source of its bundle."""
    return BUILTIN_DIR / "checkpoint"


DEFAULT_MODEL = BUILTIN if (builtin_bundle() / MANIFEST_NAME).is_file() else "tiny"


#: The modules each extra brings, by the name `pip install 'ortdiffusion[EXTRA]'` takes.
EXTRA_MODULES = {
    "export": ("torch", "diffusers", "transformers", "onnx"),
    "cpu": ("onnxruntime",),
    "serve": ("fastapi", "uvicorn", "prometheus_client"),
}


def missing_extra(extra: str, what: str) -> ImportError | None:
    """An ImportError naming `pip install 'ortdiffusion[extra]'` if a module of `extra` is absent,
    found without importing anything (so it is cheap to ask before any work)."""
    import importlib.util

    missing = []
    for name in EXTRA_MODULES[extra]:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):  # a module set to None in sys.modules, or a broken one
            missing.append(name)
    if not missing:
        return None
    if extra == "cpu":
        return ImportError(f"{what} needs ONNX Runtime ({', '.join(missing)} is not installed): "
                           "pip install 'ortdiffusion[cpu]' (or 'ortdiffusion[gpu]' on an NVIDIA GPU)")
    return ImportError(f"{what} needs the {extra} extra ({', '.join(missing)} not installed): "
                       f"pip install 'ortdiffusion[{extra}]'")


def require_extra(extra: str, what: str) -> None:
    error = missing_extra(extra, what)
    if error is not None:
        raise error


def _describe_names() -> str:
    return f"{BUILTIN!r}, a preset ({', '.join(PRESET_NAMES)}), a bundle directory or a diffusers checkpoint directory"


def find_bundle(model: str | Path | None) -> Path:
    """The bundle `model` names, to be run (`Pipeline.load`), without exporting and without
    importing torch: `builtin` (or None), a bundle directory, or a checkpoint or preset already
    exported into the cache (generic fp32). Anything else is a `BundleError` that says how to make
    the bundle; no ONNX Runtime to run it, an ImportError naming the extra that brings it."""
    require_extra("cpu", "loading a model")
    model = str(model) if model is not None else DEFAULT_MODEL
    if model == BUILTIN:
        return builtin_bundle()
    path = Path(model)
    if (path / MANIFEST_NAME).is_file():
        return path
    cached = cached_bundle(model)
    if cached is not None:
        return cached
    if (path / "model_index.json").is_file() or (model in PRESET_NAMES and not path.exists()):
        raise BundleError(
            model, "is a diffusers checkpoint, not a bundle, and has no cached export: export it first "
            f"(`ortdiffusion export {model} OUT`), or use ortdiffusion.models.load_pipeline, which exports and caches it"
        )
    raise BundleError(str(path), f"not a bundle (no {MANIFEST_NAME}) nor a model name; a model is {_describe_names()}")


def cached_bundle(model: str | Path, target: str = "generic", precision: str = "fp32") -> Path | None:
    """The cached export of a checkpoint or preset in this variant, if there is one (torch-free)."""
    model = str(model)
    path = Path(model)
    if model in PRESET_NAMES and not path.exists():
        path = cache_dir() / "checkpoints" / model
    if model == BUILTIN:
        path = builtin_checkpoint()
    if not (path / "model_index.json").is_file() or (target, precision) not in VARIANTS:
        return None
    from .export.checkpoint import weights_sha256  # the standard library only

    bundle = cache_dir() / "bundles" / (weights_sha256(path)[:16] + VARIANTS[target, precision])
    return bundle if (bundle / MANIFEST_NAME).is_file() else None


def needs_export(model: str | Path | None, target: str = "generic", precision: str = "fp32") -> bool:
    """Whether resolving `model` would build or export something (and so need the export extra)."""
    model = str(model) if model is not None else DEFAULT_MODEL
    if model == BUILTIN and (target, precision) == ("generic", "fp32"):
        return False
    if (Path(model) / MANIFEST_NAME).is_file():
        return False
    is_model = model in PRESET_NAMES or model == BUILTIN or (Path(model) / "model_index.json").is_file()
    return is_model and cached_bundle(model, target, precision) is None


def preset_checkpoint(name: str) -> Path:
    """The checkpoint directory of a random-weight preset, built on first use."""
    path = cache_dir() / "checkpoints" / name
    if not (path / "model_index.json").is_file():
        require_extra("export", f"the preset {name!r}")  # before any work: presets import torch only inside
        from .export.presets import build_checkpoint

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
            f"or a model name; a model is {_describe_names()}"
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
    require_extra("export", f"exporting the checkpoint {path}")
    from .export.bundle import export_checkpoint

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
    # a preset's checkpoint may carry a random-weight tiny decoder: its bundles get it
    from .export.presets import TINY_DECODER_DIR

    tiny = resolve_checkpoint(model) / TINY_DECODER_DIR
    return ExportOptions(target=Target(target), precision=Precision(precision), calibration=calibration,
                         default_steps=steps, default_guidance=guidance,
                         tiny_decoder=tiny if (tiny / "config.json").is_file() else None)


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
    raise BundleError(str(path), f"not a diffusers checkpoint, a bundle or a model name; a model is {_describe_names()}")


def load_pipeline(model: str | Path | None = None, progress: Callable[[str], None] | None = None,
                  refiner: str | Path | None = None, **load_options):
    """`Pipeline.load` for any model `resolve_bundle` accepts; `refiner`: an SDXL refiner, the same."""
    from .runtime.pipeline import Pipeline

    if refiner is not None:
        load_options["refiner"] = resolve_bundle(refiner, progress)
    return Pipeline.load(resolve_bundle(model, progress), **load_options)
