"""Canny edges in numpy: the control image a Canny ControlNet reads, made from any picture.

As OpenCV's `cv2.Canny(image, 100, 200)` that diffusers' ControlNet examples use (3×3 Sobel, L1
gradient magnitude, non-maximum suppression along the gradient, double threshold with hysteresis),
without OpenCV: the runtime needs only numpy and Pillow. Not bit-identical to OpenCV's (its
direction binning and tie-breaking differ in a few pixels); the edges a ControlNet follows are the
same. White edges on black, RGB, as the examples feed them.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

#: OpenCV's thresholds in diffusers' ControlNet examples, on the L1 gradient of 8-bit grey.
LOW_THRESHOLD, HIGH_THRESHOLD = 100, 200


def _sobel(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.pad(grey, 1, mode="reflect")  # OpenCV's default border (BORDER_REFLECT_101)
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return gx, gy


def _thin(magnitude: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Non-maximum suppression: keep a pixel only where it is the largest along its gradient."""
    m = np.pad(magnitude, 1)
    h, w = magnitude.shape
    at = lambda dy, dx: m[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]  # noqa: E731
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    horizontal = (angle < 22.5) | (angle >= 157.5)  # gradient along x: compare left and right
    diagonal = (angle >= 22.5) & (angle < 67.5)
    vertical = (angle >= 67.5) & (angle < 112.5)
    anti = (angle >= 112.5) & (angle < 157.5)
    keep = (horizontal & (magnitude > at(0, -1)) & (magnitude >= at(0, 1))) \
        | (vertical & (magnitude > at(-1, 0)) & (magnitude >= at(1, 0))) \
        | (diagonal & (magnitude > at(-1, -1)) & (magnitude >= at(1, 1))) \
        | (anti & (magnitude > at(-1, 1)) & (magnitude >= at(1, -1)))
    return np.where(keep, magnitude, 0.0)


def _hysteresis(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """Weak edge pixels connected (8-neighbourhood) to a strong one, grown until nothing changes."""
    edges = strong.copy()
    while True:
        p = np.pad(edges, 1)
        h, w = edges.shape
        grown = np.zeros_like(edges)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                grown |= p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        grown &= weak
        grown |= edges
        if (grown == edges).all():
            return edges
        edges = grown


def canny_edges(image: Image.Image, low: int = LOW_THRESHOLD, high: int = HIGH_THRESHOLD) -> Image.Image:
    """`image`'s Canny edges as an RGB image: 255 on the edges, 0 elsewhere, the same size."""
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    gx, gy = _sobel(grey)
    magnitude = np.abs(gx) + np.abs(gy)  # OpenCV's default (L2gradient=False)
    thin = _thin(magnitude, gx, gy)
    edges = _hysteresis(thin > high, thin > low)
    return Image.fromarray(np.repeat((edges * 255).astype(np.uint8)[..., None], 3, axis=2), "RGB")


__all__ = ["HIGH_THRESHOLD", "LOW_THRESHOLD", "canny_edges"]
