"""diffusers' own objects that correspond to the engine's: the references parity is judged against."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..runtime.schedulers import SchedulerName


def reference_scheduler(name: SchedulerName | str, config: Mapping[str, Any]):
    """The diffusers scheduler our scheduler `name` mirrors, built from the same config."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    name = SchedulerName.parse(name)
    table = {
        SchedulerName.DDIM: (DDIMScheduler, {}),
        SchedulerName.EULER: (EulerDiscreteScheduler, {"use_karras_sigmas": False}),
        SchedulerName.EULER_ANCESTRAL: (EulerAncestralDiscreteScheduler, {}),
        SchedulerName.DPMPP_2M: (DPMSolverMultistepScheduler, {"use_karras_sigmas": False, "algorithm_type": "dpmsolver++"}),
        SchedulerName.DPMPP_2M_KARRAS: (DPMSolverMultistepScheduler, {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++"}),
    }
    cls, overrides = table[name]
    return cls.from_config(dict(config), **overrides)


class ancestral_noise_from_seeds:
    """While active, diffusers' ancestral sampler draws its per-step noise from numpy generators
    seeded like the engine's (one PCG64 per image), so both samplers add the same noise.

    With explicit initial latents the engine's generator for an image yields only step noise, so
    the draws line up one for one.
    """

    def __init__(self, seeds: list[int]):
        self.generators = [np.random.Generator(np.random.PCG64(s)) for s in seeds]

    def __enter__(self):
        import diffusers.schedulers.scheduling_euler_ancestral_discrete as mod

        self.mod, self.original = mod, mod.randn_tensor
        mod.randn_tensor = lambda shape, **kw: torch.from_numpy(
            np.stack([g.standard_normal(tuple(shape[1:]), dtype=np.float32) for g in self.generators]))
        return self

    def __exit__(self, *exc):
        self.mod.randn_tensor = self.original
