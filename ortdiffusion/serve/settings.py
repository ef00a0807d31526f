"""The service's settings, declared once: `ServeConfig` (one machine) and `RayOptions` (Ray Serve
around it). The command line's flags, Ray's `serve run … key=value` arguments and their checks are
all derived from these fields, so a setting has one name, one default and one help text.

Needs no web framework: the command line builds its parser from here without the `serve` extra.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..runtime.errors import InvalidRequestError
from ..runtime.request import parse_size

API_KEY_ENV = "ORTDIFFUSION_API_KEY"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


class ImageMetadata(str, Enum):
    """What the service's images carry in their text chunks / EXIF (the CLI's PNGs carry `full`).
    Image URLs need no API key (their token is the credential), so whoever holds one reads this."""

    FULL = "full"  # prompt, negative prompt, seed, steps, scheduler, guidance, size, model hash
    NO_PROMPT = "no-prompt"  # all of that but the prompts
    NONE = "none"

    def select(self, metadata: dict[str, str]) -> dict[str, str]:
        if self is ImageMetadata.NONE:
            return {}
        if self is ImageMetadata.NO_PROMPT:
            return {k: v for k, v in metadata.items() if k not in ("prompt", "negative_prompt")}
        return dict(metadata)


def setting(default: Any, help: str, flag: str | None = None, cli: bool = True) -> Any:
    """A field with its command-line help; `flag` overrides the name derived from the field's."""
    meta = {"help": help, "flag": flag, "cli": cli}
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ServeConfig:
    """One copy of the service. Defaults are sized for the built-in model on 2 cores / 24 GiB
    (docs/serving.md gives the measured peak memory of the worst request they admit)."""

    model_name: str | None = setting(None, "the id clients pass as `model` (default: the model's folder name)")
    lora_dir: str | None = setting(None, "a folder of LoRA files (*.safetensors, diffusers/PEFT or kohya) registered "
                                   "at start by file name; requests choose them with `lora` (the bundle needs "
                                   "export --lora-inputs)")
    api_key: str | None = setting(None, "", cli=False)  # --api-key-file / $ORTDIFFUSION_API_KEY / --api-key
    # -- admission: what one request may cost ------------------------------------------------
    max_images: int = setting(4, "images one request may ask for (`n`)")
    max_work: int = setting(256 * 256 * 20, "images × pixels × steps one request may cost (default: one 256x256 "
                            "image at 20 steps, or sixteen 64x64 at 20)")
    max_batch_images: int = setting(8, "images per batch at most; a larger request runs in chunks", flag="--max-batch")
    max_batch_pixels: int = setting(256 * 256, "pixels per batch at most (images × width × height): bounds "
                                    "the memory and the length of one denoising step")
    max_queue: int = setting(16, "waiting requests before 429")
    batch_window_s: float = setting(0.02, "how long to gather compatible requests into one batch")
    batching: bool = setting(True, "gather compatible requests into one batch")
    request_timeout_s: float = setting(300.0, "per-request deadline in seconds", flag="--timeout")
    # -- the connection: what a client may hold ----------------------------------------------
    max_body_bytes: int = setting(64 * 1024, "request body size at most (413 past it)")
    max_json_depth: int = setting(32, "JSON nesting at most")
    max_upload_bytes: int = setting(4 * 1024 * 1024, "bytes of one uploaded image at most (edits, variations; "
                                    "OpenAI's limit is 4 MB)")
    header_timeout_s: float = setting(10.0, "seconds a client has to send a request's headers")
    body_timeout_s: float = setting(30.0, "seconds a client has to send a request's body once its headers came")
    keep_alive_s: float = setting(5.0, "seconds an idle keep-alive connection is kept")
    max_connections: int = setting(1000, "open connections at most (capped below the file-handle limit); past it "
                                   "the longest-idle connection without a request is closed")
    # -- images ------------------------------------------------------------------------------
    image_ttl_s: float = setting(3600.0, "how long an image URL (response_format=url) answers")
    image_store_bytes: int = setting(256 * 1024 * 1024, "bytes of images kept for URLs at most; past it the "
                                     "oldest go first (kept in memory only: a restart forgets them)")
    image_metadata: ImageMetadata = setting(ImageMetadata.FULL, "what the images carry: full (prompt, seed, "
                                            "steps, model hash …, as the CLI's), no-prompt, none")
    warmup_sizes: tuple[tuple[int, int], ...] = setting((), "WxH run once before /health/ready answers 200 "
                                                        "(repeatable; default: the model's own size)",
                                                        flag="--warmup-size")
    # -- addresses ---------------------------------------------------------------------------
    public_url: str | None = setting(None, "base of image URLs, e.g. https://images.example.com (default: the "
                                     "address the request came to, if its host is allowed)")
    allowed_hosts: tuple[str, ...] = setting((), "Host header values answered (repeatable); default: the public "
                                             "URL's host, the bound address, and loopback names when bound to "
                                             "loopback; others get 421", flag="--allowed-host")

    def hosts(self) -> frozenset[str]:
        """The host names (no port) a request's Host header may carry."""
        hosts = set(self.allowed_hosts) or set(LOOPBACK_HOSTS)
        if self.public_url:
            hosts.add(urlsplit(self.public_url).hostname or "")
        return frozenset(h.lower().strip("[]") for h in hosts if h)

    def validate(self) -> ServeConfig:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "float") and (value < 0 or value == 0 and f.name != "batch_window_s"):
                raise InvalidRequestError(f.name, f"must be greater than 0, got {value}")
        if self.public_url and urlsplit(self.public_url).scheme not in ("http", "https"):
            raise InvalidRequestError("public_url", f"must be an http:// or https:// URL, got {self.public_url!r}")
        return self


