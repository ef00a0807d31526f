"""PNG output with the generation parameters in text chunks (readable by any PNG tool).

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

from PIL import Image, PngImagePlugin


def encode_png(image: Image.Image, metadata: Mapping[str, str]) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_itxt(key, str(value))  # iTXt: UTF-8, so prompts in any language survive
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


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


def encode_pngs(images: Sequence[Image.Image], metadata: Sequence[Mapping[str, str]]) -> list[bytes]:
    """`encode_png` for each image, in order; several images are encoded in parallel."""
    if len(images) != len(metadata):
        raise ValueError(f"encode_pngs: {len(images)} images but {len(metadata)} metadata records")
    if len(images) <= 1:
        return [encode_png(image, meta) for image, meta in zip(images, metadata)]
    return list(_encoder_pool().map(encode_png, images, metadata))


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
    with Image.open(path) as image:
        return dict(getattr(image, "text", {}))
