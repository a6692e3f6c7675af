"""Conditioning nodes headless: ConditioningSetMask, ConditioningCombine, ControlNetLoader,
ControlNetApplyAdvanced (ComfyUI's names, inputs, defaults and widget order; the sampler does the work)."""
from __future__ import annotations

import torch

from .. import controlnet


def _with_values(conditioning: list, values: dict) -> list:
    """A copy of the CONDITIONING list with ``values`` set on every entry's options (tensors shared)."""
    return [[cond, {**options, **values}] for cond, options in conditioning]


class ConditioningSetMask:
    """Conditioning (Set Mask): the entries act only where the mask is, with ``strength``."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": ("CONDITIONING",),
            "mask": ("MASK",),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
            "set_cond_area": (["default", "mask bounds"],),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "append"
    CATEGORY = "conditioning"

    def append(self, conditioning: list, mask: torch.Tensor, strength: float, set_cond_area: str) -> tuple[list]:
        if mask.ndim < 3:
            mask = mask.unsqueeze(0)
        return (_with_values(conditioning, {"mask": mask, "set_area_to_bounds": set_cond_area != "default",
                                            "mask_strength": float(strength)}),)


class ConditioningCombine:
    """Conditioning (Combine): both lists' entries, each evaluated and blended by the sampler."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning_1": ("CONDITIONING",), "conditioning_2": ("CONDITIONING",)}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "combine"
    CATEGORY = "conditioning"

    def combine(self, conditioning_1: list, conditioning_2: list) -> tuple[list]:
        return (conditioning_1 + conditioning_2,)


class ControlNetLoader:
    """Load ControlNet Model: a diffusers ControlNet folder or single file from the ``controlnet`` folder."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"control_net_name": (controlnet.list_controlnets(),)}}

    RETURN_TYPES = ("CONTROL_NET",)
    FUNCTION = "load_controlnet"
    CATEGORY = "loaders"

    def load_controlnet(self, control_net_name: str) -> tuple[controlnet.ControlNetHandle]:
        return (controlnet.load_controlnet(control_net_name),)


class ControlNetApplyAdvanced:
    """Apply ControlNet: add a ControlNet with its hint image, strength and step range to every entry of both
    conditionings (chained after any ControlNet already there)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "control_net": ("CONTROL_NET",),
            "image": ("IMAGE",),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}),
        }, "optional": {"vae": ("VAE",)}}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "apply_controlnet"
    CATEGORY = "conditioning/controlnet"

    def apply_controlnet(self, positive: list, negative: list, control_net: controlnet.ControlNetHandle,
                         image: torch.Tensor, strength: float, start_percent: float, end_percent: float,
                         vae=None) -> tuple[list, list]:
        # The VAE input only matters for ControlNets that take latent hints (not SD1.5/SDXL ones).
        if strength == 0:
            return (positive, negative)
        # One new link per distinct previous control, shared by both sides, as ComfyUI does: entries that
        # shared a chain before still share one (and can share a UNet call).
        links: dict[int, controlnet.ControlHint] = {}
        out = []
        for conditioning in (positive, negative):
            entries = []
            for cond, options in conditioning:
                previous = options.get("control")
                if id(previous) not in links:
                    links[id(previous)] = controlnet.ControlHint(control_net, image, float(strength),
                                                                 float(start_percent), float(end_percent), previous)
                entries.append([cond, {**options, "control": links[id(previous)], "control_apply_to_uncond": False}])
            out.append(entries)
        return (out[0], out[1])


NODE_CLASS_MAPPINGS = {
    "ConditioningSetMask": ConditioningSetMask,
    "ConditioningCombine": ConditioningCombine,
    "ControlNetLoader": ControlNetLoader,
    "ControlNetApplyAdvanced": ControlNetApplyAdvanced,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ConditioningSetMask": "Conditioning (Set Mask)",
    "ConditioningCombine": "Conditioning (Combine)",
    "ControlNetLoader": "Load ControlNet Model",
    "ControlNetApplyAdvanced": "Apply ControlNet",
}
