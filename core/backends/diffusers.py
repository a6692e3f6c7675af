"""The diffusers backend: the headless MODEL handle and the sampling-time UNet patching.

Contract with the sampler (``runtime``'s KSampler) and with ``attach``:

* ``DiffusersModel`` is the MODEL value headless.  It is immutable: nodes that change a model return
  ``model.with_application(app)`` / ``model.replace(...)``; the UNet module itself is shared, never edited
  outside :func:`patched_unet`.
* A sampler wraps its whole denoising loop in ``with patched_unet(model) as state:`` and, before every
  UNet call, sets ``state.sigma`` (the k-diffusion sigma of this step) and ``state.cond_or_uncond``
  (ComfyUI's convention: the UNet batch is ``len(cond_or_uncond)`` equal chunks, 0 = cond chunk,
  1 = uncond chunk; e.g. ``[1, 0]`` for a CFG batch ``cat([uncond, cond])``, ``[0]`` for cfg == 1).
* ``state.latent_hw`` (the latent's height, width, for attention masks) is filled by a forward pre-hook the
  patch puts on the UNet (from each call's ``sample``), so a sampler need not set it; the hook goes with
  the processors.
* On exit the UNet's original attention processors are restored, even on error or interrupt.

How the patch works: every cross-attention (attn2) processor of the UNet, mid block included, is replaced by
an :class:`IPCrossAttnProcessor` for the i-th cross-attention layer in ``unet.attn_processors`` order (the
checkpoint's ``ip_adapter.{2i+1}``).  When no application is active at a call (weight 0, outside its
start/end range) the processor hands the call to the original processor untouched, so the output is exactly
the unpatched one; otherwise it computes the text attention as diffusers' ``AttnProcessor2_0`` does and adds
the image terms of :mod:`core.attention`.  The projection and each layer's image K/V are computed once per
sampling call (:class:`core.application.PreparedApplication`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from ..application import Application, PreparedApplication
from ..attention import ImageAttentionTerm, decoupled_attention
from .common import SIGMA_BEFORE_START, Entry, adapter_label, any_active, image_terms


@dataclass
class SamplingState:
    """What the patched attention needs to know about the current UNet call."""

    sigma: float | None = None
    cond_or_uncond: list[int] = field(default_factory=lambda: [0])
    # (height, width) of the latent the UNet is called on; the patch's UNet pre-hook fills it on every call
    latent_hw: tuple[int, int] | None = None


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


# ---- the training noise schedule: timestep <-> sigma <-> percent of sampling -----------------------------

def _training_betas(config: dict) -> torch.Tensor:
    steps = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        return torch.tensor(config["trained_betas"], dtype=torch.float64)
    start, end = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
    schedule = config.get("beta_schedule", "scaled_linear")
    if schedule == "scaled_linear":  # ComfyUI calls this one "linear"
        return torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float64) ** 2
    if schedule == "linear":
        return torch.linspace(start, end, steps, dtype=torch.float64)
    if schedule == "squaredcos_cap_v2":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999)
                             for i in range(steps)], dtype=torch.float64)
    raise ValueError(f"scheduler_config beta_schedule {schedule!r} is not supported; expected "
                     "'scaled_linear', 'linear', 'squaredcos_cap_v2' or trained_betas")


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """The discrete training schedule of an eps/v model, with ComfyUI's sigma and percent conventions."""

    log_sigmas: torch.Tensor  # float32 [num_train_timesteps]

    @classmethod
    def from_config(cls, config: dict) -> "NoiseSchedule":
        """Build from a diffusers scheduler config (beta_start/beta_end/beta_schedule/num_train_timesteps)."""
        alphas_cumprod = torch.cumprod(1.0 - _training_betas(config), dim=0)
        sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float()
        return cls(sigmas.log())

    def sigma(self, timestep: float) -> float:
        """Sigma at a (possibly fractional) training timestep, interpolating log-sigma linearly."""
        t = min(max(float(timestep), 0.0), len(self.log_sigmas) - 1.0)
        low, high = math.floor(t), math.ceil(t)
        frac = t - low
        log_sigma = (1 - frac) * self.log_sigmas[low] + frac * self.log_sigmas[high]
        return float(log_sigma.exp())

    def percent_to_sigma(self, percent: float) -> float:
        """ComfyUI's percent_to_sigma: 0 -> before the first step, 1 -> 0, else sigma((1-p)*(T-1))."""
        if percent <= 0.0:
            return SIGMA_BEFORE_START
        if percent >= 1.0:
            return 0.0
        return self.sigma((1.0 - percent) * (len(self.log_sigmas) - 1))


# ---- the patch ------------------------------------------------------------------------------------------

def cross_attention_layers(unet: Any) -> list[tuple[str, Any]]:
    """(name, Attention module) of every cross-attention layer, in ``unet.attn_processors`` order."""
    layers = []
    for name in unet.attn_processors:
        if "motion_modules" in name:  # AnimateDiff's temporal attention is never an IP-Adapter layer
            continue
        module = unet.get_submodule(name[: -len(".processor")])
        if getattr(module, "is_cross_attention", False):
            layers.append((name, module))
    return layers


def check_fits(adapter: Any, layers: Sequence[tuple[str, Any]]) -> None:
    """Raise a ValueError naming the adapter when its K/V weights do not fit the UNet's cross-attention."""
    if len(adapter.to_k_ip) != len(layers):
        raise ValueError(f"{adapter_label(adapter)} has K/V weights for {len(adapter.to_k_ip)} "
                         f"cross-attention layers but the UNet has {len(layers)}: it was made for another "
                         "model family (SD1.5 has 16, SDXL 70).")
    for index, (name, module) in enumerate(layers):
        weight = getattr(adapter.to_k_ip[index], "weight", adapter.to_k_ip[index])
        expected = (module.to_k.out_features, module.cross_attention_dim)
        if tuple(weight.shape) != expected:
            raise ValueError(f"{adapter_label(adapter)}: layer {index} ({name}) K weight is "
                             f"{list(weight.shape)} but the UNet needs {list(expected)} (inner width x "
                             f"{module.cross_attention_dim}-d cross-attention); it was made for another model.")


