"""LoraLoader and LoraLoaderModelOnly headless: ComfyUI's names, inputs, defaults and widget order.

The LoRA becomes a :class:`core.weight_patches.WeightPatch` appended to the MODEL's ``patches`` (the sampler
applies it around the denoising loop) and to the CLIP handle's ``patches`` (applied while encoding).  The
inputs are never changed: new handles are returned, the shared UNet and text encoders stay untouched.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ...core import folders
from .. import lora as lora_files

_STRENGTH = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}


def lora_names() -> list[str]:
    """Model files of the ``loras`` folders (sub-folders included), for the lora_name combo."""
    return folders.filter_extensions(folders.get_filename_list("loras"), folders.MODEL_EXTENSIONS)


def apply_lora(model: Any, clip: Any, lora_name: str, strength_model: float, strength_clip: float,
               node: str = "LoraLoader") -> tuple[Any, Any]:
    """(MODEL, CLIP) with the LoRA ``lora_name`` of the ``loras`` folder added at these strengths.

    A strength of 0 adds nothing for that side (as in ComfyUI). ``clip`` may be None (model only).
    """
    use_model, use_clip = strength_model != 0, clip is not None and strength_clip != 0
    if not use_model and not use_clip:
        return model, clip
    path = folders.get_full_path_or_raise("loras", lora_name, node=node)
    lora = lora_files.load_lora_file(path)
    unet_patch, clip_patch = lora_files.lora_patches(
        lora, model.unet if use_model else None, clip.text_encoders if use_clip else None,
        strength_model, strength_clip)
    if use_model and len(unet_patch):
        model = model.replace(patches=tuple(model.patches) + (unet_patch,))
    if use_clip and len(clip_patch):
        clip = dataclasses.replace(clip, patches=tuple(clip.patches) + (clip_patch,))
    return model, clip


class LoraLoader:
    """Load LoRA: patch the diffusion model and the text encoder with a LoRA file."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model the LoRA will be applied to."}),
            "clip": ("CLIP", {"tooltip": "The CLIP model the LoRA will be applied to."}),
            "lora_name": (lora_names(), {"tooltip": "The name of the LoRA."}),
            "strength_model": ("FLOAT", {**_STRENGTH, "tooltip": "How strongly to modify the diffusion model. "
                                         "This value can be negative."}),
            "strength_clip": ("FLOAT", {**_STRENGTH, "tooltip": "How strongly to modify the CLIP model. This "
                                        "value can be negative."}),
        }}

    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The modified diffusion model.", "The modified CLIP model.")
    FUNCTION = "load_lora"
    CATEGORY = "loaders"
    DESCRIPTION = ("LoRAs are used to modify diffusion and CLIP models, altering the way in which latents are "
                   "denoised such as applying styles. Multiple LoRA nodes can be linked together.")

    def load_lora(self, model, clip, lora_name: str, strength_model: float, strength_clip: float):
        return apply_lora(model, clip, lora_name, strength_model, strength_clip, node="LoraLoader")


class LoraLoaderModelOnly:
    """LoraLoaderModelOnly: patch only the diffusion model."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "lora_name": (lora_names(),),
            "strength_model": ("FLOAT", dict(_STRENGTH)),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_lora_model_only"
    CATEGORY = "loaders"

    def load_lora_model_only(self, model, lora_name: str, strength_model: float):
        return (apply_lora(model, None, lora_name, strength_model, 0.0, node="LoraLoaderModelOnly")[0],)


NODE_CLASS_MAPPINGS = {"LoraLoader": LoraLoader, "LoraLoaderModelOnly": LoraLoaderModelOnly}
NODE_DISPLAY_NAME_MAPPINGS = {"LoraLoader": "Load LoRA"}
