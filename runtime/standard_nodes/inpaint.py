"""Inpainting nodes headless: VAEEncodeForInpaint and SetLatentNoiseMask (ComfyUI's names, inputs, defaults)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def grow_mask(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Grow a binary-ish mask ``[B,1,H,W]`` by ``pixels`` (a box filter over the rounded mask, clamped to
    0..1); the result may be one pixel larger for even sizes and is cut by the caller, as in ComfyUI."""
    if pixels == 0:
        return mask
    kernel = torch.ones((1, 1, pixels, pixels), dtype=mask.dtype)
    return torch.clamp(F.conv2d(mask.round(), kernel, padding=math.ceil((pixels - 1) / 2)), 0, 1)


class VAEEncodeForInpaint:
    """VAE Encode (for Inpainting): the masked pixels become 0.5 grey before encoding, and the mask, grown by
    ``grow_mask_by`` pixels, becomes the LATENT's noise_mask."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pixels": ("IMAGE",),
            "vae": ("VAE",),
            "mask": ("MASK",),
            "grow_mask_by": ("INT", {"default": 6, "min": 0, "max": 64, "step": 1}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    CATEGORY = "latent/inpaint"

    def encode(self, vae, pixels: torch.Tensor, mask: torch.Tensor, grow_mask_by: int = 6) -> tuple[dict]:
        ratio = getattr(vae, "downscale_ratio", 8)
        height, width = (pixels.shape[1] // ratio) * ratio, (pixels.shape[2] // ratio) * ratio
        if height == 0 or width == 0:
            raise ValueError(f"VAEEncodeForInpaint: the image ({pixels.shape[2]}x{pixels.shape[1]} px) is smaller "
                             f"than {ratio} px on a side; nothing is left to encode")
        mask = F.interpolate(mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).to(torch.float32),
                             size=(pixels.shape[1], pixels.shape[2]), mode="bilinear")
        top, left = (pixels.shape[1] % ratio) // 2, (pixels.shape[2] % ratio) // 2
        pixels = pixels[:, top:top + height, left:left + width, :3]  # centre crop to multiples of the ratio
        mask = mask[:, :, top:top + height, left:left + width]
        if mask.shape[0] not in (1, pixels.shape[0]):
            raise ValueError(f"VAEEncodeForInpaint: {mask.shape[0]} masks for {pixels.shape[0]} images; give one "
                             "mask or one per image")
        grown = grow_mask(mask, int(grow_mask_by))
        keep = (1.0 - mask.round()).squeeze(1).unsqueeze(-1)  # [B,H,W,1]: 1 where the pixels stay
        grey = (pixels - 0.5) * keep + 0.5
        return ({"samples": vae.encode(grey), "noise_mask": grown[:, :, :height, :width].round()},)


class SetLatentNoiseMask:
    """Set Latent Noise Mask: only the masked part of the latent is denoised."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "mask": ("MASK",)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "set_mask"
    CATEGORY = "latent/inpaint"

    def set_mask(self, samples: dict, mask: torch.Tensor) -> tuple[dict]:
        out = dict(samples)
        out["noise_mask"] = mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1])
        return (out,)


NODE_CLASS_MAPPINGS = {"VAEEncodeForInpaint": VAEEncodeForInpaint, "SetLatentNoiseMask": SetLatentNoiseMask}
NODE_DISPLAY_NAME_MAPPINGS = {"VAEEncodeForInpaint": "VAE Encode (for Inpainting)",
                              "SetLatentNoiseMask": "Set Latent Noise Mask"}
