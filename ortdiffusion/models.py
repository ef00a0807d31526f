"""Turning what a user names as a model into a loaded bundle: the one resolver of the CLI
(`generate`, `info`, `export`, `compare`, `bench`, `serve`), `Pipeline.load` and the service.

A model is `builtin` (the shipped model), a bundle directory, a diffusers checkpoint directory (exported once into a cache keyed
by the hash of its weights, then reused), a preset name (`tiny`, `sd15-arch`, `sd21-arch`:
random-weight checkpoints built from configs, for timing), a Hugging Face hub name (`org/name`:
its snapshot in the local hub cache, downloaded first where the network is allowed), a
single-file checkpoint (`.safetensors`/`.ckpt` in the original LDM key layout: converted with
diffusers' `from_single_file`, then exported) or an ONNX export in Optimum's layout (imported
without torch). Checkpoints, single files and presets need the `export` extra the first time (to
build and export them); bundles, the built-in model and cached exports need only the runtime, and
`find_bundle` finds them without importing torch.
"""

from __future__ import annotations

import logging
import os
import re
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


def _used(path: Path) -> Path:
    """Mark a cache entry as used now (its mtime): what `ortdiffusion cache prune --older-than` reads."""
    try:
        os.utime(path)
    except OSError:  # a read-only cache still serves
        pass
    return path


def _describe_names() -> str:
    return (f"{BUILTIN!r}, a preset ({', '.join(PRESET_NAMES)}), a bundle directory, a diffusers checkpoint directory, "
            "a Hugging Face hub name (org/name), a single-file checkpoint (.safetensors, .ckpt) or an ONNX export in "
            "Optimum's layout")


# -- what a name is: hub names, single files, Optimum exports (torch-free) ----------------------

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_hub_name(model: str) -> bool:
    """`org/name` that is not a path on this machine."""
    return bool(_HUB_NAME.match(model)) and not Path(model).exists() and not model.endswith(SINGLE_FILE_SUFFIXES)


def hub_cache_dir() -> Path:
    """huggingface_hub's cache, read from the environment when asked (HF_HUB_CACHE, HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home) / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


#: What a hub snapshot needs of a diffusers repository, an Optimum export or a bundle: the
#: components' configs and weights, not a single-file copy at the top (several GB), other weight
#: formats or variants, the safety checker.
HUB_ALLOW = ["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors", "*/*.onnx", "*/*.onnx_data", "*/*.pb",
             "manifest.json", "tokenizer.json", "*.onnx", "*.onnx.data"]
HUB_IGNORE = ["*.ckpt", "*.bin", "*.msgpack", "*.h5", "*.fp16.*", "*.non_ema.*", "*.ema.*", "safety_checker/*",
              "feature_extractor/*"]


def hub_snapshot(name: str, download: bool = True, revision: str | None = None) -> Path:
    """The local snapshot directory of hub model `name` (huggingface_hub's cache, HF_HOME and
    HF_HUB_OFFLINE honoured); downloaded first when `download` and the network is allowed."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise ImportError(f"the hub model {name!r} needs huggingface_hub: pip install 'ortdiffusion[hub]'") from None
    cache = hub_cache_dir()
    local_only = not download or hub_offline()
    try:
        return Path(snapshot_download(name, revision=revision, cache_dir=str(cache), local_files_only=local_only,
                                      allow_patterns=HUB_ALLOW, ignore_patterns=HUB_IGNORE))
    except LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE is set" if hub_offline() else "downloading was not allowed") if local_only \
            else "it could not be downloaded"
        raise BundleError(name, f"no such directory here, and as a hub model not in the Hugging Face cache {cache / ('models--' + name.replace('/', '--'))} "
                                f"and {why}; download it where the network is allowed (`hf download "
                                f"{name}`) or point HF_HOME at a cache that has it") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise BundleError(name, f"hub model could not be fetched into {cache}: {e}") from None


def _local(model: str, download: bool) -> str:
    """A hub name → its snapshot directory; any other name as it is."""
    return str(hub_snapshot(model, download)) if is_hub_name(model) else model


def is_optimum_export(path: Path) -> bool:
    from .export.optimum_layout import is_optimum_layout  # the standard library only, at module level

    return path.is_dir() and is_optimum_layout(path)


def is_single_file(path: Path) -> bool:
    return path.suffix.lower() in SINGLE_FILE_SUFFIXES and path.is_file()


