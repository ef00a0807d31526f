"""Image output: PNG (the default) with the generation parameters in text chunks (readable by any
PNG tool), or JPEG / WebP with them as JSON in the EXIF ImageDescription tag — the formats OpenAI's
images API offers as `output_format`, with its `output_compression` (0–100, the JPEG/WebP quality;
for PNG, 100 is the fastest zlib level and 0 the smallest file).

PNG encoding is the largest host-side stage of a GPU generation (53 ms per 512×512 image on the
H100's host, more than the text encoder and the decoder together). Pillow's encoder releases the
GIL while zlib compresses, so a batch's images are encoded on threads side by side
(`encode_pngs`); the service calls it off its event loop.
"""

from __future__ import annotations

import io
import os
import tempfile
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import json
from enum import Enum

from PIL import Image, PngImagePlugin

from .errors import InvalidRequestError

#: EXIF's ImageDescription tag: where JPEG and WebP carry the parameters (as JSON).
EXIF_DESCRIPTION = 0x010E


class ImageFormat(str, Enum):
    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"

    @property
    def media_type(self) -> str:
        return f"image/{self.value}"

    @property
    def suffix(self) -> str:
        return ".jpg" if self is ImageFormat.JPEG else f".{self.value}"

    @classmethod
    def parse(cls, value: str | ImageFormat, field: str = "output_format") -> ImageFormat:
        if isinstance(value, ImageFormat):
            return value
        name = str(value).strip().lower()
        try:
            return cls("jpeg" if name == "jpg" else name)
        except ValueError:
            raise InvalidRequestError(field, f"unknown image format {value!r}; allowed: png, jpeg, webp") from None

    @classmethod
    def from_suffix(cls, path: Path | str, field: str = "output") -> ImageFormat:
        """The format a file name's suffix names (`.png`, `.jpg`/`.jpeg`, `.webp`); no suffix: PNG."""
        suffix = Path(path).suffix.lower().lstrip(".")
        if not suffix:
            return cls.PNG
        try:
            return cls.parse(suffix, field)
        except InvalidRequestError:
            raise InvalidRequestError(field, f"{str(path)!r}: the suffix .{suffix} names no format this writes; "
                                             f"use .png, .jpg/.jpeg or .webp") from None


def check_compression(value: int | None, field: str = "output_compression") -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        raise InvalidRequestError(field, f"must be an integer from 0 to 100, got {value!r}")
    return value


def encode_image(image: Image.Image, metadata: Mapping[str, str], fmt: ImageFormat = ImageFormat.PNG,
                 compression: int | None = None) -> bytes:
    """`image` in `fmt` with `metadata`; `compression` 0–100 as OpenAI's `output_compression`."""
    buffer = io.BytesIO()
    if fmt is ImageFormat.PNG:
        info = PngImagePlugin.PngInfo()
        for key, value in metadata.items():
            info.add_itxt(key, str(value))  # iTXt: UTF-8, so prompts in any language survive
        level = {} if compression is None else {"compress_level": round((100 - compression) * 9 / 100)}
        image.save(buffer, format="PNG", pnginfo=info, **level)
    else:
        exif = Image.Exif()
        if metadata:
            exif[EXIF_DESCRIPTION] = json.dumps({k: str(v) for k, v in metadata.items()})  # ASCII: \u escapes
        quality = 100 if compression is None else compression
        image.save(buffer, format=fmt.value.upper(), quality=quality, exif=exif)
    return buffer.getvalue()


def encode_png(image: Image.Image, metadata: Mapping[str, str]) -> bytes:
    return encode_image(image, metadata)


_pool: tuple[int, ThreadPoolExecutor] | None = None
_pool_lock = threading.Lock()


def _encoder_pool() -> ThreadPoolExecutor:
    """One process-wide pool for PNG encoding, as many threads as cores (at most 8): shared by
    every caller, so concurrent requests queue for cores instead of each starting its own threads.
    A forked child (a server's worker process) makes its own: threads do not survive a fork."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            workers = min(8, os.cpu_count() or 1)
            _pool = (os.getpid(), ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ortdiffusion-png"))
        return _pool[1]


def encode_images(images: Sequence[Image.Image], metadata: Sequence[Mapping[str, str]],
                  fmt: ImageFormat = ImageFormat.PNG, compression: int | None = None) -> list[bytes]:
    """`encode_image` for each image, in order; several images are encoded in parallel."""
    if len(images) != len(metadata):
        raise ValueError(f"encode_images: {len(images)} images but {len(metadata)} metadata records")
    encode = lambda image, meta: encode_image(image, meta, fmt, compression)  # noqa: E731
    if len(images) <= 1:
        return [encode(image, meta) for image, meta in zip(images, metadata)]
    return list(_encoder_pool().map(encode, images, metadata))


def encode_pngs(images: Sequence[Image.Image], metadata: Sequence[Mapping[str, str]]) -> list[bytes]:
    return encode_images(images, metadata)


def write_atomically(data: bytes, path: Path | str) -> Path:
    """Write atomically: a temporary file renamed into place, so no half-written PNG is left."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a saved picture gets the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_png_metadata(path: Path | str) -> dict[str, str]:
    """The parameters an image of any of the three formats carries."""
    with Image.open(path) as image:
        if image.format == "PNG":
            return dict(getattr(image, "text", {}))
        description = image.getexif().get(EXIF_DESCRIPTION)
        return json.loads(description) if description else {}
