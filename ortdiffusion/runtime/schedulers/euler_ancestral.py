"""Euler ancestral: an Euler step down to σ_down, then fresh noise back up to σ_next
(Karras et al. 2022, arXiv:2206.00364; the "ancestral" split of k-diffusion's `sample_euler_ancestral`).

Mirrors diffusers' `EulerAncestralDiscreteScheduler`; checked step by step against it in
tests/test_schedulers.py, with the same noise fed to both.
"""

from __future__ import annotations

from dataclasses import dataclass

from .euler import EulerConfig, EulerScheduler, x0_coefficients
from .linear_step import LinearStep


@dataclass(frozen=True)
class EulerAncestralConfig(EulerConfig):
    """diffusers' ancestral scheduler has no Karras or final-sigma options; these stay fixed."""

    use_karras_sigmas: bool = False
    final_sigmas_type: str = "zero"


class EulerAncestralScheduler(EulerScheduler):
    """Euler's timesteps, sigmas and input scaling; its own step."""

    #: Each step adds fresh Gaussian noise: the pipeline passes it in from the image's own seed.
    needs_noise = True
    config_class = EulerAncestralConfig
    prediction_types = ("epsilon", "v_prediction")

    def linear_step(self, step_index: int) -> LinearStep:
        sigma, sigma_to = float(self.sigmas[step_index]), float(self.sigmas[step_index + 1])
        # 1. split the move σ → σ_to into a deterministic part (σ_down) and fresh noise (σ_up)
        sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        # 2. Euler step to σ_down: x + (σ_down − σ) (x − D) / σ; 3. add noise of standard deviation σ_up
        k = (sigma_down - sigma) / sigma
        return LinearStep(*x0_coefficients(self.config.prediction_type, sigma), sample=1.0 + k, x0=-k, noise=sigma_up)