def check_single_file(path: Path) -> None:
    """A .safetensors file must hold Stable Diffusion's original (LDM) key layout: its UNet under
    `model.diffusion_model.`, its VAE under `first_stage_model.` (read from the header, torch-free)."""
    import json
    import struct

    if path.suffix.lower() != ".safetensors":
        return  # a pickled .ckpt is read (and checked) with torch, at conversion
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 * 2**20:
                raise ValueError(f"header of {length} bytes")
            keys = [k for k in json.loads(f.read(length)) if k != "__metadata__"]
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise BundleError(str(path), f"not a readable safetensors file ({e})") from None
    missing = [what for prefix, what in (("model.diffusion_model.", "UNet"), ("first_stage_model.", "VAE"))
               if not any(k.startswith(prefix) for k in keys)]
    if missing:
        sample = ", ".join(repr(k) for k in keys[:3]) or "none"
        raise BundleError(str(path), f"unknown single-file layout: no {' or '.join(missing)} keys in the original "
                          f"Stable Diffusion layout ({', '.join(p for p in ('model.diffusion_model.*', 'first_stage_model.*'))}"
                          f"); it has {len(keys)} tensors, e.g. {sample}")


def _single_file_key(path: Path, config: str | None) -> str:
    from .runtime.manifest import sha256_file

    key = sha256_file(path)[:16]
    if config:
        import hashlib

        key += "-" + hashlib.sha256(str(Path(config).resolve() if Path(config).exists() else config).encode()).hexdigest()[:8]
    return key


def single_file_checkpoint(path: Path, config: str | None = None, progress: Callable[[str], None] | None = None,
                           convert: bool = True) -> Path | None:
    """The diffusers checkpoint converted from single file `path` (cached by the file's hash and
    `config`: a diffusers directory or hub name with the model's configs; default: the one diffusers
    infers). None when not yet converted and `convert` is False."""
    check_single_file(path)
    out = cache_dir() / "checkpoints" / f"single-{_single_file_key(path, config)}"
    if (out / "model_index.json").is_file() or not convert:
        return out if (out / "model_index.json").is_file() else None
    require_extra("export", f"converting the single-file checkpoint {path}")
    from .export.single_file import convert_single_file

    (progress or logger.info)(f"converting {path} to a diffusers checkpoint once, into {out}")
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    convert_single_file(path, tmp, config, local_files_only=hub_offline())
    try:
        tmp.rename(out)
    except OSError:  # another process converted it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def imported_bundle(path: Path, progress: Callable[[str], None] | None = None, do_import: bool = True) -> Path | None:
    """The bundle imported from the Optimum-layout export at `path` (cached by its files' hash)."""
    from .export.optimum_layout import check_layout, layout_sha256

    check_layout(path)
    bundle = cache_dir() / "bundles" / f"onnx-{layout_sha256(path)[:16]}"
    if (bundle / MANIFEST_NAME).is_file() or not do_import:
        return _used(bundle) if (bundle / MANIFEST_NAME).is_file() else None
    import importlib.util

    if importlib.util.find_spec("onnx") is None:
        raise ImportError(f"importing the ONNX export {path} needs the onnx package: pip install onnx")
    from .export.optimum_layout import import_optimum

    (progress or logger.info)(f"importing {path} (Optimum's layout) once into {bundle}")
    try:
        import_optimum(path, bundle, progress=progress)
    except BundleError:
        if not (bundle / MANIFEST_NAME).is_file():  # not a concurrent import that won the race
            raise
    return bundle


def find_bundle(model: str | Path | None) -> Path:
    """The bundle `model` names, to be run (`Pipeline.load`), without exporting and without
    importing torch: `builtin` (or None), a bundle directory, or a checkpoint or preset already
    exported into the cache (generic fp32). Anything else is a `BundleError` that says how to make
    the bundle; no ONNX Runtime to run it, an ImportError naming the extra that brings it."""
    require_extra("cpu", "loading a model")
    model = str(model) if model is not None else DEFAULT_MODEL
    if model == BUILTIN:
        return builtin_bundle()
    model = _local(model, download=False)
    path = Path(model)
    if (path / MANIFEST_NAME).is_file():
        return path
    if is_optimum_export(path):  # importing needs no torch: done here as the runtime loads
        return imported_bundle(path)
    if is_single_file(path):
        converted = single_file_checkpoint(path, convert=False)
        cached = cached_bundle(converted) if converted is not None else None
        if cached is not None:
            return cached
        raise BundleError(model, "is a single-file checkpoint with no cached export: export it first "
                          f"(`ortdiffusion export {model} OUT`), or use ortdiffusion.models.load_pipeline")
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
    if is_hub_name(model):
        try:
            model = _local(model, download=False)
        except BundleError:
            return None
    path = Path(model)
    if model in PRESET_NAMES and not path.exists():
        path = cache_dir() / "checkpoints" / model
    if model == BUILTIN:
        path = builtin_checkpoint()
    if not (path / "model_index.json").is_file() or (target, precision) not in VARIANTS:
        return None
    from .export.checkpoint import weights_sha256  # the standard library only

    bundle = cache_dir() / "bundles" / (weights_sha256(path)[:16] + VARIANTS[target, precision])
    return _used(bundle) if (bundle / MANIFEST_NAME).is_file() else None


