"""Image utility node: PrepImageForClipVision (square, resize to 224 px, sharpen)."""
from __future__ import annotations

from ..core import prep_image as prep


class PrepImageForClipVision:
    """Crops or pads a reference to a square and resizes it to the encoder's 224 px."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE",),
                "interpolation": (list(prep.INTERPOLATIONS),),
                "crop_position": (list(prep.CROP_POSITIONS),),
                "sharpening": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05}),
            },
        }

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "prep_image"
    CATEGORY = "ipadapter/utils"

    def prep_image(self, image, interpolation="LANCZOS", crop_position="center", sharpening=0.0):
        return (prep.prep_image(image, interpolation, crop_position, sharpening),)


NODE_CLASS_MAPPINGS = {"PrepImageForClipVision": PrepImageForClipVision}
NODE_DISPLAY_NAME_MAPPINGS = {"PrepImageForClipVision": "Prep Image For ClipVision"}
