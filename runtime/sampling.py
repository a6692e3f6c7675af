"""Headless sampling with ComfyUI's KSampler semantics on a diffusers UNet.

What follows ComfyUI (``comfy/samplers.py``, ``comfy/sample.py``, ``comfy/k_diffusion/sampling.py``):
sigma schedules computed from the checkpoint's discrete training sigmas; ``denoise`` < 1 keeps the last
``steps`` sigmas of a ``steps / denoise`` schedule; KSamplerAdvanced's ``start_step`` / ``last_step`` /
``force_full_denoise``; the initial noise (one CPU generator seeded with ``seed`` for the whole batch, or per
``batch_index``); the noise scaling at the first sigma; CFG on the denoised prediction; the inpainting
``noise_mask``.  The loop works in k-diffusion space (``x = x0 + sigma * eps``).

Which code computes each step (ComfyUI spelling → implementation):

=================  ===========================================================================================
euler              diffusers ``EulerDiscreteScheduler`` driven with our sigmas (``set_timesteps(sigmas=...)``)
ddim               ComfyUI's "ddim" *is* its Euler sampler (DDIM with eta 0 is the Euler step in sigma space),
                   so the same ``EulerDiscreteScheduler`` path; with a noise_mask the kept region is noised
                   with noise of seed + 1, as ComfyUI's "random" inpaint option does
dpmpp_2m           diffusers ``DPMSolverMultistepScheduler`` (dpmsolver++, order 2, midpoint); our sigmas are
                   installed on it after ``set_timesteps`` (it only accepts integer timesteps), x converted to
                   its variance-preserving space and back
dpmpp_2m_sde       the same scheduler with ``sde-dpmsolver++``; its per-step Gaussian noise comes from a
                   generator seeded with ``seed`` (ComfyUI draws from a Brownian tree: same distribution,
                   other numbers)
uni_pc             diffusers ``UniPCMultistepScheduler`` (bh1, order 3, lower order at the end), sigmas
                   installed like dpmpp_2m; ComfyUI's discard-the-penultimate-sigma rule applies
euler_ancestral    own k-diffusion update (eta 1): diffusers' ``EulerAncestralDiscreteScheduler`` cannot take
                   custom sigmas nor a denoised prediction; ancestral noise from a generator seeded with ``seed``
lcm                own update (ComfyUI's ``sample_lcm``: jump to the prediction, re-noise to the next sigma);
                   diffusers' ``LCMScheduler`` adds consistency-model boundary scalings ComfyUI's lcm does not
=================  ===========================================================================================

The UNet timestep of a sigma is interpolated in log-sigma between the training timesteps (k-diffusion's
``sigma_to_t``, also what diffusers' Euler uses); ComfyUI itself rounds to the nearest training timestep.
Conditioning (:mod:`runtime.conditioning`): every entry of a CONDITIONING list is run and the predictions are
blended per pixel by ``strength × mask`` weights normalised by their sum, as ComfyUI's ``calc_cond_batch``;
areas ("mask bounds") run the UNet on their crop; timestep ranges switch entries off; entries carrying a
ControlNet (:mod:`runtime.controlnet`) add its residuals to their UNet call; 9-channel inpainting UNets get the
mask and masked-image latent concatenated to their input.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.backends.diffusers import DiffusersModel, patched_unet
from . import conditioning
from .conditioning import repeat_to_batch
from .controlnet import ControlRun
from .sigma_schedules import TrainingSigmas, ksampler_sigmas

SAMPLER_NAMES: tuple[str, ...] = (
    "euler", "euler_ancestral", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "lcm", "uni_pc")


# ------------------------------------------------------------------------------------------------- noise
def prepare_noise(samples: torch.Tensor, seed: int, batch_index: list[int] | None = None) -> torch.Tensor:
    """ComfyUI's initial noise: one CPU generator seeded with ``seed``; with ``batch_index`` (a latent cut
    from a bigger batch) each latent gets the noise it had at its index in the original batch."""
    generator = torch.manual_seed(seed)
    if batch_index is None:
        return torch.randn(samples.shape, dtype=torch.float32, generator=generator, device="cpu")
    one = [1, *samples.shape[1:]]
    drawn = [torch.randn(one, dtype=torch.float32, generator=generator, device="cpu")
             for _ in range(max(batch_index) + 1)]
    return torch.cat([drawn[i] for i in batch_index], dim=0)


def prepare_mask(noise_mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A pixel-size ``noise_mask`` [B,1,H,W] (or [B,H,W]) as a latent-size mask [B,C,h,w] (bilinear)."""
    mask = noise_mask.reshape(-1, 1, noise_mask.shape[-2], noise_mask.shape[-1]).to(torch.float32)
    mask = F.interpolate(mask, size=tuple(shape[2:]), mode="bilinear")
    return repeat_to_batch(mask.expand(-1, shape[1], -1, -1), shape[0])