def needs_export(model: str | Path | None, target: str = "generic", precision: str = "fp32",
                 config: str | None = None) -> bool:
    """Whether resolving `model` would build or export something (and so need the export extra)."""
    model = str(model) if model is not None else DEFAULT_MODEL
    if model == BUILTIN and (target, precision) == ("generic", "fp32"):
        return False
    if is_hub_name(model):
        try:
            model = _local(model, download=False)
        except BundleError:
            return True  # to be downloaded, then exported
    path = Path(model)
    if (path / MANIFEST_NAME).is_file() or is_optimum_export(path):
        return False
    if is_single_file(path):
        converted = single_file_checkpoint(path, config, convert=False)
        return converted is None or cached_bundle(converted, target, precision) is None
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
                   target: str = "generic", precision: str = "fp32", allow_export: bool = True,
                   config: str | None = None) -> Path:
    """A bundle directory for `model`, exporting (and caching) a checkpoint when needed. A bundle
    or the built-in model is used as it is; a checkpoint or preset is exported once per variant
    (`target`, `precision`; see VARIANTS); a hub name is its snapshot (downloaded where allowed);
    a single file is converted first (`config`: the model's configs, see single_file_checkpoint);
    an Optimum-layout export is imported (one variant: as it was made).
    `allow_export=False`: a cached bundle or a BundleError."""
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
    model = _local(model, download=allow_export)
    path = Path(model)
    if (path / MANIFEST_NAME).is_file():
        return path
    if is_optimum_export(path):
        if (target, precision) != ("generic", "fp32"):
            raise BundleError(model, f"an imported ONNX export runs as it was made; it has no {target}/{precision} variant")
        return imported_bundle(path, progress)
    if is_single_file(path):
        converted = single_file_checkpoint(path, config, progress, convert=allow_export)
        if converted is None:
            raise BundleError(model, "single-file checkpoint not converted and exported yet; export it first")
        path = converted
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
        return _used(bundle)
    if not allow_export:
        raise BundleError(str(path), f"no cached {target}/{precision} bundle for it in {cache_dir() / 'bundles'}; "
                          "export it first")
    require_extra("export", f"exporting the checkpoint {path}")
    from .export.bundle import export_checkpoint

    (progress or logger.info)(f"exporting {path} ({target}, {precision}) once into {bundle}")
    try:
        export_checkpoint(path, bundle, _variant_options(model, target, precision, defaults, path), progress=progress)
    except ExportError:
        if not (bundle / MANIFEST_NAME).is_file():  # not a concurrent export that won the race
            raise
    return bundle


def _variant_options(model: str, target: str, precision: str, defaults: tuple[int, float] | None, checkpoint: Path):
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

    tiny = checkpoint / TINY_DECODER_DIR  # the resolved checkpoint (a single file's conversion, a hub snapshot)
    return ExportOptions(target=Target(target), precision=Precision(precision), calibration=calibration,
                         default_steps=steps, default_guidance=guidance,
                         tiny_decoder=tiny if (tiny / "config.json").is_file() else None)


def resolve_checkpoint(model: str | Path | None, config: str | None = None,
                       progress: Callable[[str], None] | None = None) -> Path:
    """The diffusers checkpoint behind `model` (for the torch side of benchmarks and comparisons,
    and for export): a hub name's snapshot, a single file's conversion, a bundle's source."""
    model = str(model) if model is not None else DEFAULT_MODEL
    if model == BUILTIN:
        return builtin_checkpoint()
    model = _local(model, download=True)
    path = Path(model)
    if is_single_file(path):
        return single_file_checkpoint(path, config, progress)
    if is_optimum_export(path):
        raise BundleError(model, "is an ONNX export (Optimum's layout), not a torch checkpoint: compare it against "
                          "the checkpoint it was made from (`ortdiffusion compare CHECKPOINT ONNX_DIR`)")
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
                  config: str | None = None, refiner: str | Path | None = None, **load_options):
    """`Pipeline.load` for any model `resolve_bundle` accepts; `refiner`: an SDXL refiner, the same."""
    from .runtime.pipeline import Pipeline

    if refiner is not None:
        load_options["refiner"] = resolve_bundle(refiner, progress, config=config)
    return Pipeline.load(resolve_bundle(model, progress, config=config), **load_options)
