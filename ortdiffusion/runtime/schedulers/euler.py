"""Euler: Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"
(arXiv:2206.00364), Algorithm 2 without churn: a first-order step of the probability-flow ODE in σ.

Mirrors diffusers' `EulerDiscreteScheduler`; checked step by step against it in tests/test_schedulers.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .linear_step import LinearScheduler, LinearStep
from .noise_schedule import (
    TrainingScheduleConfig,
    config_from_dict,
    karras_sigmas,
    require,
    sigma_to_t,
    sigmas_from_alphas,
    spaced_timesteps,
)


@dataclass(frozen=True)
class EulerConfig(TrainingScheduleConfig):
    interpolation_type: str = "linear"
    use_karras_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_type: str = "discrete"
    final_sigmas_type: str = "zero"


def sigma_schedule(c: EulerConfig, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(timesteps, sigmas with the final one appended, init_noise_sigma) for the Euler family."""
    require("interpolation_type", c.interpolation_type, ("linear",))
    cumprod = c.alphas_cumprod()
    train_sigmas = sigmas_from_alphas(cumprod)
    timesteps = spaced_timesteps(
        c.timestep_spacing, c.num_train_timesteps, num_inference_steps, c.steps_offset, dtype=np.float64
    )
    sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
    if c.use_karras_sigmas:
        lo = c.sigma_min if c.sigma_min is not None else sigmas[-1]
        hi = c.sigma_max if c.sigma_max is not None else sigmas[0]
        sigmas = karras_sigmas(lo, hi, num_inference_steps)
        timesteps = sigma_to_t(sigmas, np.log(train_sigmas))
    final = train_sigmas[0] if c.final_sigmas_type == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [final]])
    top = float(sigmas.max())
    init_noise_sigma = top if c.timestep_spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5
    return timesteps, sigmas, init_noise_sigma


def x0_coefficients(prediction_type: str, sigma: float) -> tuple[float, float]:
    """x_0 = a · sample + b · model_output at noise level σ (sample in the σ-scaled,
    variance-exploding space): (a, b)."""
    if prediction_type == "epsilon":  # x − σ ε
        return 1.0, -sigma
    if prediction_type == "v_prediction":
        return 1.0 / (sigma**2 + 1), -sigma / (sigma**2 + 1) ** 0.5
    return 0.0, 1.0


class EulerScheduler(LinearScheduler):
    needs_noise = False
    config_class: type[EulerConfig] = EulerConfig
    prediction_types: tuple[str, ...] = ("epsilon", "v_prediction", "sample")

    def __init__(self, config: EulerConfig):
        require("prediction_type", config.prediction_type, self.prediction_types)
        require("timestep_type", config.timestep_type, ("discrete",))
        require("final_sigmas_type", config.final_sigmas_type, ("zero", "sigma_min"))
        self.config = config
        self.timesteps = np.zeros(0)
        self.init_noise_sigma = 1.0

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], **overrides: Any) -> EulerScheduler:
        return cls(config_from_dict(cls.config_class, raw, overrides))

    def set_timesteps(self, num_inference_steps: int) -> None:
        self.timesteps, self.sigmas, self.init_noise_sigma = sigma_schedule(self.config, num_inference_steps)

    def input_scale(self, step_index: int) -> float:
        # The UNet was trained on unit-variance inputs: x / sqrt(σ² + 1).
        return 1.0 / (float(self.sigmas[step_index]) ** 2 + 1) ** 0.5

    def noising(self, step_index: int) -> tuple[float, float]:
        return 1.0, float(self.sigmas[step_index])  # variance exploding: x₀ + σ ε

    def linear_step(self, step_index: int) -> LinearStep:
        sigma, sigma_next = float(self.sigmas[step_index]), float(self.sigmas[step_index + 1])
        # 1. denoised estimate D(x; σ); 2. d = (x − D) / σ, the ODE's slope dx/dσ (Algorithm 2, line 7);
        # 3. x_next = x + (σ_next − σ) d = (1 + k) x − k D with k = (σ_next − σ) / σ
        k = (sigma_next - sigma) / sigma
        return LinearStep(*x0_coefficients(self.config.prediction_type, sigma), sample=1.0 + k, x0=-k)
