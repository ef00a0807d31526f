"""DDIM: Song et al. 2020, "Denoising Diffusion Implicit Models" (arXiv:2010.02502), deterministic (η = 0).

Mirrors diffusers' `DDIMScheduler`; checked step by step against it in tests/test_schedulers.py.
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
    require,
    spaced_timesteps,
)


@dataclass(frozen=True)
class DDIMConfig(TrainingScheduleConfig):
    timestep_spacing: str = "leading"
    set_alpha_to_one: bool = True
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    thresholding: bool = False


class DDIMScheduler(LinearScheduler):
    needs_noise = False

    def __init__(self, config: DDIMConfig):
        require("prediction_type", config.prediction_type, ("epsilon", "v_prediction", "sample"))
        require("thresholding", config.thresholding, (False,))
        self.config = config
        self.alphas_cumprod = config.alphas_cumprod(terminal_floor=False)
        # ᾱ used after the last step: 1 (a clean image) or ᾱ_0, as the checkpoint was trained.
        self.final_alpha_cumprod = 1.0 if config.set_alpha_to_one else float(self.alphas_cumprod[0])
        self.init_noise_sigma = 1.0
        self.timesteps = np.zeros(0, dtype=np.int64)

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], **overrides: Any) -> DDIMScheduler:
        return cls(config_from_dict(DDIMConfig, raw, overrides))

    def set_timesteps(self, num_inference_steps: int) -> None:
        c = self.config
        self.num_inference_steps = num_inference_steps
        self.timesteps = spaced_timesteps(c.timestep_spacing, c.num_train_timesteps, num_inference_steps, c.steps_offset)

    def noising(self, step_index: int) -> tuple[float, float]:
        a = float(self.alphas_cumprod[int(self.timesteps[step_index])])  # DDPM's q(x_t | x_0)
        return a**0.5, (1.0 - a) ** 0.5

    def linear_step(self, step_index: int) -> LinearStep:
        c = self.config
        t = int(self.timesteps[step_index])
        # 1. the previous timestep (formula 12 walks the sub-sequence τ)
        prev_t = t - c.num_train_timesteps // self.num_inference_steps
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod
        b_t = 1.0 - a_t
        # 2. predicted x_0 (formula 12), clipped where the checkpoint asks for it, and ε, both
        #    linear in (sample, model output); ε from the unclipped prediction, as diffusers does
        if c.prediction_type == "epsilon":  # x0 = (x − √β ε̂) / √ᾱ, ε = ε̂
            x0_sample, x0_output, eps_sample, eps_output = 1 / a_t**0.5, -(b_t**0.5) / a_t**0.5, 0.0, 1.0
        elif c.prediction_type == "v_prediction":  # Salimans & Ho 2022, v = α ε − σ x
            x0_sample, x0_output, eps_sample, eps_output = a_t**0.5, -(b_t**0.5), b_t**0.5, a_t**0.5
        else:  # x0 = model output, ε = (x − √ᾱ x0) / √β
            x0_sample, x0_output, eps_sample, eps_output = 0.0, 1.0, 1 / b_t**0.5, -(a_t**0.5) / b_t**0.5
        # 3. x_{t-1} = sqrt(ᾱ_prev) x_0 + sqrt(1 − ᾱ_prev) ε  (η = 0: no added noise)
        d = (1.0 - a_prev) ** 0.5
        return LinearStep(x0_sample, x0_output, clip=c.clip_sample_range if c.clip_sample else None,
                          sample=d * eps_sample, output=d * eps_output, x0=a_prev**0.5)
