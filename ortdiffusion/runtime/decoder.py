"""The image decoder stage: latents → pixels in [-1, 1], with DESIGN.md's precision rule.

Non-finite pixels (an fp16 decoder that overflowed: the well-known black image) are decoded again
by the bundle's fp32 decoder where the export kept one (`vae_decoder_fp32`), and otherwise raise
`NumericalError`: a black image is never returned silently.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import numpy as np

from .errors import NumericalError
from .session import Session
from .trace import Transfers

logger = logging.getLogger(__name__)


class ImageDecoder:
    def __init__(self, session: Session, load_fp32: Callable[[], Session] | None = None):
        """`load_fp32`: loads the fp32 decoder, the first time one is needed (None: the bundle has none)."""
        self.session = session
        self.input_name = session.component.inputs[0].name
        self.output_name = session.output_names[0]
        self._load_fp32 = load_fp32
        self._fp32: Session | None = None
        self._lock = threading.Lock()
        self.retries = 0  # decodes the fp32 decoder redid

    def __call__(self, latents: np.ndarray, transfers: Transfers) -> np.ndarray:
        """Decode host `latents` (the decoder's input: already unscaled) on the host."""
        transfers.sent(latents)
        pixels = self.session.run({self.input_name: latents}, release_memory=True)[self.output_name]
        transfers.received(pixels)
        return self.checked(pixels.astype(np.float32, copy=False), lambda: latents)

    def checked(self, pixels: np.ndarray, decoder_input: Callable[[], np.ndarray]) -> np.ndarray:
        """`pixels` if finite; else the fp32 decoder's pixels for `decoder_input()` where the bundle
        has one and they are finite; else `NumericalError`."""
        if np.isfinite(pixels).all():
            return pixels
        bad = int((~np.isfinite(pixels)).sum())
        if self._load_fp32 is not None:
            logger.warning("vae_decoder: %d non-finite pixel values; decoding again in fp32", bad)
            with self._lock:
                if self._fp32 is None:
                    self._fp32 = self._load_fp32()
                self.retries += 1
            retry = self._fp32.run({self._fp32.component.inputs[0].name: decoder_input()}, release_memory=True)
            pixels = retry[self._fp32.output_names[0]].astype(np.float32, copy=False)
            if np.isfinite(pixels).all():
                return pixels
            bad = int((~np.isfinite(pixels)).sum())
        raise NumericalError(f"vae_decoder: {bad} non-finite pixel values (NaN/Inf) in the decoded image")


__all__ = ["ImageDecoder"]
