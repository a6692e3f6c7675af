"""The diffusers backend: the headless MODEL handle and the sampling-time UNet patching.

Contract with the sampler (``runtime``'s KSampler) and with ``attach``:

* ``DiffusersModel`` is the MODEL value headless.  It is immutable: nodes that change a model return
  ``model.with_application(app)`` / ``model.replace(...)``; the UNet module itself is shared, never edited
  outside :func:`patched_unet`.
* A sampler wraps its whole denoising loop in ``with patched_unet(model) as state:`` and, before every
  UNet call, sets ``state.sigma`` (the k-diffusion sigma of this step) and ``state.cond_or_uncond``
  (ComfyUI's convention: the UNet batch is ``len(cond_or_uncond)`` equal chunks, 0 = cond chunk,
  1 = uncond chunk; e.g. ``[1, 0]`` for a CFG batch ``cat([uncond, cond])``, ``[0]`` for cfg == 1).
* On exit the UNet's original attention processors are restored, even on error or interrupt.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator


@dataclass
class SamplingState:
    """What the patched attention needs to know about the current UNet call."""

    sigma: float | None = None
    cond_or_uncond: list[int] = field(default_factory=lambda: [0])


@dataclass(frozen=True)
class DiffusersModel:
    """MODEL when running headless: a diffusers UNet plus what was applied to it.

    ``family`` is ``"sd15"`` or ``"sdxl"``; ``scheduler_config`` is the training noise schedule of the
    checkpoint (diffusers scheduler config dict: num_train_timesteps, beta_start, beta_end,
    beta_schedule, prediction_type, ...). ``applications`` are the engine's IP-Adapter Applications, in
    the order they were applied. ``patches`` holds other model patches (LoRA, ...) as opaque entries.
    """

    unet: Any
    family: str
    scheduler_config: dict
    applications: tuple = ()
    patches: tuple = ()
    name: str = ""

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    def replace(self, **changes) -> "DiffusersModel":
        return dataclasses.replace(self, **changes)

    def clone(self) -> "DiffusersModel":
        return dataclasses.replace(self)

    def with_application(self, application) -> "DiffusersModel":
        return dataclasses.replace(self, applications=self.applications + (application,))


@contextlib.contextmanager
def patched_unet(model: DiffusersModel) -> Iterator[SamplingState]:
    """Install the model's Applications on its UNet for one sampling call; restore on exit.

    With no applications this is a no-op that still yields a state object.
    """
    state = SamplingState()
    if not model.applications:
        yield state
        return
    raise NotImplementedError("IP-Adapter attention patching arrives with the engine")
