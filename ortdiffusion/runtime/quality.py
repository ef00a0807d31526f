"""How close two images are: the one PSNR that compare, the tests, the bench and the tools use."""

from __future__ import annotations

import numpy as np


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio of two 8-bit images (arrays or PIL images), in dB; inf if equal."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


__all__ = ["psnr"]
