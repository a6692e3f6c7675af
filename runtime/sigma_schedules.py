"""Sigma schedules with ComfyUI's scheduler names, from a checkpoint's discrete training sigmas."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..core.backends.diffusers import NoiseSchedule

SCHEDULER_NAMES: tuple[str, ...] = ("normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform")
# ComfyUI computes one sigma more for these samplers and drops the second to last (comfy/samplers.py).
DISCARD_PENULTIMATE_SIGMA: frozenset[str] = frozenset({"uni_pc"})


@dataclass(frozen=True, eq=False)
class TrainingSigmas:
    """The checkpoint's discrete noise levels, ``sigma_t = sqrt((1 - alphabar_t) / alphabar_t)``, ascending.

    Built on the backend's :class:`NoiseSchedule` so that the sigmas we sample at and the sigmas the
    IP-Adapter step range is compared with (``percent_to_sigma``) come from one computation."""

    schedule: NoiseSchedule

    @classmethod
    def from_scheduler_config(cls, config: dict) -> "TrainingSigmas":
        """Build from a diffusers scheduler config (num_train_timesteps, beta_start/end, beta_schedule)."""
        return cls(NoiseSchedule.from_config(config))

    @property
    def sigmas(self) -> torch.Tensor:
        return self.schedule.log_sigmas.exp()

    @property
    def sigma_min(self) -> float:
        return float(self.schedule.log_sigmas[0].exp())

    @property
    def sigma_max(self) -> float:
        return float(self.schedule.log_sigmas[-1].exp())

    def sigma(self, t: float) -> float:
        """Noise level at a (fractional) training timestep, log-linear between neighbours (ComfyUI's rule)."""
        return self.schedule.sigma(t)

    def timestep(self, sigma: float) -> float:
        """Fractional training timestep of a noise level (inverse of :meth:`sigma`, clamped to the range)."""
        log_sigmas = self.schedule.log_sigmas.to(torch.float64)
        log_sigma = math.log(max(float(sigma), 1e-10))
        low = int((log_sigmas <= log_sigma).sum()) - 1
        low = min(max(low, 0), len(log_sigmas) - 2)
        w = (float(log_sigmas[low]) - log_sigma) / (float(log_sigmas[low]) - float(log_sigmas[low + 1]))
        return low + min(max(w, 0.0), 1.0)


def _normal(train: TrainingSigmas, steps: int, sgm: bool = False) -> list[float]:
    last = len(train.sigmas) - 1
    if sgm:  # steps + 1 points, the last (t = 0) replaced by the final 0
        timesteps = torch.linspace(last, 0, steps + 1)[:-1]
    else:
        timesteps = torch.linspace(last, 0, steps)
    return [train.sigma(float(t)) for t in timesteps] + [0.0]


def _simple(train: TrainingSigmas, steps: int) -> list[float]:
    stride = len(train.sigmas) / steps
    return [float(train.sigmas[-(1 + int(i * stride))]) for i in range(steps)] + [0.0]


def _ddim_uniform(train: TrainingSigmas, steps: int) -> list[float]:
    stride = max(len(train.sigmas) // steps, 1)
    picked = [float(train.sigmas[i]) for i in range(1, len(train.sigmas), stride)]
    return [*picked[::-1], 0.0]


def _karras(train: TrainingSigmas, steps: int, rho: float = 7.0) -> list[float]:
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = train.sigma_min ** (1 / rho), train.sigma_max ** (1 / rho)
    return [float(s) for s in (hi + ramp * (lo - hi)) ** rho] + [0.0]


def _exponential(train: TrainingSigmas, steps: int) -> list[float]:
    logs = torch.linspace(math.log(train.sigma_max), math.log(train.sigma_min), steps, dtype=torch.float64)
    return [float(s) for s in logs.exp()] + [0.0]


SCHEDULES: dict[str, Callable[[TrainingSigmas, int], list[float]]] = {
    "normal": _normal,
    "karras": _karras,
    "exponential": _exponential,
    "sgm_uniform": lambda train, steps: _normal(train, steps, sgm=True),
    "simple": _simple,
    "ddim_uniform": _ddim_uniform,
}


def calculate_sigmas(train: TrainingSigmas, scheduler: str, steps: int, sampler: str = "euler") -> torch.Tensor:
    """The ``steps + 1`` sigmas (ending with 0) of a ComfyUI scheduler for this model and sampler."""
    if scheduler not in SCHEDULES:
        raise ValueError(f"KSampler: unknown scheduler '{scheduler}'; expected one of {', '.join(SCHEDULES)}")
    if sampler in DISCARD_PENULTIMATE_SIGMA:
        sigmas = SCHEDULES[scheduler](train, steps + 1)
        sigmas = sigmas[:-2] + sigmas[-1:]
    else:
        sigmas = SCHEDULES[scheduler](train, steps)
    return torch.tensor(sigmas, dtype=torch.float32)


def ksampler_sigmas(train: TrainingSigmas, scheduler: str, sampler: str, steps: int, denoise: float = 1.0,
                    start_step: int | None = None, last_step: int | None = None,
                    force_full_denoise: bool = False) -> torch.Tensor:
    """The sigmas a KSampler / KSamplerAdvanced run walks through (empty: nothing to do)."""
    if denoise is None or denoise > 0.9999:
        sigmas = calculate_sigmas(train, scheduler, steps, sampler)
    elif denoise <= 0.0:
        return torch.zeros(0)
    else:  # img2img: the tail of a longer schedule, so the first sigma matches the strength
        sigmas = calculate_sigmas(train, scheduler, int(steps / denoise), sampler)[-(steps + 1):]
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[:last_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0.0
    if start_step is not None:
        if start_step >= len(sigmas) - 1:
            return torch.zeros(0)
        sigmas = sigmas[start_step:]
    return sigmas
