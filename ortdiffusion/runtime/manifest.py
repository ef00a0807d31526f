"""The bundle manifest: the one contract between export and runtime (DESIGN.md, "The bundle").

Export builds a `Manifest` and writes it with `write_manifest`; the runtime reads it with
`load_bundle`, which also checks every file against its recorded size and hash. A bundle that does
not match its manifest is refused with a `BundleError` naming the file and what differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from .errors import BundleError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
#: SDXL's second text encoder and its tokenizer (the refiner has only these).
TEXT_ENCODER_2, TOKENIZER_2_NAME = "text_encoder_2", "tokenizer_2.json"

TEXT_ENCODER, UNET, VAE_DECODER = "text_encoder", "unet", "vae_decoder"
PIPELINE_COMPONENTS = (TEXT_ENCODER, UNET, VAE_DECODER)
#: The fp32 image decoder an export keeps beside an fp16 one: the NaN guard's retry (DESIGN.md, "Precision").
VAE_DECODER_FP32 = "vae_decoder_fp32"
#: The image encoder (the VAE's encoder half): optional; a bundle with it takes image inputs
#: (img2img, inpainting, variations), one without it text-to-image only.
VAE_ENCODER = "vae_encoder"
#: A tiny image decoder (diffusers' AutoencoderTiny, the TAESD architecture): optional; the same
#: input and output as `vae_decoder`, a fraction of its work, chosen per call (`decoder="tiny"`).
VAE_DECODER_TINY = "vae_decoder_tiny"
#: What a call names as its decoder → the component that decodes.
DECODERS = {"full": VAE_DECODER, "tiny": VAE_DECODER_TINY}

# Where a UNet input comes from (`PipelineConstants.unet_feeds`): the loop's latents, its timestep,
# an array the caller gives per image; the inpainting condition (the mask and the masked image's
# latents, channels a 9-channel inpainting UNet reads beside its latents); anything else is
# "<component>/<output>", a text encoder's output; the guidance scale's embedding (LCM UNets:
# `timestep_cond`, guidance distilled into the UNet, so no classifier-free guidance batch).
FEED_LATENTS, FEED_TIMESTEP, FEED_REQUEST, FEED_INPAINT = "latents", "timestep", "request", "inpaint"
FEED_GUIDANCE = "guidance_embedding"
#: SDXL's `time_ids`: the plan's, per row, from the request's sizes (and aesthetic scores).
FEED_TIME_IDS = "time_ids"
#: A LoRA side branch's weights (`<layer>.lora_down` / `.lora_up`, runtime/lora.py): the request's LoRA set.
FEED_LORA = "lora"
#: A ControlNet residual (`down_block_additional_residual_<i>`, `mid_block_additional_residual`):
#: the sum over the bundle's ControlNets' outputs of the same name, zeros when a call gives no control image.
FEED_CONTROLNET = "controlnet"
#: The sources that are not a text encoder's output.
SPECIAL_FEEDS = (FEED_LATENTS, FEED_TIMESTEP, FEED_REQUEST, FEED_INPAINT, FEED_GUIDANCE, FEED_TIME_IDS, FEED_LORA,
                 FEED_CONTROLNET)


class Task(str, Enum):
    """What a bundle can do, by its components (`Manifest.tasks`)."""

    TEXT_TO_IMAGE = "text-to-image"
    IMAGE_TO_IMAGE = "image-to-image"  # needs the image encoder
    INPAINTING = "inpainting"  # needs the image encoder; a 9-channel UNet or any UNet by blending
    VARIATIONS = "variations"  # image-to-image with the empty prompt (SD family)


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"  # the UNet only, for the CPU provider; the other components stay fp32


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output; a str in `shape` is a symbolic (dynamic) dimension."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class DimRange:
    """The sizes a symbolic dimension may take: min/opt/max (TensorRT's profile) and a step."""

    min: int
    opt: int
    max: int
    multiple_of: int = 1

    def allows(self, value: int) -> bool:
        return self.min <= value <= self.max and value % self.multiple_of == 0

    def describe(self) -> str:
        step = f", a multiple of {self.multiple_of}" if self.multiple_of > 1 else ""
        return f"{self.min} to {self.max}{step}"


def resolve_dim(dim: int | str, sizes: Mapping[str, int]) -> int:
    """A dimension's size: an int as it is; a symbolic name from `sizes`; a derived one, "height/8" or
    "height*8" (a ControlNet residual at 1/8 of the latents, a control image at 8× them)."""
    if isinstance(dim, int):
        return dim
    if dim in sizes:
        return sizes[dim]
    for op in ("/", "*"):
        name, sep, factor = dim.partition(op)
        if sep and name in sizes and factor.isdigit():
            return sizes[name] // int(factor) if op == "/" else sizes[name] * int(factor)
    raise KeyError(dim)


@dataclass(frozen=True)
class ParityRecord:
    """Torch against ONNX Runtime on one set of fresh random inputs, per output."""

    shape: dict[str, int]
    output: str
    max_abs_error: float
    rel_l2_error: float
    cosine_similarity: float


@dataclass(frozen=True)
class FileRecord:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class ComponentManifest:
    name: str
    #: The .onnx file first, then its external data file if it has one.
    files: tuple[FileRecord, ...]
    precision: Precision
    opset: int
    #: The providers this graph was exported/optimized for ("cpu", "cuda", "tensorrt").
    providers: tuple[str, ...]
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    dims: dict[str, DimRange]
    parity: tuple[ParityRecord, ...] = ()
    #: Nodes kept in fp32 in an fp16 graph (empty for fp32).
    fp32_nodes: tuple[str, ...] = ()

    @property
    def model_file(self) -> FileRecord:
        return self.files[0]


@dataclass(frozen=True)
class PipelineConstants:
    """What the runtime needs to know of the pipeline family beyond the three graphs."""

    family: str
    prediction_type: str
    latent_channels: int
    vae_scaling_factor: float
    vae_scale_factor: int  # image pixels per latent pixel
    tokenizer_max_length: int
    pad_token_id: int
    default_width: int
    default_height: int
    scheduler_class: str
    scheduler_config: dict[str, Any]
    default_scheduler: str
    vae_shift_factor: float | None = None
    #: What a call that names no step count or guidance scale gets (the model's own best setting).
    default_steps: int = 20
    default_guidance: float = 7.5
    #: Where each UNet input comes from, by input name (DESIGN.md: a family is data): "latents",
    #: "timestep", "request" (an array the caller gives, one row per image, e.g. class labels) or
    #: "<component>/<output>" (a text encoder's output). Empty in bundles made before it existed:
    #: `Manifest.unet_feeds` then gives SD 1/2's.
    unet_feeds: dict[str, str] = field(default_factory=dict)
    #: The linear latent → RGB map for live previews (runtime/preview.py): one row of R, G, B
    #: weights per latent channel, then the bias row; on the loop's (scaled) latents. Optional:
    #: without it the runtime uses the known map of SD's VAEs or fits one against the decoder.
    latent_rgb: list[list[float]] | None = None
    #: Text encoder component → the prompt argument that feeds it ("prompt" or "prompt_2", diffusers'
    #: names). Empty: {"text_encoder": "prompt"} (SD 1/2). SDXL: both; its refiner: text_encoder_2 ← prompt.
    text_encoders: dict[str, str] = field(default_factory=dict)
    #: Per text encoder, its tokenizer's pad id where it is not `pad_token_id` (SDXL's second pads with "!").
    pad_token_ids: dict[str, int] = field(default_factory=dict)
    #: diffusers' SDXL config: no negative prompt → zero negative embeddings (not the empty prompt's).
    force_zeros_for_empty_prompt: bool = False
    #: diffusers' SDXL refiner config: time_ids are (original size, crop, aesthetic score).
    requires_aesthetics_score: bool = False
    #: Image-to-image's strength when a call names none (diffusers: SD 0.8, SDXL 0.3); None: 0.8.
    default_strength: float | None = None


@dataclass(frozen=True)
class ControlNetInfo:
    """One ControlNet of a bundle (diffusers' ControlNetModel): its component, whose outputs are named
    as the UNet inputs they add to (feed "controlnet"), and the control image it reads."""

    component: str
    #: The diffusers ControlNetModel directory it was exported from (for `compare`).
    source: str
    #: Channels of its control image (3: an RGB edge, depth or pose map), at the output's size.
    conditioning_channels: int = 3


@dataclass(frozen=True)
class SourceInfo:
    checkpoint: str
    weights_sha256: str


@dataclass(frozen=True)
class Manifest:
    format_version: int
    created_by: dict[str, str]
    source: SourceInfo
    pipeline: PipelineConstants
    components: dict[str, ComponentManifest]
    tokenizer: FileRecord
    extra: dict[str, Any] = field(default_factory=dict)
    #: Text encoder → its tokenizer file, where it is not `tokenizer` (SDXL's text_encoder_2).
    tokenizers: dict[str, FileRecord] = field(default_factory=dict)
    #: The ControlNets, in the order a call's control images are given (empty: none; the UNet then
    #: has no residual inputs).
    controlnets: tuple[ControlNetInfo, ...] = ()

    def prompt_sources(self) -> dict[str, str]:
        """Text encoder component → the prompt argument it reads (`PipelineConstants.text_encoders`)."""
        return dict(self.pipeline.text_encoders) or {TEXT_ENCODER: "prompt"}

    def tokenizer_of(self, component: str) -> tuple[FileRecord, int]:
        """(tokenizer file, pad id) of a text encoder."""
        return (self.tokenizers.get(component, self.tokenizer),
                self.pipeline.pad_token_ids.get(component, self.pipeline.pad_token_id))

    @property
    def bundle_sha256(self) -> str:
        """One hash over every file of the bundle: the model hash that results and PNGs carry."""
        h = hashlib.sha256()
        for name in sorted(self.components):
            for f in self.components[name].files:
                h.update(f"{f.path}:{f.sha256}\n".encode())
        h.update(f"{self.tokenizer.path}:{self.tokenizer.sha256}\n".encode())
        for f in self.tokenizers.values():
            h.update(f"{f.path}:{f.sha256}\n".encode())
        return h.hexdigest()

    def unet_feeds(self) -> dict[str, str]:
        """UNet input name → where it comes from (see `PipelineConstants.unet_feeds`)."""
        if self.pipeline.unet_feeds:
            return dict(self.pipeline.unet_feeds)
        hidden = self.components[TEXT_ENCODER].outputs[0].name
        return {"sample": FEED_LATENTS, "timestep": FEED_TIMESTEP, "encoder_hidden_states": f"{TEXT_ENCODER}/{hidden}"}

    @property
    def embedded_guidance(self) -> bool:
        """The UNet takes the guidance scale as an input (LCM): one UNet row per image, no negative prompt."""
        return FEED_GUIDANCE in self.unet_feeds().values()

    def decoders(self) -> tuple[str, ...]:
        """The decoders a call may name (`DECODERS`): "full", and "tiny" where the bundle has one."""
        return tuple(name for name, component in DECODERS.items() if component in self.components)

    def tasks(self) -> tuple[Task, ...]:
        """Text-to-image always; image inputs where the bundle has the image encoder. A bundle whose
        UNet needs the inpainting condition does inpainting only (as diffusers' inpainting checkpoints)."""
        if FEED_INPAINT in self.unet_feeds().values():
            return (Task.INPAINTING,) if VAE_ENCODER in self.components else ()
        if VAE_ENCODER not in self.components:
            return (Task.TEXT_TO_IMAGE,)
        return tuple(Task)

    def to_json(self) -> str:
        return json.dumps(_to_plain(self), indent=2, sort_keys=False, allow_nan=False)


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_record(bundle_dir: Path, path: Path) -> FileRecord:
    return FileRecord(path=path.relative_to(bundle_dir).as_posix(), sha256=sha256_file(path), size=path.stat().st_size)


def write_manifest(bundle_dir: Path, manifest: Manifest) -> None:
    (bundle_dir / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")


def read_json_object(path: Path, missing: str = "missing") -> dict[str, Any]:
    """A JSON object from `path`; a `BundleError` naming the file when it is missing or not one."""
    if not path.is_file():
        raise BundleError(str(path), missing)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(str(path), f"unreadable JSON ({e})") from None
    if not isinstance(data, dict):
        raise BundleError(str(path), "expected a JSON object")
    return data


def load_manifest(bundle_dir: Path | str) -> Manifest:
    """Read and parse a bundle's manifest, without checking its files (see `verify_files`)."""
    path = Path(bundle_dir) / MANIFEST_NAME
    data = read_json_object(path, "missing: not a bundle directory (no manifest.json)")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            str(path), f"format_version {version!r} is not supported; this ortdiffusion reads format {FORMAT_VERSION}"
        )
    try:
        manifest = _from_plain(Manifest, data)
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(str(path), f"malformed manifest: {e}") from None
    required = [c for c in PIPELINE_COMPONENTS if c != TEXT_ENCODER] + list(manifest.prompt_sources())
    missing = [c for c in required if c not in manifest.components]
    if missing:
        raise BundleError(str(path), f"no entry for component(s) {', '.join(missing)}")
    _check_unet_feeds(str(path), manifest)
    return manifest


def _check_unet_feeds(path: str, manifest: Manifest) -> None:
    """Every UNet input has exactly one source, and every source exists: the loop reads no other."""
    feeds = manifest.unet_feeds()
    inputs = [i.name for i in manifest.components[UNET].inputs]
    if sorted(feeds) != sorted(inputs):
        raise BundleError(path, f"pipeline.unet_feeds names {sorted(feeds)}; the UNet's inputs are {sorted(inputs)}")
    for role in (FEED_LATENTS, FEED_TIMESTEP):
        if list(feeds.values()).count(role) != 1:
            raise BundleError(path, f"pipeline.unet_feeds: exactly one UNet input must be fed {role!r}")
    for name, source in feeds.items():
        if source in SPECIAL_FEEDS:
            continue
        component, _, output = source.partition("/")
        outputs = [o.name for o in manifest.components[component].outputs] if component in manifest.components else []
        if component == UNET or output not in outputs:
            raise BundleError(path, f"pipeline.unet_feeds[{name!r}] = {source!r}: no such text encoder output "
                                    f"(sources: {', '.join(SPECIAL_FEEDS)}, or <component>/<output>)")


def verify_files(bundle_dir: Path | str, manifest: Manifest, remember: bool = True) -> None:
    """Every file the manifest names exists with the recorded size and sha256; else `BundleError`.

    A file hashed before on this machine whose inode, size, mtime and ctime are unchanged is not
    hashed again (`VerifiedFiles`; `remember=False` hashes everything): an SD-1.5 bundle is 3.4 GB of
    sha256 at every load otherwise, and any write to a file, or a copy in its place, changes its ctime."""
    bundle_dir = Path(bundle_dir)
    records = [f for c in manifest.components.values() for f in c.files] + [manifest.tokenizer,
                                                                            *manifest.tokenizers.values()]
    verified = VerifiedFiles.load() if remember else None
    for record in records:
        path = bundle_dir / record.path
        if not path.is_file():
            raise BundleError(str(path), "missing (listed in manifest.json)")
        stat = path.stat()
        if stat.st_size != record.size:
            raise BundleError(str(path), f"corrupt: {stat.st_size} bytes, manifest.json records {record.size}")
        if verified is not None and verified.known(path, stat, record.sha256):
            continue
        digest = sha256_file(path)
        if digest != record.sha256:
            raise BundleError(str(path), f"corrupt: sha256 {digest[:12]}…, manifest.json records {record.sha256[:12]}…")
        if verified is not None:
            verified.add(path, stat, digest)
    if verified is not None:
        verified.save()


class VerifiedFiles:
    """sha256 digests of files this machine has hashed, keyed by absolute path and checked against the
    file's (device, inode, size, mtime, ctime): `$ORTDIFFUSION_CACHE/verified-files.json`, the
    newest `LIMIT` entries. A cache that cannot be read or written costs only the hashing."""

    LIMIT = 1024

    def __init__(self, path: Path, entries: dict[str, dict[str, Any]]):
        self.path, self.entries, self.changed = path, entries, False

    @classmethod
    def load(cls) -> VerifiedFiles:
        from .cache import cache_dir

        path = cache_dir() / "verified-files.json"
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(entries, dict):
                entries = {}
        except (OSError, ValueError):
            entries = {}
        return cls(path, entries)

    @staticmethod
    def _stat(stat) -> list[int]:
        return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]

    def known(self, path: Path, stat, sha256: str) -> bool:
        entry = self.entries.get(str(path.resolve()))
        return isinstance(entry, dict) and entry.get("stat") == self._stat(stat) and entry.get("sha256") == sha256

    def add(self, path: Path, stat, sha256: str) -> None:
        key = str(path.resolve())
        self.entries.pop(key, None)  # newest last
        self.entries[key] = {"stat": self._stat(stat), "sha256": sha256}
        self.changed = True

    def save(self) -> None:
        if not self.changed:
            return
        entries = dict(list(self.entries.items())[-self.LIMIT:])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            scratch = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            scratch.write_text(json.dumps(entries), encoding="utf-8")
            os.replace(scratch, self.path)
        except OSError:
            pass