# --------------------------------------------------------------------------------------------- denoiser
def unet_in_channels(unet) -> int:
    """Input channels of the UNet's first convolution: 4, or 9 for inpainting UNets (read from the weights)."""
    conv_in = getattr(unet, "conv_in", None)
    if conv_in is not None and hasattr(conv_in, "in_channels"):
        return int(conv_in.in_channels)
    return int(getattr(getattr(unet, "config", None), "in_channels", 4))


class Denoiser:
    """``x, sigma → denoised x0`` with CFG, as ComfyUI's ``sampling_function``: the entries of both sides
    are run in as few UNet calls as possible (entries with the same area and ControlNet share one call on
    ``cat(chunks)``, uncond chunks first: ``cond_or_uncond`` [1.., 0..]); the negative side is skipped at
    cfg 1.  See :mod:`runtime.conditioning` for how the entries are weighted."""

    def __init__(self, model: DiffusersModel, train: TrainingSigmas, positive: list, negative: list,
                 cfg: float, shape: torch.Size, latent_image: torch.Tensor | None = None,
                 denoise_mask: torch.Tensor | None = None):
        if model.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"KSampler: model '{model.name}' predicts '{model.prediction_type}'; "
                             "expected 'epsilon' or 'v_prediction'")
        self.model, self.train, self.cfg = model, train, float(cfg)
        self.calls = 0
        self.in_channels = unet_in_channels(model.unet)
        if self.in_channels not in (4, 9):
            raise ValueError(f"KSampler: model '{model.name}' takes {self.in_channels} input channels; expected 4 "
                             "(a normal UNet) or 9 (an inpainting UNet: latent + mask + masked image latent)")
        args = (model.family, shape, train.schedule, self.in_channels, latent_image, denoise_mask)
        self.cond = conditioning.prepare_entries(positive, conditioning.COND, *args)
        self.uncond = ([] if math.isclose(self.cfg, 1.0)
                       else conditioning.prepare_entries(negative, conditioning.UNCOND, *args))
        if self.uncond:
            conditioning.pair_areas(self.cond, self.uncond)
        self.entries = self.uncond + self.cond
        param = next(model.unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.controls = {id(e.control): ControlRun(e.control, train.schedule, model.family)
                         for e in self.entries if e.control is not None}
        self._inputs: dict[tuple, tuple] = {}

    def _batch_inputs(self, batch: list) -> tuple:
        """(context, added, concat) of a UNet batch; the same batches recur every step, so they are cached."""
        key = tuple(id(e) for e in batch)
        if key not in self._inputs:
            to = dict(device=self.device, dtype=self.dtype)
            context = conditioning.cat_contexts([e.context for e in batch]).to(**to)
            added = None
            if self.model.family == "sdxl":
                added = {k: torch.cat([e.added[k] for e in batch]).to(**to) for k in ("text_embeds", "time_ids")}
            concat = None
            if self.in_channels == 9:
                concat = torch.cat([conditioning.crop(e.concat, e.area) for e in batch]).to(**to)
            self._inputs[key] = (context, added, concat)
        return self._inputs[key]

    def _run(self, batch: list, x_in: torch.Tensor, sigma: float, state) -> torch.Tensor:
        n = len(batch)
        sample = conditioning.crop(x_in, batch[0].area).repeat(n, 1, 1, 1)
        context, added, concat = self._batch_inputs(batch)
        t = torch.full((sample.shape[0],), self.train.timestep(sigma), device=self.device, dtype=torch.float32)
        state.sigma, state.cond_or_uncond = float(sigma), [e.side for e in batch]
        extra = {}
        control = batch[0].control
        if control is not None:
            residuals = self.controls[id(control)].residuals(sample, t, context, added, sigma, n)
            if residuals is not None:
                extra = {"down_block_additional_residuals": residuals[0],
                         "mid_block_additional_residual": residuals[1]}
        if getattr(self.model.unet, "is_video_unet", False):
            extra["batch_chunks"] = n  # the frames of each cond/uncond chunk form one video
        unet_in = sample if concat is None else torch.cat([sample, concat], dim=1)
        out = self.model.unet(unet_in, t, encoder_hidden_states=context, added_cond_kwargs=added,
                              return_dict=False, **extra)[0]
        self.calls += 1
        return out.to(torch.float32)

    def __call__(self, x: torch.Tensor, sigma: float, state) -> torch.Tensor:
        # c_in = 1 / sqrt(sigma² + 1), written as a division: bit-equal to diffusers' scale_model_input
        x_in = (x / math.sqrt(sigma ** 2 + 1.0)).to(self.device, self.dtype)
        blends = {side: conditioning.Blend(x.to(self.device, torch.float32))
                  for side in (conditioning.COND, conditioning.UNCOND)}
        for batch in conditioning.unet_batches([e for e in self.entries if e.active(sigma)]):
            for entry, prediction in zip(batch, self._run(batch, x_in, sigma, state).chunk(len(batch))):
                blends[entry.side].add(prediction, entry.mult, entry.area)
        # Guidance is linear and the prediction → x0 map is affine, so mixing the raw predictions first and
        # weighting x by the coverage equals ComfyUI's blend of x0 predictions (0 where nothing covers a pixel).
        mixed, cover = blends[conditioning.COND].result()
        if self.uncond:
            uncond, uncond_cover = blends[conditioning.UNCOND].result()
            mixed = uncond + self.cfg * (mixed - uncond)
            cover = uncond_cover + self.cfg * (cover - uncond_cover)
        x = x.to(self.device, torch.float32)
        if self.model.prediction_type == "epsilon":
            return x * cover - sigma * mixed
        # v-prediction with sigma_data 1, in k-diffusion's parametrisation
        return x * cover / (sigma ** 2 + 1.0) - mixed * sigma / math.sqrt(sigma ** 2 + 1.0)


# ---------------------------------------------------------------------------------------------- steppers
Stepper = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]  # (i, x at sigma_i, denoised) → x at sigma_i+1