@dataclass(frozen=True)
class RayOptions:
    """How the application is deployed on Ray Serve; `serve` is each replica's own `ServeConfig`.
    `serve run ortdiffusion.serve.ray_app:build_app replicas=2 max_queue=8` takes both kinds by name."""

    model: str | None = setting(None, "bundle, checkpoint or preset; a path must exist on every node", cli=False)
    replicas: int = setting(1, "fixed number of replicas")
    min_replicas: int = setting(1, "autoscaling lower bound (with --max-replicas)")
    max_replicas: int | None = setting(None, "turn on autoscaling up to this many replicas")
    target_ongoing_requests: float = setting(2.0, "autoscaling: requests per replica it aims at")
    cpus_per_replica: float = setting(1.0, "CPUs Ray reserves per replica")
    gpus_per_replica: float = setting(0.0, "GPUs Ray reserves per replica")
    max_ongoing_requests: int = setting(8, "requests Ray hands one replica at once")
    provider: str | None = setting(None, "", cli=False)  # the shared --provider flag
    allow_fallback: bool = setting(False, "", cli=False)
    threads: int = setting(0, "ONNX Runtime intra-op threads per replica; 0: cpus_per_replica (at least 1)")
    serve: ServeConfig = field(default_factory=ServeConfig)

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> RayOptions:
        """From `serve run` key=value strings (or real values), each checked by name."""
        mine = {f.name: f for f in fields(cls) if f.name != "serve"}
        theirs = {f.name: f for f in fields(ServeConfig)}
        values: dict[str, Any] = {}
        serve_values: dict[str, Any] = {}
        for key, raw in args.items():
            key = key.replace("-", "_")
            if key in mine:
                values[key] = convert(key, raw, mine[key].type)
            elif key in theirs:
                serve_values[key] = convert(key, raw, theirs[key].type)
            else:
                raise InvalidRequestError(key, f"is not an option; allowed: {', '.join(sorted({*mine, *theirs}))}")
        options = cls(**values, serve=ServeConfig(**serve_values))
        options.validate()
        return options

    def validate(self) -> None:
        if self.max_replicas is None and self.replicas < 1:
            raise InvalidRequestError("replicas", f"must be at least 1, got {self.replicas}")
        if self.max_replicas is not None and not 0 <= self.min_replicas <= self.max_replicas:
            raise InvalidRequestError("max_replicas", f"must be ≥ min_replicas ({self.min_replicas}) and min_replicas ≥ 0")
        if self.cpus_per_replica < 0 or self.gpus_per_replica < 0:
            raise InvalidRequestError("cpus_per_replica", "CPUs and GPUs per replica must be ≥ 0")
        if self.max_ongoing_requests < 1:
            raise InvalidRequestError("max_ongoing_requests", "must be at least 1")
        self.serve.validate()


