"""Previews of the image while it denoises: the loop's latents → a small RGB image, cheaply.

Decoding every few steps with the real image decoder would cost as much as the decoder stage each
time; a preview needs only the colours and layout. Where the previews come from, first found:

1. the bundle's tiny decoder (TAESD, `vae_decoder_tiny`) where it has one: a real decode at the
   image's size, for a fraction of the VAE decoder's work;
2. the manifest's `pipeline.latent_rgb`: a (channels + 1) × 3 linear map (the last row the bias),
   fitted by least squares against the bundle's own decoder (`fit_latent_rgb`; the built-in
   bundle has one, written by `tools/fit_latent_rgb.py`);
3. the well-known per-family map of Stable Diffusion's VAEs (`KNOWN_LATENT_RGB`, by the VAE's
   scaling factor — ComfyUI's `latent_formats`), for bundles of those VAEs;
4. otherwise fitted once against the bundle's decoder on the first preview and kept.

Every map takes the loop's latents as they are (scaled: what the UNet sees) to pixels in about
[-1, 1], the decoder's range. Only numpy and pillow are used here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .manifest import Manifest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatentRGB:
    """pixels = latents · matrix + bias, per latent pixel: (C, 3) and (3,)."""

    matrix: np.ndarray
    bias: np.ndarray

    @classmethod
    def from_rows(cls, rows) -> LatentRGB:
        """From the manifest's form: C rows of 3 (latent channel → R, G, B), then the bias row."""
        array = np.asarray(rows, dtype=np.float32)
        if array.ndim != 2 or array.shape[1] != 3 or array.shape[0] < 2:
            raise ValueError(f"latent_rgb: expected (channels + 1) rows of 3 numbers, got shape {array.shape}")
        return cls(array[:-1], array[-1])

    def rows(self) -> list[list[float]]:
        return [[round(float(v), 5) for v in row] for row in np.vstack([self.matrix, self.bias[None]])]

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        """(N, C, h, w) latents → (N, 3, h, w) pixels in about [-1, 1]."""
        return np.einsum("nchw,cd->ndhw", latents.astype(np.float32, copy=False), self.matrix) + self.bias[:, None, None]


#: Stable Diffusion's VAEs, by (latent channels, scaling factor): ComfyUI's latent_formats.SD15 and .SDXL.
KNOWN_LATENT_RGB: dict[tuple[int, float], LatentRGB] = {
    (4, 0.18215): LatentRGB.from_rows([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350],
                                       [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177], [0, 0, 0]]),
    (4, 0.13025): LatentRGB.from_rows([[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068],
                                       [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188],
                                       [0.1084, -0.0175, -0.0011]]),
}


def fit_latent_rgb(latents: np.ndarray, pixels: np.ndarray) -> LatentRGB:
    """The least-squares linear map from `latents` (N, C, h, w) to the decoder's `pixels`
    (N, 3, h·f, w·f), each averaged over the f × f pixels one latent pixel decodes to."""
    n, c, h, w = latents.shape
    f = pixels.shape[2] // h
    pooled = pixels[:, :, :h * f, :w * f].reshape(n, 3, h, f, w, f).mean(axis=(3, 5))
    x = latents.transpose(0, 2, 3, 1).reshape(-1, c).astype(np.float64)
    y = pooled.transpose(0, 2, 3, 1).reshape(-1, 3).astype(np.float64)
    solution, *_ = np.linalg.lstsq(np.hstack([x, np.ones((len(x), 1))]), y, rcond=None)
    return LatentRGB(solution[:-1].astype(np.float32), solution[-1].astype(np.float32))


def sample_latents(manifest: Manifest, images: int = 4, seed: int = 0) -> np.ndarray:
    """Latents for fitting where no generated ones are at hand: the prior the loop starts from,
    smoothed so that neighbouring latent pixels agree as in a real image's latents."""
    c = manifest.pipeline
    h, w = c.default_height // c.vae_scale_factor, c.default_width // c.vae_scale_factor
    noise = np.random.default_rng(seed).standard_normal((images, c.latent_channels, h, w)).astype(np.float32)
    kernel = np.ones(3, np.float32) / 3
    for axis in (2, 3):
        noise = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="same"), axis, noise)
    return noise / noise.std()


class Previewer:
    """Latents → preview images for one pipeline; thread-safe; a fitted map is fitted once."""

    def __init__(self, manifest: Manifest, decode: Callable[[np.ndarray], np.ndarray],
                 tiny_decode: Callable[[np.ndarray], np.ndarray] | None = None):
        """`decode`: the loop's (scaled) latents → pixels in [-1, 1] by the bundle's real decoder;
        `tiny_decode`: the same by its tiny decoder, where it has one (then previews use it)."""
        c = manifest.pipeline
        self.scale_factor = c.vae_scale_factor
        self.source = "manifest"
        self._map: LatentRGB | None = None
        self._tiny = tiny_decode
        if tiny_decode is not None:
            self.source = "tiny decoder"
        elif c.latent_rgb:
            self._map = LatentRGB.from_rows(c.latent_rgb)
        else:
            known = KNOWN_LATENT_RGB.get((c.latent_channels, round(c.vae_scaling_factor, 5)))
            self._map, self.source = (known, "known") if known is not None else (None, "fitted")
        self._manifest, self._decode = manifest, decode
        self._lock = threading.Lock()

    @property
    def latent_rgb(self) -> LatentRGB:
        with self._lock:
            if self._map is None:
                latents = sample_latents(self._manifest)
                self._map = fit_latent_rgb(latents, self._decode(latents))
                logger.info("latent_rgb: fitted against the decoder (no map in the manifest)")
            return self._map

    def pixels(self, latents: np.ndarray) -> np.ndarray:
        """(N, C, h, w) → (N, H, W, 3) uint8: at the image's size from a tiny decoder, else at the latents'."""
        rgb = self._tiny(latents) if self._tiny is not None else self.latent_rgb(latents)
        return (np.clip(rgb / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)

    def upscale(self, pixels: np.ndarray) -> list[Image.Image]:
        """`pixels`' images scaled up to the image's size, so a page shows a preview as the image will be."""
        images = []
        for array in pixels:
            small = Image.fromarray(array)
            if self._tiny is not None:  # already at the image's size
                images.append(small)
                continue
            images.append(small.resize((small.width * self.scale_factor, small.height * self.scale_factor),
                                       Image.Resampling.BILINEAR))
        return images

    def __call__(self, latents: np.ndarray) -> list[Image.Image]:
        """One preview image per row of `latents`, at the image's size."""
        return self.upscale(self.pixels(latents))


__all__ = ["KNOWN_LATENT_RGB", "LatentRGB", "Previewer", "fit_latent_rgb", "sample_latents"]