# -- (de)serialisation: dataclasses ↔ plain JSON -----------------------------------------------


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf/nan; scheduler configs may hold -inf
    return value


def _from_plain(cls: type, data: Mapping[str, Any]) -> Any:
    if not isinstance(data, Mapping):
        raise TypeError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
                raise KeyError(f"{cls.__name__}.{f.name}")
            continue
        kwargs[f.name] = _convert(cls, f.name, data[f.name])
    return cls(**kwargs)


def _convert(cls: type, name: str, value: Any) -> Any:
    nested = {
        (Manifest, "source"): SourceInfo,
        (Manifest, "pipeline"): PipelineConstants,
        (Manifest, "tokenizer"): FileRecord,
    }
    if (cls, name) in nested:
        return _from_plain(nested[(cls, name)], value)
    if (cls, name) == (Manifest, "controlnets"):
        return tuple(_from_plain(ControlNetInfo, v) for v in value)
    if (cls, name) == (Manifest, "tokenizers"):
        return {k: _from_plain(FileRecord, v) for k, v in value.items()}
    if (cls, name) == (Manifest, "components"):
        return {k: _from_plain(ComponentManifest, v) for k, v in value.items()}
    if cls is ComponentManifest:
        if name == "files":
            return tuple(_from_plain(FileRecord, v) for v in value)
        if name in ("inputs", "outputs"):
            return tuple(TensorInfo(v["name"], v["dtype"], tuple(v["shape"])) for v in value)
        if name == "dims":
            return {k: _from_plain(DimRange, v) for k, v in value.items()}
        if name == "parity":
            return tuple(_from_plain(ParityRecord, v) for v in value)
        if name == "precision":
            return Precision(value)
        if name in ("providers", "fp32_nodes"):
            return tuple(value)
    if (cls, name) == (PipelineConstants, "scheduler_config"):
        return {k: (float(v) if v in ("-inf", "inf") else v) for k, v in value.items()}
    return value
