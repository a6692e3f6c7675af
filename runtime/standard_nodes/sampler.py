"""KSampler and KSamplerAdvanced for headless runs: ComfyUI's inputs, defaults and widget order."""
from __future__ import annotations

from .. import sampling, sigma_schedules


def _sampling_inputs(seed_name: str) -> dict:
    """The inputs both samplers share, in ComfyUI's widget order from the seed to the latent."""
    return {
        seed_name: ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
        "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
        "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
        "sampler_name": (list(sampling.SAMPLER_NAMES),),
        "scheduler": (list(sigma_schedules.SCHEDULER_NAMES),),
        "positive": ("CONDITIONING",),
        "negative": ("CONDITIONING",),
        "latent_image": ("LATENT",),
    }


class KSampler:
    """Denoise a latent with a model, positive and negative conditioning (ComfyUI's KSampler)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL",),
            **_sampling_inputs("seed"),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    CATEGORY = "sampling"

    def sample(self, model, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
               positive: list, negative: list, latent_image: dict, denoise: float = 1.0) -> tuple[dict]:
        return (sampling.sample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                latent_image, denoise=denoise),)


class KSamplerAdvanced:
    """KSampler with a step window: run steps ``start_at_step..end_at_step`` of a ``steps`` schedule,
    optionally without adding noise and/or returning the latent still noisy (ComfyUI's KSamplerAdvanced)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL",),
            "add_noise": (["enable", "disable"],),
            **_sampling_inputs("noise_seed"),
            "start_at_step": ("INT", {"default": 0, "min": 0, "max": 10000}),
            "end_at_step": ("INT", {"default": 10000, "min": 0, "max": 10000}),
            "return_with_leftover_noise": (["disable", "enable"],),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    CATEGORY = "sampling"

    def sample(self, model, add_noise: str, noise_seed: int, steps: int, cfg: float, sampler_name: str,
               scheduler: str, positive: list, negative: list, latent_image: dict, start_at_step: int,
               end_at_step: int, return_with_leftover_noise: str, denoise: float = 1.0) -> tuple[dict]:
        return (sampling.sample(model, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                latent_image, denoise=denoise, add_noise=add_noise == "enable",
                                start_step=start_at_step, last_step=end_at_step,
                                force_full_denoise=return_with_leftover_noise != "enable"),)


NODE_CLASS_MAPPINGS = {"KSampler": KSampler, "KSamplerAdvanced": KSamplerAdvanced}
NODE_DISPLAY_NAME_MAPPINGS = {"KSampler": "KSampler", "KSamplerAdvanced": "KSampler (Advanced)"}
