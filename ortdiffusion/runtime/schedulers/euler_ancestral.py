"""Euler ancestral: an Euler step down to σ_down, then fresh noise back up to σ_next
(Karras et al. 2022, arXiv:2206.00364; the "ancestral" split of k-diffusion's `sample_euler_ancestral`).

Mirrors diffusers' `EulerAncestralDiscreteScheduler`; checked step by step against it in
tests/test_schedulers.py, with the same noise fed to both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .euler import predicted_x0, sigma_schedule
from .noise_schedule import config_from_dict, require


@dataclass(frozen=True)
class EulerAncestralConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: list[float] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    interpolation_type: str = "linear"  # the only one diffusers' ancestral scheduler has


class EulerAncestralScheduler:
    #: Each step adds fresh Gaussian noise: the pipeline passes it in from the image's own seed.
    needs_noise = True

    def __init__(self, config: EulerAncestralConfig):
        require("prediction_type", config.prediction_type, ("epsilon", "v_prediction"))
        self.config = config
        self.timesteps = np.zeros(0)
        self.init_noise_sigma = 1.0

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], **overrides: Any) -> EulerAncestralScheduler:
        return cls(config_from_dict(EulerAncestralConfig, raw, overrides))

    def set_timesteps(self, num_inference_steps: int) -> None:
        self.timesteps, self.sigmas, self.init_noise_sigma = sigma_schedule(self.config, num_inference_steps)

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        sigma = self.sigmas[step_index]
        return (sample / (sigma**2 + 1) ** 0.5).astype(sample.dtype)

    def step(self, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        if noise is None:
            raise ValueError("EulerAncestralScheduler.step needs `noise` (one standard normal draw per step)")
        sigma, sigma_to = self.sigmas[step_index], self.sigmas[step_index + 1]
        # 1. split the move σ → σ_to into a deterministic part (σ_down) and fresh noise (σ_up)
        sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        # 2. Euler step to σ_down
        x0 = predicted_x0(self.config.prediction_type, model_output, sample, sigma)
        prev = sample + (sample - x0) / sigma * (sigma_down - sigma)
        # 3. add noise of standard deviation σ_up
        return (prev + noise * sigma_up).astype(sample.dtype)
