"""The executor that runs a plan with numpy arrays between the sessions (DESIGN.md's diagram):

    text encoder(s) ─► [ UNet step ─► guidance ─► scheduler step ] × N ─► image decoder

Every array crosses to the session and back at each call, which costs nothing where the sessions
run on the CPU; on a GPU the device loop (`device_loop.py`) keeps them there instead.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .decoder import ImageDecoder
from .errors import NumericalError
from .manifest import UNET
from .plan import Plan, StepCallback, rescale_guidance
from .session import Session
from .trace import Stage, Trace


class HostLoop:
    def __init__(self, sessions: Mapping[str, Session], decoders: Mapping[str, ImageDecoder]):
        #: the pipeline's own mapping: a session replaced there (a test's spy) is the one that runs
        self.sessions = sessions
        #: "full" (the VAE's decoder) and, where the bundle has one, "tiny"
        self.decoders = decoders

    def _run(self, component: str, feeds: dict[str, np.ndarray], trace: Trace, release: bool) -> dict[str, np.ndarray]:
        for array in feeds.values():
            trace.transfers.sent(array)
        outputs = self.sessions[component].run(feeds, release_memory=release)
        for array in outputs.values():
            trace.transfers.received(array)
        return outputs

    def __call__(self, plan: Plan, trace: Trace, callback: StepCallback | None = None) -> np.ndarray:
        # 1. text encoder(s) → the UNet's conditioning (one batch for both halves when guided)
        adapters = plan.adapter_feeds
        encoded = {component: plan.join_chunks(self._run(component, {**feeds, **adapters.get(component, {})}, trace,
                                                         release=True))
                   for component, feeds in plan.text_inputs.items()}
        conditioning = {**plan.conditioning, **adapters.get(UNET, {})}
        for name, (component, output) in plan.text_feeds().items():
            conditioning[name] = encoded[component][output].astype(np.float32, copy=False)
            if plan.zero_uncond:  # SDXL's force_zeros_for_empty_prompt: zero negative embeddings
                conditioning[name] = np.concatenate([np.zeros_like(conditioning[name][:plan.images]),
                                                     conditioning[name][plan.images:]])
        trace.lap(Stage.TEXT_ENCODER)

        # 2. denoising loop: UNet step → guidance → scheduler step
        latents, previous_x0, steps = plan.latents, None, len(plan.steps)
        for i, t in enumerate(plan.timesteps):
            model_input = plan.model_input(latents, i)
            feeds = {plan.latent_input: model_input,
                     plan.timestep_input: np.full((model_input.shape[0],), float(t), dtype=np.float32), **conditioning}
            trace.lap(Stage.SCHEDULER)
            with trace.transfers.looping():
                if plan.control is not None:  # ControlNets first: their residuals are UNet inputs (timed as the UNet's)
                    residuals = plan.control.residuals(i, model_input, feeds[plan.timestep_input],
                                                       feeds[plan.control.input_names[2]],
                                                       lambda c, f: self._run(c, f, trace, release=i == steps - 1))
                    feeds.update(residuals or {})
                (prediction,) = self._run(UNET, feeds, trace, release=i == steps - 1).values()
            prediction = prediction.astype(np.float32, copy=False)
            trace.lap(Stage.UNET)
            if plan.guided:
                uncond, cond = np.split(prediction, 2)
                prediction = uncond + np.float32(plan.guidance_scale) * (cond - uncond)
                if plan.guidance_rescale:
                    prediction = rescale_guidance(prediction, cond, plan.guidance_rescale)
            noise = plan.noise[i] if plan.noise is not None else None
            latents, previous_x0 = plan.steps[i].apply(prediction, latents, noise, previous_x0)
            latents = plan.blend(latents, i)  # inpainting with a plain UNet: the kept region goes back
            if not np.isfinite(latents).all():
                raise NumericalError(f"unet: latents became non-finite (NaN/Inf) at denoising step {i + 1} of {steps}")
            trace.lap(Stage.SCHEDULER)
            if callback is not None:
                callback(i, steps, latents)

        if not plan.decode:  # output_type="latent": the latents as the UNet sees them
            return latents
        # 3. image decoder: undo the VAE's latent scaling, decode to pixels in [-1, 1]
        latents = latents / np.float32(plan.vae_scaling_factor)
        if plan.vae_shift_factor is not None:
            latents = latents + np.float32(plan.vae_shift_factor)
        pixels = self.decoders[plan.decoder](latents.astype(np.float32), trace.transfers)
        trace.lap(Stage.DECODER)
        return pixels


__all__ = ["HostLoop"]
