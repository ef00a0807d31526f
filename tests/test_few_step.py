"""Few-step families against diffusers' own pipelines on tiny checkpoints (fp32, same latents,
PSNR ≥ 40 dB): LCM (its UNet's guidance embedding and the LCM scheduler, as
`LatentConsistencyModelPipeline`), the Turbo settings (Euler on trailing timesteps, no guidance,
1–4 steps), and `guidance_rescale` (as `StableDiffusionPipeline`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import psnr

from ortdiffusion import Pipeline
from ortdiffusion.export.reference import ancestral_noise_from_seeds
from ortdiffusion.runtime import InvalidRequestError
from ortdiffusion.runtime.manifest import FEED_GUIDANCE

PROMPT = "a red circle on the left"


def _export(name: str, tmp_path_factory) -> tuple:
    from ortdiffusion.export.bundle import export_checkpoint
    from ortdiffusion.export.presets import build_checkpoint

    checkpoint = build_checkpoint(name, tmp_path_factory.mktemp("ckpt") / name)
    bundle = tmp_path_factory.mktemp("bundles") / name
    export_checkpoint(checkpoint, bundle)
    return checkpoint, Pipeline.load(bundle, providers="cpu")


@pytest.fixture(scope="module")
def lcm(tmp_path_factory):
    return _export("tiny-lcm", tmp_path_factory)


@pytest.fixture(scope="module")
def turbo(tmp_path_factory):
    return _export("tiny-turbo", tmp_path_factory)


@pytest.fixture(scope="module")
def sdxl_turbo(tmp_path_factory):
    return _export("tiny-sdxl-turbo", tmp_path_factory)


def _with_unet_rows(pipe, latents: np.ndarray, steps: int):
    """The image at the bundle's defaults, and the batch rows of each UNet call that made it."""
    calls = []
    unet = pipe.sessions["unet"]
    original = unet.run
    unet.run = lambda feeds, **kw: (calls.append(feeds["sample"].shape[0]), original(feeds, **kw))[1]
    try:
        return pipe(PROMPT, latents=latents, num_inference_steps=steps).images[0], calls
    finally:
        unet.run = original


def _latents(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, 16, 16)).astype(np.float32)


def test_lcm_bundle_takes_guidance_as_an_input_with_lcm_defaults(lcm):
    _, pipe = lcm
    p = pipe.manifest.pipeline
    assert pipe.manifest.unet_feeds()["timestep_cond"] == FEED_GUIDANCE
    assert (p.default_scheduler, p.default_steps, p.default_guidance) == ("lcm", 4, 8.5)


@pytest.mark.parametrize("steps,guidance", [(4, 8.5), (1, 8.5), (2, 3.0)])
def test_lcm_matches_diffusers(lcm, steps, guidance):
    from diffusers import LatentConsistencyModelPipeline

    checkpoint, pipe = lcm
    ref_pipe = LatentConsistencyModelPipeline.from_pretrained(str(checkpoint), safety_checker=None,
                                                              requires_safety_checker=False)
    ref_pipe.set_progress_bar_config(disable=True)
    latents = _latents(3)
    with ancestral_noise_from_seeds([11], where=("lcm",)):
        ref = ref_pipe(PROMPT, latents=torch.from_numpy(latents), num_inference_steps=steps,
                       guidance_scale=guidance).images[0]
    out = pipe(PROMPT, latents=latents, seed=11, num_inference_steps=steps, guidance_scale=guidance)
    ours = out.images[0]
    assert np.asarray(ours).std() > 5, "a flat image would make the comparison meaningless"
    assert psnr(ours, ref) >= 40.0, f"PSNR {psnr(ours, ref):.1f} dB"
    assert out.metadata[0]["scheduler"] == "lcm"


@pytest.mark.parametrize("strength,steps", [(0.5, 4), (0.3, 2), (1.0, 4)])
def test_lcm_img2img_matches_diffusers(lcm, strength, steps):
    """LCM's img2img runs every requested step inside the first `strength` of its schedule
    (diffusers' `LatentConsistencyModelImg2ImgPipeline`), not the last `strength` of the steps."""
    from diffusers import LatentConsistencyModelImg2ImgPipeline
    from test_image_inputs import picture

    checkpoint, pipe = lcm
    size = pipe.manifest.pipeline.default_width
    image = picture().resize((size, size))
    ref_pipe = LatentConsistencyModelImg2ImgPipeline.from_pretrained(str(checkpoint), safety_checker=None,
                                                                     requires_safety_checker=False)
    ref_pipe.set_progress_bar_config(disable=True)
    with ancestral_noise_from_seeds([7], where=("lcm", "vae", "lcm_img2img")):
        ref = ref_pipe(PROMPT, image=image, strength=strength, num_inference_steps=steps, guidance_scale=8.5).images[0]
    ran = []
    out = pipe(PROMPT, image=image, strength=strength, seed=7, num_inference_steps=steps, guidance_scale=8.5,
               callback=lambda *args: ran.append(args))
    assert np.asarray(ref).std() > 5, "a flat image would make the comparison meaningless"
    assert psnr(out.images[0], ref) >= 40.0, f"PSNR {psnr(out.images[0], ref):.1f} dB"
    assert len(ran) == steps, "every requested step runs, whatever the strength"


def test_lcm_img2img_says_when_strength_leaves_too_few_steps(lcm):
    from test_image_inputs import picture

    _, pipe = lcm
    size = pipe.manifest.pipeline.default_width
    with pytest.raises(InvalidRequestError, match=r"strength: leaves 2 of the lcm schedule's 50 steps"):
        pipe(PROMPT, image=picture().resize((size, size)), strength=0.05, num_inference_steps=4)


