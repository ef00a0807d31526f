"""LCM: Luo et al. 2023, "Latent Consistency Models" (arXiv:2310.04378), multistep consistency sampling.

Mirrors diffusers' `LCMScheduler`; checked step by step against it in tests/test_schedulers.py.
Each step maps the latents to a clean estimate with the consistency boundary condition
(denoised = c_out · x₀ + c_skip · x) and, except at the last step, noises it to the next timestep:
linear in (sample, model output, fresh noise), so it runs as a `LinearStep` like every scheduler here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidRequestError
from .ddim import DDIMScheduler
from .linear_step import LinearStep
from .noise_schedule import TrainingScheduleConfig, config_from_dict

#: diffusers' `sigma_data` of the boundary condition scalings.
SIGMA_DATA = 0.5


@dataclass(frozen=True)
class LCMConfig(TrainingScheduleConfig):
    # diffusers' LCMScheduler defaults (Stable Diffusion's schedule), where a config leaves them out
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    #: The length of the schedule the model was distilled on; inference takes evenly spaced steps of it.
    original_inference_steps: int = 50
    set_alpha_to_one: bool = True
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    thresholding: bool = False
    timestep_scaling: float = 10.0


class LCMScheduler(DDIMScheduler):
    """DDIM's training schedule, start and noising (the same ᾱ and q(x_t | x_0)); its own timesteps
    and step."""

    needs_noise = True  # every step but the last adds fresh noise
    schedules_strength = True  # diffusers' LCMScheduler.set_timesteps(..., strength=)

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], **overrides: Any) -> LCMScheduler:
        return cls(config_from_dict(LCMConfig, raw, overrides))

    def set_timesteps(self, num_inference_steps: int, strength: float = 1.0) -> None:
        """Evenly spaced indices into the distillation schedule (k·1 − 1, …, k·N − 1, k = T // N);
        with an input image, into its first `strength` (k·1 − 1, …, k·⌊N·strength⌋ − 1), so that
        img2img runs every requested step (diffusers' `LatentConsistencyModelImg2ImgPipeline`)."""
        c = self.config
        original = c.original_inference_steps
        if not 1 <= original <= c.num_train_timesteps:
            raise InvalidRequestError("scheduler.original_inference_steps",
                                      f"must be from 1 to num_train_timesteps ({c.num_train_timesteps}), got {original}")
        if num_inference_steps > original:
            raise InvalidRequestError("num_inference_steps", f"must be at most {original} with the lcm scheduler "
                                      f"(the schedule it was distilled on), got {num_inference_steps}")
        k = c.num_train_timesteps // original
        kept = int(original * strength)
        if kept < num_inference_steps:
            raise InvalidRequestError("strength", f"leaves {kept} of the lcm schedule's {original} steps, fewer than "
                                      f"num_inference_steps ({num_inference_steps}): raise strength to at least "
                                      f"{num_inference_steps / original:g} or take fewer steps")
        origin = (np.arange(1, kept + 1) * k - 1)[::-1]
        indices = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
        self.timesteps = origin[indices].astype(np.int64)

    def linear_step(self, step_index: int) -> LinearStep:
        c = self.config
        t = int(self.timesteps[step_index])
        last = step_index == len(self.timesteps) - 1
        a_t = float(self.alphas_cumprod[t])
        b_t = 1.0 - a_t
        # 1. the boundary condition scalings at t (diffusers' get_scalings_for_boundary_condition_discrete)
        scaled = t * c.timestep_scaling
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
        # 2. predicted x₀, linear in (sample, model output), clipped where the checkpoint asks
        if c.prediction_type == "epsilon":
            x0_sample, x0_output = 1 / a_t**0.5, -(b_t**0.5) / a_t**0.5
        elif c.prediction_type == "v_prediction":
            x0_sample, x0_output = a_t**0.5, -(b_t**0.5)
        else:
            x0_sample, x0_output = 0.0, 1.0
        clip = c.clip_sample_range if c.clip_sample else None
        # 3. denoised = c_out · x₀ + c_skip · sample; the last step returns it, the others noise it
        #    to the next timestep: √ᾱ_prev · denoised + √(1 − ᾱ_prev) · ε
        if last:
            return LinearStep(x0_sample, x0_output, clip=clip, sample=c_skip, x0=c_out)
        t_prev = int(self.timesteps[step_index + 1])
        a_prev = float(self.alphas_cumprod[t_prev]) if t_prev >= 0 else self.final_alpha_cumprod
        return LinearStep(x0_sample, x0_output, clip=clip, sample=a_prev**0.5 * c_skip, x0=a_prev**0.5 * c_out,
                          noise=(1.0 - a_prev) ** 0.5)
