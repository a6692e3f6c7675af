"""Mask preparation for IP-Adapter: what diffusers' IPAdapterMaskProcessor does, as a node."""
from __future__ import annotations

import torch

from ..core import masks

_SIZE = {"default": 512, "min": 8, "max": 16384, "step": 8}


class IPAdapterMaskPrep:
    """Binarize masks and resize them to the output size (diffusers' ``IPAdapterMaskProcessor.preprocess``).

    Feed the result to an apply node's ``attn_mask``: masks of the output's size and aspect ratio land on
    every attention layer's token grid without stretching, and binary values confine the adapter exactly.
    """

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "mask": ("MASK",),
                "width": ("INT", dict(_SIZE)),
                "height": ("INT", dict(_SIZE)),
                "resample": (list(masks.PREPARE_RESAMPLING), {"default": "lanczos"}),
            },
        }

    RETURN_TYPES = ("MASK",)
    RETURN_NAMES = ("mask",)
    FUNCTION = "prepare"
    CATEGORY = "ipadapter/masks"
    DESCRIPTION = ("Resizes masks to the output size (rounded down to a multiple of 8) and binarizes them at 0.5, "
                   "as diffusers' IPAdapterMaskProcessor does. lanczos: its path for mask images; nearest: its "
                   "path for mask tensors.")

    def prepare(self, mask: torch.Tensor, width: int, height: int, resample: str = "lanczos"):
        return (masks.prepare_masks(mask, height=height, width=width, resample=resample),)


NODE_CLASS_MAPPINGS = {"IPAdapterMaskPrep": IPAdapterMaskPrep}
NODE_DISPLAY_NAME_MAPPINGS = {"IPAdapterMaskPrep": "IPAdapter Mask Prep (binarize + resize)"}
