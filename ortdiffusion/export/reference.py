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
        LCMScheduler,
    )

    name = SchedulerName.parse(name)
    table = {
        SchedulerName.DDIM: (DDIMScheduler, {}),
        SchedulerName.EULER: (EulerDiscreteScheduler, {"use_karras_sigmas": False}),
        SchedulerName.EULER_ANCESTRAL: (EulerAncestralDiscreteScheduler, {}),
        SchedulerName.DPMPP_2M: (DPMSolverMultistepScheduler, {"use_karras_sigmas": False, "algorithm_type": "dpmsolver++"}),
        SchedulerName.DPMPP_2M_KARRAS: (DPMSolverMultistepScheduler, {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++"}),
        SchedulerName.LCM: (LCMScheduler, {}),
    }
    cls, overrides = table[name]
    return cls.from_config(dict(config), **overrides)


#: Where diffusers draws the noise of a Stable Diffusion run: the ancestral sampler's per-step
#: noise, the VAE's latent sample (image inputs), and the img2img / inpainting pipelines' noise.
NOISE_MODULES = {
    "ancestral": "diffusers.schedulers.scheduling_euler_ancestral_discrete",
    "lcm": "diffusers.schedulers.scheduling_lcm",
    "vae": "diffusers.models.autoencoders.vae",
    "img2img": "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img",
    "lcm_img2img": "diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_img2img",
    "inpaint": "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint",
    "controlnet_img2img": "diffusers.pipelines.controlnet.pipeline_controlnet_img2img",
    "sdxl": "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl",
    "sdxl_img2img": "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img",
    "sdxl_inpaint": "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint",
}


class ancestral_noise_from_seeds:
    """While active, diffusers draws its noise from numpy generators seeded like the engine's (one
    PCG64 per image), so both add the same noise: by default the ancestral sampler's per-step noise;
    `where` names more of `NOISE_MODULES` (image inputs: "vae" and the task's pipeline). Every
    draw takes the next array of each image's generator, in the order diffusers draws, which is
    the order the engine's plan draws in (`runtime/plan.py`); batch 1 for image inputs, which
    diffusers encodes image by image.

    With explicit initial latents the engine's generator for an image yields only step noise, so
    the draws line up one for one.
    """

    def __init__(self, seeds: list[int], where: tuple[str, ...] = ("ancestral",)):
        self.generators = [np.random.Generator(np.random.PCG64(s)) for s in seeds]
        self.where = where

    def _draw(self, shape, **kw):
        return torch.from_numpy(np.stack([g.standard_normal(tuple(shape[1:]), dtype=np.float32) for g in self.generators]))

    def __enter__(self):
        import importlib

        self.patched = []
        for key in self.where:
            mod = importlib.import_module(NOISE_MODULES[key])
            self.patched.append((mod, mod.randn_tensor))
            mod.randn_tensor = self._draw
        return self

    def __exit__(self, *exc):
        for mod, original in self.patched:
            mod.randn_tensor = original
