"""The training noise schedule and the timestep/sigma helpers every sampler here shares.

Each function mirrors the diffusers code of the same purpose (cited per function) so that a
scheduler built from a checkpoint's `scheduler_config.json` walks the same timesteps as diffusers.
Everything is numpy in float64; samples stay in their own dtype.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np

from ..errors import InvalidRequestError

C = TypeVar("C")


@dataclasses.dataclass(frozen=True)
class TrainingScheduleConfig:
    """The fields every scheduler shares: how the checkpoint was trained, and how to space steps."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: list[float] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    def alphas_cumprod(self, terminal_floor: bool = True) -> np.ndarray:
        """`terminal_floor`: with zero terminal SNR, put ᾱ_T at 2⁻²⁴ instead of 0 (what diffusers'
        sigma-based schedulers do, to avoid an infinite σ; its DDIM keeps 0)."""
        return alphas_cumprod(
            self.num_train_timesteps, self.beta_start, self.beta_end, self.beta_schedule, self.trained_betas,
            self.rescale_betas_zero_snr, terminal_floor,
        )


def config_from_dict(cls: type[C], raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> C:
    """Build a frozen config dataclass from a diffusers scheduler config.

    Like diffusers' `from_config`: keys the class does not know are ignored (a PNDM config can
    build a DDIM scheduler), keys it does not find take the class's own defaults.
    """
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {k: v for k, v in raw.items() if k in known}
    values.update(overrides or {})
    return cls(**values)


def require(field: str, value: Any, allowed: tuple[Any, ...]) -> None:
    """Refuse a config value the numpy schedulers do not implement, naming the field."""
    if value not in allowed:
        raise InvalidRequestError(
            f"scheduler.{field}", f"{value!r} is not supported; allowed: {', '.join(map(repr, allowed))}"
        )


def alphas_cumprod(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: list[float] | None = None,
    rescale_betas_zero_snr: bool = False,
    terminal_floor: bool = True,
) -> np.ndarray:
    """ᾱ_t for t = 0..T-1 (diffusers `DDPMScheduler.__init__`)."""
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float64)
    elif beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float32)
    elif beta_schedule == "scaled_linear":  # the latent-diffusion schedule
        betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, improved DDPM
        betas = _cosine_betas(num_train_timesteps)
    else:
        raise InvalidRequestError(
            "scheduler.beta_schedule",
            f"{beta_schedule!r} is not supported; allowed: 'linear', 'scaled_linear', 'squaredcos_cap_v2'",
        )
    if rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    # diffusers keeps ᾱ in float32 (torch's cumprod accumulates in double, then rounds); so do we,
    # or the smallest noise levels drift apart by 1e-5 relative and rounded timesteps can differ.
    cumprod = np.cumprod((1.0 - betas).astype(np.float32).astype(np.float64)).astype(np.float32)
    if rescale_betas_zero_snr and terminal_floor:
        cumprod[-1] = 2.0**-24  # as diffusers' sigma schedulers: avoid an infinite sigma at the last step
    return cumprod.astype(np.float64)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], dtype=np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1,
    in float32 like diffusers (in float64 the smallest ᾱ differ by 2e-5 relative)."""
    betas = np.asarray(betas, dtype=np.float32)
    sqrt_ab = np.sqrt(np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def spaced_timesteps(
    spacing: str, num_train_timesteps: int, num_inference_steps: int, steps_offset: int, dtype: type = np.int64
) -> np.ndarray:
    """Descending timesteps for `num_inference_steps` (Lin et al. 2023, Table 2: linspace/leading/trailing)."""
    t_max = num_train_timesteps
    if spacing == "linspace":
        steps = np.linspace(0, t_max - 1, num_inference_steps)[::-1]
        return (steps.round() if dtype == np.int64 else steps).astype(dtype)
    if spacing == "leading":
        ratio = t_max // num_inference_steps
        return ((np.arange(num_inference_steps) * ratio).round()[::-1] + steps_offset).astype(dtype)
    if spacing == "trailing":
        ratio = t_max / num_inference_steps
        return (np.round(np.arange(t_max, 0, -ratio)) - 1).astype(dtype)
    raise InvalidRequestError(
        "scheduler.timestep_spacing", f"{spacing!r} is not supported; allowed: 'linspace', 'leading', 'trailing'"
    )


def sigmas_from_alphas(cumprod: np.ndarray) -> np.ndarray:
    """σ_t = sqrt((1 − ᾱ_t) / ᾱ_t), the noise level of the variance-exploding view (Karras et al. 2022)."""
    c = cumprod.astype(np.float32)  # float32 like diffusers, see `alphas_cumprod`
    return np.sqrt((1.0 - c) / c)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, "Elucidating the Design Space…", eq. 5."""
    ramp = np.linspace(0, 1, n)
    lo, hi = float(sigma_min) ** (1 / rho), float(sigma_max) ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timestep of a noise level, by log-linear interpolation (diffusers `_sigma_to_t`)."""
    sigma = np.asarray(sigma, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigma.shape)
