"""One scheduler step as the linear combination it is.

Every scheduler we implement (DDIM η = 0, Euler, Euler ancestral, DPM-Solver++(2M)) updates the
latents by a linear combination of the current latents, the model output, the predicted x₀ (clipped
where the checkpoint asks), the previous step's x₀ and fresh noise, with scalar coefficients that
depend only on the step index. Written that way, the same step runs in numpy on the host
(`LinearStep.apply`) and as a small ONNX graph on the GPU (`runtime/graphs/`), where the latents
never leave the device: the host only sends each step's dozen coefficients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LinearStep:
    # x₀ = x0_sample · sample + x0_output · model_output, then clipped to ±clip when clip is set
    x0_sample: float
    x0_output: float
    clip: float | None = None
    # next = sample · sample + output · model_output + x0 · x₀ + previous_x0 · x₀(previous step) + noise · ε
    sample: float = 0.0
    output: float = 0.0
    x0: float = 0.0
    previous_x0: float = 0.0
    noise: float = 0.0

    def apply(self, model_output: np.ndarray, sample: np.ndarray, noise: np.ndarray | None = None,
              previous_x0: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(the next latents, this step's x₀), in the dtype of `sample`."""
        f = np.float32
        x0 = f(self.x0_sample) * sample + f(self.x0_output) * model_output
        if self.clip is not None:
            x0 = np.clip(x0, -self.clip, self.clip)
        out = f(self.sample) * sample + f(self.output) * model_output + f(self.x0) * x0
        if self.previous_x0:
            if previous_x0 is None:
                raise ValueError("this step uses the previous step's x0; none was given")
            out = out + f(self.previous_x0) * previous_x0
        if self.noise:
            if noise is None:
                raise ValueError("this step adds fresh noise (one standard normal draw per step); none was given")
            out = out + f(self.noise) * noise
        return out.astype(sample.dtype, copy=False), x0


class LinearScheduler:
    """The `step` and `scale_model_input` every scheduler shares, from its `linear_step(i)` and
    `input_scale(i)`."""

    _previous_x0: np.ndarray | None = None
    #: The first step a run takes (image-to-image starts part way: diffusers' `set_begin_index`);
    #: multistep solvers take their first step at first order.
    begin_index: int = 0

    def linear_step(self, step_index: int) -> LinearStep:
        raise NotImplementedError

    def noising(self, step_index: int) -> tuple[float, float]:
        """(a, b) of diffusers' `add_noise` at step `step_index`'s noise level: noisy = a · x₀ + b · ε
        (how image-to-image starts part way, and how inpainting re-noises the kept region)."""
        raise NotImplementedError

    def input_scale(self, step_index: int) -> float:
        """The factor on the latents that makes the UNet's input at step `step_index`."""
        return 1.0

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        scale = self.input_scale(step_index)
        return sample if scale == 1.0 else (sample * np.float32(scale)).astype(sample.dtype, copy=False)

    def step(self, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        out, self._previous_x0 = self.linear_step(step_index).apply(model_output, sample, noise, self._previous_x0)
        return out


__all__ = ["LinearScheduler", "LinearStep"]