def convert(key: str, raw: Any, annotation: str) -> Any:
    """A `key=value` string as the field's type; anything else as given."""
    if not isinstance(raw, str):
        return raw
    kind = annotation.split("|")[0].strip()
    if raw.lower() in ("none", "null", "") and "None" in annotation:
        return None
    try:
        if kind == "bool":
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "ImageMetadata":
            return ImageMetadata(raw)
        if kind.startswith("tuple"):
            return tuple(parse_warmup(s) if key == "warmup_sizes" else s for s in raw.split(",") if s)
    except ValueError:
        raise InvalidRequestError(key, f"must be {kind}, got {raw!r}") from None
    return raw


def parse_warmup(text: str) -> tuple[int, int]:
    width, height = parse_size(text, "warmup-size")
    return width, height  # type: ignore[return-value]


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type) -> None:
    """One flag per field of `cls` (a bool that defaults on gets `--no-…`); every default is None
    so that `from_namespace` keeps the dataclass's own."""
    for f in fields(cls):
        if not f.metadata.get("cli", False):
            continue
        flag, kind, help_ = _flag(f), f.type.split("|")[0].strip(), f.metadata["help"]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = help_ if "default" in help_ else f"{help_} (default: {default.value if isinstance(default, Enum) else default})"
        if kind == "bool":
            name = f"--no-{f.name.replace('_', '-')}" if default else flag
            parser.add_argument(name, dest=f.name, action="store_const", const=not default, default=None,
                                help=f"do not {help_}" if default else help_)
        elif kind.startswith("tuple"):
            parser.add_argument(flag, dest=f.name, action="append", default=None, help=help_,
                                type=parse_warmup if f.name == "warmup_sizes" else str)
        elif kind == "ImageMetadata":
            parser.add_argument(flag, dest=f.name, choices=[m.value for m in ImageMetadata], default=None, help=shown)
        else:
            parser.add_argument(flag, dest=f.name, type={"int": int, "float": float}.get(kind, str), default=None,
                                help=shown)


def from_namespace(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """The dataclass from parsed flags: a flag not given keeps the field's default."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    if "image_metadata" in values:
        values["image_metadata"] = ImageMetadata(values["image_metadata"])
    return cls(**{**values, **extra})


def add_key_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-key-file", type=Path, default=None,
                        help=f"require Authorization: Bearer KEY, KEY read from this file (or set ${API_KEY_ENV}; "
                             "both stay out of `ps`)")
    parser.add_argument("--api-key", default=None, help=f"the key itself: visible to every user in `ps`; prefer "
                                                          f"--api-key-file or ${API_KEY_ENV}")


def api_key_from(args: argparse.Namespace) -> str | None:
    """--api-key-file, then $ORTDIFFUSION_API_KEY, then --api-key; None: no key required."""
    if args.api_key_file is not None:
        try:
            key = args.api_key_file.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise InvalidRequestError("api-key-file", f"cannot read {args.api_key_file}: {e.strerror}") from None
        if not key:
            raise InvalidRequestError("api-key-file", f"{args.api_key_file} is empty")
        return key
    return os.environ.get(API_KEY_ENV) or args.api_key or None