class UNetPatch:
    """Our processors on one UNet's cross-attention layers, fed by one :class:`SamplingState`.

    ``install()`` swaps the processors in, ``remove()`` puts the originals back.  ``set_applications``
    replaces the applications; each application's projection and K/V are cached for the patch's lifetime
    (one sampling call for :func:`patched_unet`; until the next ``set_image`` for ``attach``).
    """

    def __init__(self, unet: Any, scheduler_config: dict | None = None, applications: Sequence[Application] = ()):
        # weak, so that a registry keyed by the UNet (attach) does not keep it alive through its patch
        self._unet = weakref.ref(unet)
        self.state = SamplingState()
        self.schedule = NoiseSchedule.from_config(scheduler_config) if scheduler_config else None
        self.layers = cross_attention_layers(unet)
        self._originals: dict[str, Any] | None = None
        self._hook: Any = None
        self._prepared: list[Entry] = []
        self.set_applications(applications)

    @property
    def unet(self) -> Any:
        """The patched UNet (None once it was garbage-collected)."""
        return self._unet()

    @property
    def installed(self) -> bool:
        return self._originals is not None

    @property
    def applications(self) -> tuple[Application, ...]:
        return tuple(prepared.application for prepared, _, _ in self._prepared)

    def set_applications(self, applications: Sequence[Application]) -> None:
        """Use these applications from the next UNet call on.

        An application that was already here keeps its cached projection and K/V; new ones start empty.
        """
        kept = {id(prepared.application): prepared for prepared, _, _ in self._prepared}
        entries = []
        for application in applications:
            check_fits(application.adapter, self.layers)
            if self.schedule is None:
                start, end = SIGMA_BEFORE_START, 0.0
            else:
                start = self.schedule.percent_to_sigma(application.start_at)
                end = self.schedule.percent_to_sigma(application.end_at)
            prepared = kept.get(id(application))
            if prepared is None or prepared.application is not application:
                prepared = PreparedApplication(application)
            entries.append((prepared, start, end))
        self._prepared = entries

    def install(self) -> None:
        """Replace every cross-attention processor with ours (remembering the originals) and hook the UNet's
        forward to read each call's latent size (for masks)."""
        if self.installed:
            return
        self._originals = {}
        for index, (name, module) in enumerate(self.layers):
            self._originals[name] = module.processor
            module.set_processor(IPCrossAttnProcessor(self, index, module.processor))
        unet = self.unet
        if unet is not None:
            self._hook = unet.register_forward_pre_hook(self._read_latent_size, with_kwargs=True)

    def _read_latent_size(self, module: Any, args: tuple, kwargs: dict) -> None:
        sample = kwargs.get("sample", args[0] if args else None)
        if isinstance(sample, torch.Tensor) and sample.ndim >= 4:
            self.state.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))

    def remove(self) -> None:
        """Put the original processors back and remove the hook."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._originals is None:
            return
        for name, module in self.layers:
            module.set_processor(self._originals[name])
        self._originals = None

    def has_active(self, layer: int) -> bool:
        """Whether any application acts at this layer for the current UNet call (weight != 0, in range)."""
        return any_active(self._prepared, layer, self.state.sigma)

    def active_terms(self, layer: int, batch: int, query: torch.Tensor,
                     grid: tuple[int, int] | None = None) -> list[ImageAttentionTerm]:
        """The image-attention terms of the applications active at this layer and sigma.

        ``query`` is ``[B, heads, L, head_dim]``; ``grid`` is the layer's token grid when the processor knows
        it (4-D hidden states), else masks find it from ``L`` and the latent size of this UNet call.
        """
        state = self.state
        return image_terms(self._prepared, layer, state.sigma, state.cond_or_uncond, batch, query.device,
                           query.dtype, query_len=int(query.shape[2]), latent_hw=state.latent_hw, grid=grid)


class IPCrossAttnProcessor:
    """attn2 processor: diffusers' text attention plus the active IP-Adapter terms of one layer."""

    def __init__(self, patch: UNetPatch, layer: int, original: Any):
        self.patch = patch
        self.layer = layer
        self.original = original

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        if encoder_hidden_states is None or not self.patch.has_active(self.layer):
            extra = {} if temb is None else {"temb": temb}
            return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=attention_mask, **extra)
        if isinstance(encoder_hidden_states, tuple):
            raise RuntimeError("this UNet also has diffusers' own IP-Adapter loaded (encoder_hid_proj); "
                               "call pipe.unload_ip_adapter() before using ipadapter_nodes.attach")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        grid = None
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            grid = (height, width)
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                              is_causal=False)
        text = text.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)

        hidden_states = decoupled_attention(text, query, self.patch.active_terms(self.layer, batch_size, query, grid))

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def patched_unet(model: DiffusersModel) -> Iterator[SamplingState]:
    """Install the model's Applications on its UNet for one sampling call; restore on exit.

    With no applications this is a no-op that still yields a state object.  The projection and every
    layer's image K/V run at most once inside one ``with`` block.
    """
    if not model.applications:
        yield SamplingState()
        return
    patch = UNetPatch(model.unet, model.scheduler_config, model.applications)
    patch.install()
    try:
        yield patch.state
    finally:
        patch.remove()
