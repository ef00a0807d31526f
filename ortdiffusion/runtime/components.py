"""The three networks of the pipeline, as typed numpy calls over their sessions."""

from __future__ import annotations

import numpy as np

from .device_loop import Transfers
from .errors import NumericalError
from .session import Session


class TextEncoder:
    """Token ids (batch, length) int64 → hidden states (batch, length, width) float32."""

    def __init__(self, session: Session):
        self.session = session

    def __call__(self, input_ids: np.ndarray, transfers: Transfers | None = None) -> np.ndarray:
        out = self.session.run({"input_ids": input_ids}, release_memory=True, transfers=transfers)[0]
        return out.astype(np.float32, copy=False)


class Denoiser:
    """One UNet step: the model's prediction (ε, v or x₀) for latents at a timestep."""

    def __init__(self, session: Session):
        self.session = session

    def __call__(self, sample: np.ndarray, timestep: float, encoder_hidden_states: np.ndarray,
                 last: bool = False, transfers: Transfers | None = None) -> np.ndarray:
        """`last`: the last step of a generation, after which the UNet's arena memory is released."""
        t = np.full((sample.shape[0],), timestep, dtype=np.float32)
        feeds = {"sample": sample, "timestep": t, "encoder_hidden_states": encoder_hidden_states}
        out = self.session.run(feeds, release_memory=last, transfers=transfers)[0]
        return out.astype(np.float32, copy=False)


class ImageDecoder:
    """Latents → images in [-1, 1], (batch, 3, H, W) float32.

    Per DESIGN.md's precision rule, non-finite pixels are retried on the fp32 decoder where the
    bundle has one, and otherwise raise `NumericalError`: a black image is never returned silently.
    """

    def __init__(self, session: Session, fp32_fallback: Session | None = None):
        self.session = session
        self.fp32_fallback = fp32_fallback

    def __call__(self, latents: np.ndarray, transfers: Transfers | None = None) -> np.ndarray:
        image = self.session.run({"latent_sample": latents}, release_memory=True, transfers=transfers)[0]
        return self.checked(image.astype(np.float32, copy=False), latents)

    def checked(self, image: np.ndarray, latents: np.ndarray | None = None) -> np.ndarray:
        """`image` if finite; else the fp32 decoder's (where there is one and `latents` are at hand)."""
        if np.isfinite(image).all():
            return image
        if self.fp32_fallback is not None and latents is not None:
            image = self.fp32_fallback.run({"latent_sample": latents}, release_memory=True)[0].astype(np.float32, copy=False)
            if np.isfinite(image).all():
                return image
        bad = int((~np.isfinite(image)).sum())
        raise NumericalError(f"vae_decoder: {bad} non-finite pixel values (NaN/Inf) in the decoded image")
