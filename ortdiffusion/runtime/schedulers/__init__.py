"""Numpy schedulers, one algorithm per file, behind one small protocol.

A scheduler is made fresh for every generation (multistep solvers keep state), from the
checkpoint's scheduler config carried in the bundle manifest, the way diffusers'
`SomeScheduler.from_config(pipe.scheduler.config)` swaps schedulers.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any, Protocol

import numpy as np

from ..errors import InvalidRequestError
from .ddim import DDIMScheduler
from .dpmsolver_multistep import DPMSolverMultistepScheduler
from .euler import EulerScheduler
from .euler_ancestral import EulerAncestralScheduler
from .lcm import LCMScheduler
from .linear_step import LinearStep


class Scheduler(Protocol):
    timesteps: np.ndarray
    init_noise_sigma: float
    #: True when `step` needs a fresh standard-normal `noise` array every step.
    needs_noise: bool
    #: True when an input image's strength shortens the schedule itself (LCM: all the requested
    #: steps run, inside the first `strength` of the distillation schedule) rather than skipping its
    #: noisiest steps (diffusers' `get_timesteps`, every other scheduler).
    schedules_strength: bool = False

    def set_timesteps(self, num_inference_steps: int) -> None: ...

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray: ...

    def step(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray: ...

    #: Step `step_index` as coefficients (linear_step.py): what the device loop's step graph runs.
    def linear_step(self, step_index: int) -> LinearStep: ...

    def input_scale(self, step_index: int) -> float: ...

    #: The first step a run takes (image-to-image: part way into the schedule).
    begin_index: int

    #: (a, b) of `add_noise` at step `step_index`: noisy = a · x₀ + b · ε.
    def noising(self, step_index: int) -> tuple[float, float]: ...


class SchedulerName(str, Enum):
    """What a caller names; each name fixes the algorithm and its sigma schedule."""

    DDIM = "ddim"
    EULER = "euler"
    EULER_ANCESTRAL = "euler-ancestral"
    DPMPP_2M = "dpm++2m"
    DPMPP_2M_KARRAS = "dpm++2m-karras"
    #: Latent Consistency Models' multistep sampler: LCM UNets and LCM-LoRA-fused models, 2–8 steps.
    LCM = "lcm"

    @classmethod
    def parse(cls, value: str | SchedulerName, field: str = "scheduler") -> SchedulerName:
        if isinstance(value, SchedulerName):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            allowed = ", ".join(n.value for n in cls)
            raise InvalidRequestError(field, f"unknown scheduler {value!r}; allowed: {allowed}") from None


# The diffusers class a checkpoint names → the scheduler that runs by default.
_FROM_DIFFUSERS_CLASS = {
    "DDIMScheduler": SchedulerName.DDIM,
    "EulerDiscreteScheduler": SchedulerName.EULER,
    "EulerAncestralDiscreteScheduler": SchedulerName.EULER_ANCESTRAL,
    "DPMSolverMultistepScheduler": SchedulerName.DPMPP_2M,
    "LCMScheduler": SchedulerName.LCM,
}


def default_scheduler_for(diffusers_class: str | None) -> SchedulerName:
    """The checkpoint's own scheduler where we implement it; DDIM otherwise (e.g. for PNDM)."""
    return _FROM_DIFFUSERS_CLASS.get(diffusers_class or "", SchedulerName.DDIM)


def make_scheduler(name: SchedulerName | str, config: Mapping[str, Any]) -> Scheduler:
    """A new scheduler of the named algorithm built from a diffusers scheduler config."""
    name = SchedulerName.parse(name)
    if name is SchedulerName.DDIM:
        return DDIMScheduler.from_config(config)
    if name is SchedulerName.EULER:
        return EulerScheduler.from_config(config, use_karras_sigmas=False)
    if name is SchedulerName.EULER_ANCESTRAL:
        return EulerAncestralScheduler.from_config(config, use_karras_sigmas=False, final_sigmas_type="zero")
    if name is SchedulerName.LCM:
        return LCMScheduler.from_config(config)
    # DPM-Solver++(2M), with or without Karras sigmas as the name says
    return DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="dpmsolver++", solver_order=2,
        use_karras_sigmas=name is SchedulerName.DPMPP_2M_KARRAS,
    )


__all__ = [
    "LinearStep",
    "Scheduler",
    "SchedulerName",
    "default_scheduler_for",
    "make_scheduler",
    "DDIMScheduler",
    "EulerScheduler",
    "EulerAncestralScheduler",
    "DPMSolverMultistepScheduler",
    "LCMScheduler",
]
