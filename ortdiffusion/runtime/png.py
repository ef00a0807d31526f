"""PNG output with the generation parameters in text chunks (readable by any PNG tool)."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from PIL import Image, PngImagePlugin


def encode_png(image: Image.Image, metadata: Mapping[str, str]) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_itxt(key, str(value))  # iTXt: UTF-8, so prompts in any language survive
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(image: Image.Image, metadata: Mapping[str, str], path: Path | str) -> Path:
    """Write atomically: a temporary file renamed into place, so no half-written PNG is left."""
    path = Path(path)
    data = encode_png(image, metadata)
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
