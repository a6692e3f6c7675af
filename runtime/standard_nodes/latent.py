"""Latent nodes headless: EmptyLatentImage, VAEDecode, VAEEncode (ComfyUI's names, inputs and defaults)."""
from __future__ import annotations

import torch

MAX_RESOLUTION = 16384
LATENT_CHANNELS = 4
DOWNSCALE = 8


class EmptyLatentImage:
    """Empty Latent Image: zeros ``[B, 4, H/8, W/8]``."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "width": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8,
                              "tooltip": "The width of the latent images in pixels."}),
            "height": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8,
                               "tooltip": "The height of the latent images in pixels."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096,
                                   "tooltip": "The number of latent images in the batch."}),
        }}

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The empty latent image batch.",)
    FUNCTION = "generate"
    CATEGORY = "latent"
    DESCRIPTION = "Create a new batch of empty latent images to be denoised via sampling."

    def generate(self, width: int, height: int, batch_size: int = 1):
        samples = torch.zeros([batch_size, LATENT_CHANNELS, height // DOWNSCALE, width // DOWNSCALE])
        return ({"samples": samples},)


class VAEDecode:
    """VAE Decode: LATENT → IMAGE."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT", {"tooltip": "The latent to be decoded."}),
            "vae": ("VAE", {"tooltip": "The VAE model used for decoding the latent."}),
        }}

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded image.",)
    FUNCTION = "decode"
    CATEGORY = "latent"
    DESCRIPTION = "Decodes latent images back into pixel space images."

    def decode(self, vae, samples: dict):
        return (vae.decode(samples["samples"]),)


def crop_to_multiple(pixels: torch.Tensor, multiple: int = DOWNSCALE) -> torch.Tensor:
    """Centre-crop IMAGE ``[B,H,W,C]`` so H and W are multiples of ``multiple`` (what ComfyUI's VAEEncode does)."""
    height = (pixels.shape[1] // multiple) * multiple
    width = (pixels.shape[2] // multiple) * multiple
    if height == pixels.shape[1] and width == pixels.shape[2]:
        return pixels
    top = (pixels.shape[1] % multiple) // 2
    left = (pixels.shape[2] % multiple) // 2
    return pixels[:, top:top + height, left:left + width, :]


class VAEEncode:
    """VAE Encode: IMAGE → LATENT (scaled latents)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"pixels": ("IMAGE",), "vae": ("VAE",)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    CATEGORY = "latent"

    def encode(self, vae, pixels: torch.Tensor):
        ratio = getattr(vae, "downscale_ratio", DOWNSCALE)
        cropped = crop_to_multiple(pixels, ratio)
        if cropped.shape[1] == 0 or cropped.shape[2] == 0:
            raise ValueError(f"VAEEncode: the image ({pixels.shape[2]}x{pixels.shape[1]} px) is smaller than "
                             f"{ratio} px on a side; nothing is left to encode")
        return ({"samples": vae.encode(cropped)},)


NODE_CLASS_MAPPINGS = {"EmptyLatentImage": EmptyLatentImage, "VAEDecode": VAEDecode, "VAEEncode": VAEEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"EmptyLatentImage": "Empty Latent Image", "VAEDecode": "VAE Decode",
                              "VAEEncode": "VAE Encode"}