def _scheduler_stepper(scheduler, sigmas: torch.Tensor, train: TrainingSigmas, variance_preserving: bool,
                       generator: torch.Generator) -> Stepper:
    """Drive a diffusers scheduler (``prediction_type="sample"``: it is fed our denoised x0) along ``sigmas``.

    Multistep schedulers keep x in variance-preserving form, ``x_k / sqrt(1 + sigma²)``; we convert at each
    step so the loop stays in k-diffusion space."""
    steps = len(sigmas) - 1
    # Install our schedule after set_timesteps built the solver state (history, warm-up counters).
    scheduler.sigmas = sigmas.to(torch.float32).cpu()
    scheduler.timesteps = torch.tensor([train.timestep(float(s)) for s in sigmas[:-1]], dtype=torch.float32)
    scheduler.num_inference_steps = steps
    scheduler.set_begin_index(0)
    scheduler.is_scale_input_called = True  # Euler checks it; our denoiser applies c_in itself
    scale = (sigmas.to(torch.float64) ** 2 + 1).sqrt().tolist()
    lands_on_zero = [float(s) == 0.0 for s in sigmas]
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}

    def step(i: int, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        if lands_on_zero[i + 1]:
            # Landing on sigma 0 every rule here reduces to the prediction itself; UniPC's bh1 coefficients
            # would compute it as 0 * inf (NaN), so take it directly.
            return denoised
        t = scheduler.timesteps[i]
        if not variance_preserving:
            return scheduler.step(denoised, t, x, return_dict=False, **extra)[0]
        x_next = scheduler.step(denoised, t, x / scale[i], return_dict=False, **extra)[0]
        return x_next * scale[i + 1]

    return step


def _euler_ancestral(sigmas: torch.Tensor, generator: torch.Generator) -> Stepper:
    """k-diffusion's ancestral Euler, eta 1: step down to sigma_down, add fresh noise of size sigma_up."""
    def step(i: int, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        up = min(s_next, math.sqrt(max(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2, 0.0)))
        down = math.sqrt(max(s_next ** 2 - up ** 2, 0.0))
        if down == 0.0:
            return denoised
        x = x + (x - denoised) / s * (down - s)
        return x + _randn(x, generator) * up
    return step


def _lcm(sigmas: torch.Tensor, generator: torch.Generator) -> Stepper:
    """ComfyUI's lcm: take the prediction, then noise it to the next sigma with fresh noise."""
    def step(i: int, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        s_next = float(sigmas[i + 1])
        return denoised if s_next <= 0 else denoised + _randn(denoised, generator) * s_next
    return step


def _randn(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Drawn on the CPU so a seed gives the same numbers whatever device the UNet runs on.
    return torch.randn(like.shape, generator=generator, dtype=torch.float32).to(like.device, like.dtype)


def make_stepper(sampler: str, sigmas: torch.Tensor, train: TrainingSigmas, seed: int) -> Stepper:
    """The update rule of a ComfyUI sampler name along ``sigmas`` (see the module docstring)."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

    generator = torch.Generator(device="cpu").manual_seed(seed)
    steps = len(sigmas) - 1
    final = "zero" if float(sigmas[-1]) == 0.0 else "sigma_min"
    if sampler in ("euler", "ddim"):
        scheduler = EulerDiscreteScheduler(prediction_type="sample")
        scheduler.set_timesteps(sigmas=sigmas.tolist())
        return _scheduler_stepper(scheduler, sigmas, train, False, generator)
    if sampler in ("dpmpp_2m", "dpmpp_2m_sde"):
        scheduler = DPMSolverMultistepScheduler(
            algorithm_type="dpmsolver++" if sampler == "dpmpp_2m" else "sde-dpmsolver++", solver_order=2,
            solver_type="midpoint", prediction_type="sample", final_sigmas_type=final,
            # k-diffusion drops to first order only for the step that lands on sigma 0
            lower_order_final=False, euler_at_final=False)
        scheduler.set_timesteps(num_inference_steps=steps)
        return _scheduler_stepper(scheduler, sigmas, train, True, generator)
    if sampler == "uni_pc":
        scheduler = UniPCMultistepScheduler(
            solver_order=max(1, min(3, steps - 1)), solver_type="bh1", predict_x0=True, lower_order_final=True,
            prediction_type="sample", final_sigmas_type=final)
        scheduler.set_timesteps(num_inference_steps=steps)
        return _scheduler_stepper(scheduler, sigmas, train, True, generator)
    if sampler == "euler_ancestral":
        return _euler_ancestral(sigmas, generator)
    if sampler == "lcm":
        return _lcm(sigmas, generator)
    raise ValueError(f"KSampler: unknown sampler_name '{sampler}'; expected one of {', '.join(SAMPLER_NAMES)}")


# -------------------------------------------------------------------------------------------------- loop
def _interrupt_check() -> Callable[[], None]:
    try:  # the executor is optional: sampling also runs without it (tests, Python use)
        from . import executor
    except ImportError:
        return lambda: None
    return getattr(executor, "check_interrupted", lambda: None)


def sample(model: DiffusersModel, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
           positive: list, negative: list, latent: dict, denoise: float = 1.0, add_noise: bool = True,
           start_step: int | None = None, last_step: int | None = None,
           force_full_denoise: bool = False) -> dict:
    """Denoise a LATENT like ComfyUI's ``common_ksampler``; returns a new LATENT (other keys kept)."""
    if sampler_name not in SAMPLER_NAMES:
        raise ValueError(f"KSampler: unknown sampler_name '{sampler_name}'; expected one of "
                         f"{', '.join(SAMPLER_NAMES)}")
    latent_image = latent["samples"].to(torch.float32)
    train = TrainingSigmas.from_scheduler_config(model.scheduler_config)
    sigmas = ksampler_sigmas(train, scheduler, sampler_name, steps, denoise, start_step, last_step,
                             force_full_denoise)
    out = dict(latent)
    if len(sigmas) < 2:  # denoise 0, or start_at_step past the schedule: nothing to do
        out["samples"] = latent["samples"]
        return out
    if add_noise:
        noise = prepare_noise(latent_image, seed, latent.get("batch_index"))
    else:
        noise = torch.zeros_like(latent_image)
    mask = latent.get("noise_mask")
    mask = None if mask is None else prepare_mask(mask, latent_image.shape)
    denoiser = Denoiser(model, train, positive, negative, cfg, latent_image.shape, latent_image, mask)
    device = denoiser.device
    latent_image, noise = latent_image.to(device), noise.to(device)
    mask = None if mask is None else mask.to(device)
    blend_noise = noise
    if mask is not None and sampler_name == "ddim":  # ComfyUI's ddim = euler with "random" inpaint noise
        blend_noise = torch.randn(latent_image.shape, generator=torch.manual_seed(seed + 1)).to(device)
    stepper = make_stepper(sampler_name, sigmas, train, seed)
    sigma0 = float(sigmas[0])
    # ComfyUI's noise_scaling: full-strength runs start from variance sqrt(1 + sigma²) noise
    full = math.isclose(sigma0, train.sigma_max, rel_tol=1e-5) or sigma0 > train.sigma_max
    x = latent_image + noise * (math.sqrt(1.0 + sigma0 ** 2) if full else sigma0)
    check_interrupted = _interrupt_check()
    with contextlib.ExitStack() as stack:
        # model patches (LoRA weights, ...) hold for the whole call; see DiffusersModel.patches
        for patch in model.patches:
            stack.enter_context(patch.applied(model.unet))
        state = stack.enter_context(patched_unet(model))
        for i in tqdm(range(len(sigmas) - 1), desc="KSampler", leave=False):
            check_interrupted()
            sigma = float(sigmas[i])
            if mask is not None:  # keep the unmasked part on the original latent's noised trajectory
                x = x * mask + (latent_image + blend_noise * sigma) * (1 - mask)
            denoised = denoiser(x, sigma, state)
            if mask is not None:
                denoised = denoised * mask + latent_image * (1 - mask)
            x = stepper(i, x, denoised)
    out["samples"] = x.to("cpu", torch.float32)
    return out
