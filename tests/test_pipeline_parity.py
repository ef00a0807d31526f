"""End-to-end parity: our Pipeline against diffusers' StableDiffusionPipeline on the same checkpoint,
initial latents and scheduler (fp32, PSNR ≥ 40 dB), for every scheduler we ship."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import psnr
from diffusers import DDIMScheduler

from ortdiffusion.export.reference import (
    ancestral_noise_from_seeds,
    reference_scheduler,
)

SCHEDULERS = ["ddim", "euler", "euler-ancestral", "dpm++2m", "dpm++2m-karras"]


def run_reference(reference_pipeline, scheduler, latents, step_noise_seed, **kwargs):
    reference_pipeline.scheduler = reference_scheduler(scheduler, reference_pipeline.scheduler.config)
    with ancestral_noise_from_seeds([step_noise_seed]):
        return reference_pipeline(latents=torch.from_numpy(latents), output_type="pil", **kwargs).images[0]


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_image_matches_diffusers(tiny_pipeline, reference_pipeline, scheduler, guidance):
    latents = np.random.default_rng(3).standard_normal((1, 4, 16, 16)).astype(np.float32)
    prompt, negative = "a red circle on the left", "blurry"
    ref = run_reference(
        reference_pipeline, scheduler, latents, step_noise_seed=11, prompt=prompt, negative_prompt=negative,
        num_inference_steps=12, guidance_scale=guidance,
    )
    ours = tiny_pipeline(
        prompt, negative_prompt=negative, latents=latents, seed=11, num_inference_steps=12,
        guidance_scale=guidance, scheduler=scheduler,
    ).images[0]
    assert np.asarray(ours).std() > 5, "a flat image would make the comparison meaningless"
    assert psnr(ours, ref) >= 40.0, f"{scheduler}: PSNR {psnr(ours, ref):.1f} dB"


def test_batch_of_prompts_matches_diffusers(tiny_pipeline, reference_pipeline):
    prompts = ["a red circle", "a blue square on the right"]
    latents = np.random.default_rng(4).standard_normal((2, 4, 16, 16)).astype(np.float32)
    reference_pipeline.scheduler = DDIMScheduler.from_config(reference_pipeline.scheduler.config)
    ref = reference_pipeline(prompts, latents=torch.from_numpy(latents), num_inference_steps=8, guidance_scale=5.0).images
    ours = tiny_pipeline(prompts, latents=latents, num_inference_steps=8, guidance_scale=5.0, scheduler="ddim").images
    for a, b in zip(ours, ref):
        assert psnr(a, b) >= 40.0