def test_lcm_guidance_changes_the_image_through_the_embedding_alone(lcm):
    _, pipe = lcm
    a, b = (pipe(PROMPT, seed=4, guidance_scale=g) for g in (2.0, 8.5))
    # random tiny weights move little, but the embedding must reach the UNet (the parity test above
    # checks it reaches it as diffusers' does)
    assert (np.asarray(a.images[0]) != np.asarray(b.images[0])).any()


def test_lcm_refuses_a_negative_prompt_by_name(lcm):
    _, pipe = lcm
    with pytest.raises(InvalidRequestError, match="negative_prompt: this model embeds guidance"):
        pipe(PROMPT, negative_prompt="blurry")
    pipe(PROMPT, negative_prompt="", num_inference_steps=1)  # the empty one is what it was distilled against


def test_lcm_scheduler_runs_on_a_plain_bundle_too(tiny_pipeline, reference_pipeline):
    """LCM-LoRA-fused models are plain SD UNets sampled with the LCM scheduler and real guidance."""
    from diffusers import LCMScheduler

    latents = _latents(5)
    reference_pipeline.scheduler = LCMScheduler.from_config(reference_pipeline.scheduler.config)
    with ancestral_noise_from_seeds([2], where=("lcm",)):
        ref = reference_pipeline(PROMPT, latents=torch.from_numpy(latents), num_inference_steps=4,
                                 guidance_scale=1.5).images[0]
    ours = tiny_pipeline(PROMPT, latents=latents, seed=2, num_inference_steps=4, guidance_scale=1.5,
                         scheduler="lcm").images[0]
    assert psnr(ours, ref) >= 40.0, f"PSNR {psnr(ours, ref):.1f} dB"


def test_turbo_bundle_gets_turbo_defaults(turbo):
    _, pipe = turbo
    p = pipe.manifest.pipeline
    assert (p.default_scheduler, p.default_steps, p.default_guidance) == ("euler", 1, 0.0)
    assert p.scheduler_config["timestep_spacing"] == "trailing"


@pytest.mark.parametrize("steps", [1, 4])
def test_turbo_settings_match_diffusers(turbo, steps):
    from diffusers import StableDiffusionPipeline

    checkpoint, pipe = turbo
    ref_pipe = StableDiffusionPipeline.from_pretrained(str(checkpoint), safety_checker=None,
                                                       requires_safety_checker=False)
    ref_pipe.set_progress_bar_config(disable=True)
    latents = _latents(6)
    ref = ref_pipe(PROMPT, latents=torch.from_numpy(latents), num_inference_steps=steps, guidance_scale=0.0).images[0]
    ours, calls = _with_unet_rows(pipe, latents, steps)  # the bundle's defaults
    assert calls == [1] * steps, "guidance 0: one UNet row per image, no unconditional half"
    assert np.asarray(ours).std() > 5
    assert psnr(ours, ref) >= 40.0, f"PSNR {psnr(ours, ref):.1f} dB"


@pytest.mark.parametrize("steps", [1, 4])
def test_sdxl_turbo_settings_match_diffusers(sdxl_turbo, steps):
    """SDXL-Turbo as diffusers runs it (`StableDiffusionXLPipeline`, guidance 0, trailing Euler):
    the SDXL family's two text encoders and added conditions with Turbo's defaults, no doubled batch."""
    from diffusers import StableDiffusionXLPipeline

    checkpoint, pipe = sdxl_turbo
    p = pipe.manifest.pipeline
    assert (p.default_scheduler, p.default_steps, p.default_guidance) == ("euler", 1, 0.0)
    ref_pipe = StableDiffusionXLPipeline.from_pretrained(str(checkpoint))
    ref_pipe.set_progress_bar_config(disable=True)
    latents = _latents(8)
    ref = ref_pipe(PROMPT, latents=torch.from_numpy(latents), num_inference_steps=steps, guidance_scale=0.0).images[0]
    ours, calls = _with_unet_rows(pipe, latents, steps)  # the bundle's defaults
    assert calls == [1] * steps, "guidance 0: one UNet row per image, no unconditional half"
    assert np.asarray(ours).std() > 5
    assert psnr(ours, ref) >= 40.0, f"PSNR {psnr(ours, ref):.1f} dB"


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_guidance_rescale_matches_diffusers(tiny_pipeline, reference_pipeline, scheduler):
    from ortdiffusion.export.reference import reference_scheduler

    latents = _latents(7)
    kwargs = dict(negative_prompt="blue", num_inference_steps=8, guidance_scale=30.0)
    reference_pipeline.scheduler = reference_scheduler(scheduler, reference_pipeline.scheduler.config)
    ref = reference_pipeline(PROMPT, latents=torch.from_numpy(latents), guidance_rescale=0.7, **kwargs).images[0]
    ours = tiny_pipeline(PROMPT, latents=latents, guidance_rescale=0.7, scheduler=scheduler, **kwargs)
    plain = tiny_pipeline(PROMPT, latents=latents, scheduler=scheduler, **kwargs).images[0]
    assert psnr(ours.images[0], plain) < 45, "the rescale must change the picture for the comparison to mean anything"
    assert psnr(ours.images[0], ref) >= 40.0, f"PSNR {psnr(ours.images[0], ref):.1f} dB"
    assert ours.metadata[0]["guidance_rescale"] == "0.7"


def test_guidance_rescale_is_checked_by_name(tiny_pipeline):
    with pytest.raises(InvalidRequestError, match="guidance_rescale: must be a number from 0 to 1"):
        tiny_pipeline(PROMPT, guidance_rescale=1.5)
