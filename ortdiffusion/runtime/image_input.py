"""Images given as inputs (img2img's `image`, inpainting's `mask_image`): read, checked and turned
into arrays the way diffusers' `VaeImageProcessor` does, so the same image gives the same latents.

    file / bytes / PIL image ─► open_image (one frame, bounded pixels, EXIF rotation applied)
                             ─► image_array: RGB, resized (Lanczos), (1, 3, H, W) in [-1, 1]
                             ─► mask_array: grey, resized (Lanczos), binarized, (1, 1, H, W) in {0, 1}

Every refusal names the field and says what is accepted (`InvalidRequestError`). Uploads are read
from memory; nothing is written to disk.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidRequestError

#: Pixels an input image may declare before it is decoded: a decompression bomb (a small file that
#: declares 50,000 × 50,000 pixels) is refused from its header. 4096² is four times the largest
#: side any bundle here takes.
MAX_INPUT_PIXELS = 4096 * 4096

ImageSource = Union[Image.Image, str, Path, bytes, bytearray, np.ndarray]


def open_image(source: ImageSource, field: str) -> Image.Image:
    """One decoded still image from a path, bytes, a PIL image or an (H, W[, C]) uint8 array."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3) or (source.ndim == 3 and source.shape[2] not in (1, 3, 4)):
            raise InvalidRequestError(field, f"an array image must be uint8 (H, W), (H, W, 3) or (H, W, 4), "
                                             f"got {source.dtype} {source.shape}")
        image = Image.fromarray(source[..., 0] if source.ndim == 3 and source.shape[2] == 1 else source)
    elif isinstance(source, (bytes, bytearray)):
        image = _decode(io.BytesIO(bytes(source)), field)
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise InvalidRequestError(field, f"{path}: no such file")
        image = _decode(path, field)
    else:
        raise InvalidRequestError(field, f"must be an image (a path, PNG/JPEG/WebP bytes, a PIL image or a uint8 "
                                         f"array), got {type(source).__name__}")
    _check_pixels(image, field)
    if getattr(image, "n_frames", 1) > 1:
        raise InvalidRequestError(field, f"has {image.n_frames} frames (an animation); give a single still image")
    return ImageOps.exif_transpose(image)  # a phone's JPEG is stored sideways with an EXIF rotation


def _decode(fp, field: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(fp)
            _check_pixels(image, field)  # from the header, before any pixel is decoded
            image.load()
    except InvalidRequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # Pillow's own, from the header
        raise InvalidRequestError(field, f"declares too many pixels; at most {MAX_INPUT_PIXELS:,} pixels are "
                                         f"accepted ({e})") from None
    except UnidentifiedImageError as e:
        raise InvalidRequestError(field, f"is not an image that can be read (PNG, JPEG or WebP): {e}") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise InvalidRequestError(field, f"could not be decoded (truncated or corrupt?): {e}") from None
    return image


def _check_pixels(image: Image.Image, field: str) -> None:
    w, h = image.size
    if w < 1 or h < 1 or w * h > MAX_INPUT_PIXELS:
        raise InvalidRequestError(field, f"declares {w}×{h} pixels; at most {MAX_INPUT_PIXELS:,} pixels are accepted")


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer greys to 8 bits by their high byte (Pillow's `convert` would clip)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image).astype(np.int64)
        top = 65535 if image.mode.startswith("I;16") or array.max() > 255 else 255
        return Image.fromarray((np.clip(array, 0, top) * 255 // top).astype(np.uint8), "L")
    if image.mode == "F":
        return Image.fromarray((np.clip(np.asarray(image), 0, 1) * 255).round().astype(np.uint8), "L")
    return image


def _resized(image: Image.Image, width: int, height: int) -> Image.Image:
    # diffusers' VaeImageProcessor.resize for PIL images: Lanczos
    return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.LANCZOS)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as Pillow users expect: palette, grey, CMYK, 16-bit converted; transparency dropped."""
    image = _eight_bit(image)
    if image.mode == "P":
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


def image_array(image: Image.Image, width: int, height: int) -> np.ndarray:
    """(1, 3, height, width) float32 in [-1, 1]: diffusers' `VaeImageProcessor.preprocess`."""
    pixels = np.asarray(_resized(to_rgb(image), width, height), dtype=np.float32) / 255.0
    return (pixels * 2.0 - 1.0).transpose(2, 0, 1)[None].copy()


def mask_array(mask: Image.Image, width: int, height: int) -> np.ndarray:
    """(1, 1, height, width) float32 of 0 (keep) and 1 (repaint): white repaints, as in diffusers
    (its mask processor: grey, Lanczos, binarized at one half)."""
    grey = _eight_bit(mask)
    grey = grey.convert("RGBA").convert("L") if grey.mode == "P" else grey.convert("L")
    values = np.asarray(_resized(grey, width, height), dtype=np.float32) / 255.0
    return (values >= 0.5).astype(np.float32)[None, None]


def mask_from_alpha(image: Image.Image, field: str) -> Image.Image:
    """OpenAI's convention → diffusers': the fully transparent pixels of `image` mark the region to
    edit; returned as a white-on-black grey mask."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if "A" not in image.getbands():
        raise InvalidRequestError(field, f"has no alpha channel (mode {image.mode}); the area to edit is marked by "
                                         "fully transparent pixels, as in OpenAI's images API: give a PNG with alpha")
    alpha = np.asarray(image.getchannel("A"))
    return Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), "L")


def default_size(image: Image.Image, multiple: int) -> tuple[int, int]:
    """The image's own size rounded down to what the model takes, as diffusers does when no
    width or height is given."""
    w, h = image.size
    return w - w % multiple, h - h % multiple


__all__ = ["MAX_INPUT_PIXELS", "default_size", "image_array", "mask_array", "mask_from_alpha", "open_image", "to_rgb"]
