"""Each numpy scheduler against the diffusers scheduler of the same name, over whole trajectories."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
)

from ortdiffusion.runtime.errors import InvalidRequestError
from ortdiffusion.runtime.schedulers import (
    SchedulerName,
    default_scheduler_for,
    make_scheduler,
)

SD15 = {  # Stable Diffusion 1.x's scheduler config
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False, "skip_prk_steps": True,
}
SD21_V = {**SD15, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
LINEAR_LEADING = {"beta_schedule": "linear", "timestep_spacing": "leading", "steps_offset": 1}
COSINE_LINSPACE = {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "linspace"}
#: Zero terminal SNR (Lin et al. 2023), as the built-in model is trained: v-prediction, trailing.
ZERO_SNR_V = {**SD21_V, "rescale_betas_zero_snr": True}

REFERENCE = {
    SchedulerName.DDIM: (DDIMScheduler, {}),
    SchedulerName.EULER: (EulerDiscreteScheduler, {"use_karras_sigmas": False}),
    SchedulerName.EULER_ANCESTRAL: (EulerAncestralDiscreteScheduler, {}),
    SchedulerName.DPMPP_2M: (DPMSolverMultistepScheduler, {"use_karras_sigmas": False}),
    SchedulerName.DPMPP_2M_KARRAS: (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    SchedulerName.LCM: (LCMScheduler, {}),
}


def fake_model(sample: np.ndarray, t: float) -> np.ndarray:
    """A deterministic stand-in for the UNet: depends on the sample and the timestep."""
    return (0.3 * np.tanh(sample) + 0.01 * np.sin(t / 50.0 + sample)).astype(np.float32)


@pytest.mark.parametrize("name", list(SchedulerName))
@pytest.mark.parametrize("config", [SD15, SD21_V, LINEAR_LEADING, COSINE_LINSPACE, ZERO_SNR_V],
                         ids=["sd15", "sd21-v", "linear-leading", "cosine", "zero-snr-v"])
@pytest.mark.parametrize("steps", [1, 5, 20, 50])
def test_trajectory_matches_diffusers(name, config, steps, request):
    # The two known differences are strict expected failures: should either close, the test says so.
    if name is SchedulerName.DPMPP_2M_KARRAS and config is COSINE_LINSPACE and steps > 1:
        # Cosine betas + Karras sigmas round many timesteps to the same 998; diffusers then starts at
        # index 1 (its rule for a repeated first timestep, meant for img2img) and skips a sigma.
        # Ours walks every sigma in order, so the two differ by design here.
        request.applymarker(pytest.mark.xfail(strict=True, reason="by design: diffusers skips the first of "
                                                                  "repeated starting timesteps, ours walks every sigma"))
    if name is SchedulerName.DPMPP_2M_KARRAS and config is ZERO_SNR_V and steps == 50:
        # Known gap: Karras sigmas from σ_max = 4096 with 50 steps drift to 0.3 % from diffusers by
        # step 29 (float32 ᾱ near zero terminal SNR differ by 3.5e-5 relative and the σ→t
        # interpolation amplifies it). 1, 5 and 20 steps agree; DDIM (the built-in default) exactly.
        request.applymarker(pytest.mark.xfail(strict=True, reason="known gap: dpm++2m-karras x zero terminal SNR "
                                                                  "x 50 steps drifts 0.3 % from diffusers by step 29"))
    ref_cls, overrides = REFERENCE[name]
    ref = ref_cls.from_config({**config, **overrides})
    ours = make_scheduler(name, config)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-6, atol=1e-4)
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-5)

    rng = np.random.default_rng(0)
    start = rng.standard_normal((2, 4, 8, 8)).astype(np.float32) * ours.init_noise_sigma
    x_ref, x_ours = torch.from_numpy(start.copy()), start.copy()
    # With zero terminal SNR the first sigma is 4096 (ᾱ_T = 2⁻²⁴); diffusers' float32 arithmetic
    # there (σ² + 1 loses the 1) rounds differently from ours by up to 0.15 %, carried along.
    rtol = 2e-3 if config is ZERO_SNR_V else 1e-4
    for i, t in enumerate(ref.timesteps):
        noise = rng.standard_normal(start.shape).astype(np.float32)
        in_ref = ref.scale_model_input(x_ref, t)
        in_ours = ours.scale_model_input(x_ours, i)
        scale = max(1.0, float(np.abs(in_ref.numpy()).max()))
        np.testing.assert_allclose(in_ours, in_ref.numpy(), rtol=rtol, atol=2e-5 * scale, err_msg=f"scaled input, step {i}")
        out = fake_model(in_ref.numpy(), float(t))
        if ours.needs_noise:
            # diffusers draws the ancestral noise itself; hand it the same draw as ours.
            import importlib

            mod = importlib.import_module(ref_cls.__module__)

            orig = mod.randn_tensor
            mod.randn_tensor = lambda *a, **k: torch.from_numpy(noise)
            try:
                x_ref = ref.step(torch.from_numpy(out), t, x_ref).prev_sample
            finally:
                mod.randn_tensor = orig
        else:
            x_ref = ref.step(torch.from_numpy(out), t, x_ref).prev_sample
        x_ours = ours.step(out, i, x_ours, noise=noise if ours.needs_noise else None)
        scale = max(1.0, float(np.abs(x_ref.numpy()).max()))
        np.testing.assert_allclose(x_ours, x_ref.numpy(), rtol=rtol, atol=2e-5 * scale, err_msg=f"step {i} (t={t})")


def test_unknown_scheduler_names_the_field_and_choices():
    with pytest.raises(InvalidRequestError, match=r"scheduler: unknown scheduler 'plms'; allowed: ddim, euler"):
        SchedulerName.parse("plms")


def test_unsupported_config_value_is_refused():
    with pytest.raises(InvalidRequestError, match="scheduler.beta_schedule"):
        make_scheduler("ddim", {"beta_schedule": "sigmoid"})


def test_checkpoint_scheduler_class_picks_default():
    assert default_scheduler_for("EulerDiscreteScheduler") is SchedulerName.EULER
    assert default_scheduler_for("PNDMScheduler") is SchedulerName.DDIM
