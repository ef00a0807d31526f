"""DPM-Solver++(2M): Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models" (arXiv:2211.01095), Algorithm 2 — second-order multistep in log-SNR λ,
data prediction; optionally on Karras et al.'s σ schedule.

Mirrors diffusers' `DPMSolverMultistepScheduler` (algorithm_type="dpmsolver++", solver_order=2);
checked step by step against it in tests/test_schedulers.py.
"""

from __future__ import annotations

import math
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
)


@dataclass(frozen=True)
class DPMSolverConfig(TrainingScheduleConfig):
    solver_order: int = 2
    thresholding: bool = False
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -math.inf


def _alpha_sigma(sigma: float) -> tuple[float, float]:
    """(α_t, σ_t) of the variance-preserving process from the VE noise level σ."""
    alpha = 1.0 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


def _lambda(sigma: float) -> float:
    """λ = log(α/σ), the half log-SNR the solver integrates over."""
    alpha, s = _alpha_sigma(sigma)
    return math.log(alpha) - math.log(s)


class DPMSolverMultistepScheduler(LinearScheduler):
    needs_noise = False

    def __init__(self, config: DPMSolverConfig):
        require("algorithm_type", config.algorithm_type, ("dpmsolver++",))
        require("solver_order", config.solver_order, (1, 2))
        require("solver_type", config.solver_type, ("midpoint", "heun"))
        require("prediction_type", config.prediction_type, ("epsilon", "v_prediction", "sample"))
        require("thresholding", config.thresholding, (False,))
        require("final_sigmas_type", config.final_sigmas_type, ("zero", "sigma_min"))
        self.config = config
        self.cumprod = config.alphas_cumprod()
        self.init_noise_sigma = 1.0
        self.timesteps = np.zeros(0, dtype=np.int64)

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], **overrides: Any) -> DPMSolverMultistepScheduler:
        return cls(config_from_dict(DPMSolverConfig, raw, overrides))

    def set_timesteps(self, num_inference_steps: int) -> None:
        c = self.config
        lambdas = 0.5 * np.log(self.cumprod) - 0.5 * np.log(1 - self.cumprod)
        clipped = int(np.searchsorted(lambdas[::-1], c.lambda_min_clipped))
        last = c.num_train_timesteps - clipped
        # 1. timesteps: this solver spaces n + 1 points and drops the last (diffusers' convention)
        if c.timestep_spacing == "linspace":
            timesteps = np.linspace(0, last - 1, num_inference_steps + 1).round()[::-1][:-1].astype(np.int64)
        elif c.timestep_spacing == "leading":
            ratio = last // (num_inference_steps + 1)
            timesteps = (np.arange(num_inference_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64)
            timesteps = timesteps + c.steps_offset
        elif c.timestep_spacing == "trailing":
            ratio = c.num_train_timesteps / num_inference_steps
            timesteps = np.arange(last, 0, -ratio).round().astype(np.int64) - 1
        else:
            require("timestep_spacing", c.timestep_spacing, ("linspace", "leading", "trailing"))
        # 2. noise levels at those timesteps, or Karras' schedule mapped back to timesteps
        train_sigmas = sigmas_from_alphas(self.cumprod)
        if c.use_karras_sigmas:
            sigmas = karras_sigmas(train_sigmas[0], train_sigmas[-1], num_inference_steps)
            timesteps = sigma_to_t(sigmas, np.log(train_sigmas))
            if c.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
        final = train_sigmas[0] if c.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [final]])
        self.timesteps = timesteps.astype(np.int64)
        self.num_inference_steps = len(self.timesteps)
        self._previous_x0 = None

    def _x0_coefficients(self, sigma: float) -> tuple[float, float]:
        """Data prediction x_θ = a · sample + b · model output: (a, b) (DPM-Solver++ integrates
        over x_0 estimates, not ε)."""
        alpha, s = _alpha_sigma(sigma)
        if self.config.prediction_type == "epsilon":  # (x − σ ε) / α
            return 1.0 / alpha, -s / alpha
        if self.config.prediction_type == "v_prediction":  # α x − σ v
            return alpha, -s
        return 0.0, 1.0

    def noising(self, step_index: int) -> tuple[float, float]:
        return _alpha_sigma(float(self.sigmas[step_index]))  # α_t x₀ + σ_t ε

    def linear_step(self, step_index: int) -> LinearStep:
        c, n, i = self.config, len(self.timesteps), step_index
        # 1. near the end of short schedules, drop to first order for stability (diffusers'
        #    lower_order_final); the first step has no previous x_0 to be second order with
        lower_order_final = i == n - 1 and (
            c.euler_at_final or (c.lower_order_final and n < 15) or c.final_sigmas_type == "zero"
        )
        x0 = self._x0_coefficients(float(self.sigmas[i]))
        sigma_t, sigma_s0 = float(self.sigmas[i + 1]), float(self.sigmas[i])
        alpha_t, s_t = _alpha_sigma(sigma_t)
        _, s_s0 = _alpha_sigma(sigma_s0)
        h = (math.log(alpha_t) - math.log(s_t) if s_t > 0 else math.inf) - _lambda(sigma_s0)
        phi = math.expm1(-h) if math.isfinite(h) else -1.0  # e^{−h} − 1
        if c.solver_order == 1 or i == self.begin_index or lower_order_final:
            # 2a. first order (DPM-Solver++(1) = DDIM in x_0 form): x_t = (σ_t/σ_s) x − α_t (e^{−h} − 1) x_0
            return LinearStep(*x0, sample=s_t / s_s0, x0=-alpha_t * phi)
        # 2b. second order multistep with the previous step's x_0 (Algorithm 2, r = h_{i−1}/h_i):
        #     D0 = x_0, D1 = (x_0 − x_0_prev) / r
        r0 = (_lambda(sigma_s0) - _lambda(float(self.sigmas[i - 1]))) / h
        if c.solver_type == "midpoint":  # x_t = (σ_t/σ_s) x − α_t φ D0 − ½ α_t φ D1
            d1 = -0.5 * alpha_t * phi
        else:  # heun: x_t = (σ_t/σ_s) x − α_t φ D0 + α_t (φ/h + 1) D1
            d1 = alpha_t * (phi / h + 1.0)
        return LinearStep(*x0, sample=s_t / s_s0, x0=-alpha_t * phi + d1 / r0, previous_x0=-d1 / r0)
