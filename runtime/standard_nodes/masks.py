"""Mask nodes for headless runs: LoadImageMask, SolidMask, InvertMask, MaskComposite, ImageToMask,
MaskToImage, GrowMask, FeatherMask.

Names, inputs, defaults, widget order and outputs are ComfyUI's (``nodes.py`` and
``comfy_extras/nodes_mask.py``), and so are the numbers, quirks included, so that a workflow gives the same
masks here as in ComfyUI.  Two things are stricter: LoadImageMask refuses names that leave the input folder,
and shape problems ComfyUI would crash on (an ``alpha`` channel of an RGB IMAGE, mask batches that cannot
broadcast) raise errors that say what to do.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ...core import folders
from .image import check_input_file, image_path, input_file_hash
from .latent import MAX_RESOLUTION

_OFFSET = ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1})


def _as_masks(mask: torch.Tensor) -> torch.Tensor:
    """Any MASK (``[H,W]``, ``[B,H,W]``, ``[B,1,H,W]``) as ``[B,H,W]``, as ComfyUI's mask nodes reshape it."""
    return mask.reshape((-1, mask.shape[-2], mask.shape[-1]))


# ------------------------------------------------------------------------------------------- LoadImageMask
def input_file_names() -> list[str]:
    """Every file at the top level of the input folder (ComfyUI's LoadImageMask lists all files, unfiltered)."""
    root = folders.provider().get_input_directory()
    if not os.path.isdir(root):
        return []
    return sorted(entry.name for entry in os.scandir(root) if entry.is_file())


def load_mask_file(path: str | os.PathLike, channel: str) -> torch.Tensor:
    """MASK ``[1,H,W]`` from one channel of an image file's first frame; ``alpha`` is inverted (1 - a).

    Like ComfyUI: EXIF orientation applied, 32-bit integer images scaled to 8-bit levels, anything else
    converted to RGBA first (so an image without alpha gives an all-zero alpha mask, a gray image the same
    values in red, green and blue).
    """
    with Image.open(path) as img:
        frame = ImageOps.exif_transpose(img)
        if frame.getbands() != ("R", "G", "B", "A"):
            if frame.mode == "I":
                frame = frame.point(lambda v: v * (1 / 255))
            frame = frame.convert("RGBA")
        band = channel[0].upper()
        values = torch.from_numpy(np.asarray(frame.getchannel(band), dtype=np.float32) / 255.0)
    if band == "A":
        values = 1.0 - values
    return values.unsqueeze(0)


class LoadImageMask:
    """Load one channel of an image from the input folder as a MASK."""

    _CHANNELS = ["alpha", "red", "green", "blue"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": (input_file_names(), {"image_upload": True}),
                             "channel": (cls._CHANNELS,)}}

    RETURN_TYPES = ("MASK",)
    FUNCTION = "load_image"
    CATEGORY = "mask"

    def load_image(self, image: str, channel: str) -> tuple[torch.Tensor]:
        if channel not in self._CHANNELS:
            raise ValueError(f"LoadImageMask: channel {channel!r} is not one of {self._CHANNELS}")
        path = image_path(image)
        if not path.is_file():
            raise FileNotFoundError(f"LoadImageMask: image '{image}' was not found at '{path}'")
        return (load_mask_file(path, channel),)

    @classmethod
    def IS_CHANGED(cls, image: str, channel: str) -> str | float:
        return input_file_hash(image)

    @classmethod
    def VALIDATE_INPUTS(cls, image: str) -> bool | str:
        return check_input_file(image)


# ------------------------------------------------------------------------------------------- simple masks
class SolidMask:
    """A ``[1, height, width]`` mask filled with ``value``."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "value": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            "width": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
            "height": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
        }}

    RETURN_TYPES = ("MASK",)
    FUNCTION = "solid"
    CATEGORY = "mask"

    def solid(self, value: float, width: int, height: int) -> tuple[torch.Tensor]:
        return (torch.full((1, height, width), value, dtype=torch.float32),)


class InvertMask:
    """``1 - mask``."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask": ("MASK",)}}

    RETURN_TYPES = ("MASK",)
    FUNCTION = "invert"
    CATEGORY = "mask"

    def invert(self, mask: torch.Tensor) -> tuple[torch.Tensor]:
        return (1.0 - mask,)


class ImageToMask:
    """One channel of an IMAGE as a MASK."""

    _CHANNELS = ["red", "green", "blue", "alpha"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "channel": (cls._CHANNELS,)}}

    RETURN_TYPES = ("MASK",)
    FUNCTION = "image_to_mask"
    CATEGORY = "mask"

    def image_to_mask(self, image: torch.Tensor, channel: str) -> tuple[torch.Tensor]:
        index = self._CHANNELS.index(channel)
        if index >= image.shape[-1]:
            raise ValueError(f"ImageToMask: channel '{channel}' needs an IMAGE with {index + 1} channels, but the "
                             f"image has {image.shape[-1]} ({list(image.shape)}); pick red, green or blue")
        return (image[:, :, :, index],)


class MaskToImage:
    """A MASK as a gray IMAGE ``[B,H,W,3]``."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask": ("MASK",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "mask_to_image"
    CATEGORY = "mask"

    def mask_to_image(self, mask: torch.Tensor) -> tuple[torch.Tensor]:
        return (_as_masks(mask).unsqueeze(-1).expand(-1, -1, -1, 3),)


# ------------------------------------------------------------------------------------------- MaskComposite
def _both(a: torch.Tensor, b: torch.Tensor, op) -> torch.Tensor:
    """A logic op on masks rounded to booleans (ComfyUI's ``and``/``or``/``xor``), as 0/1 floats."""
    return op(a.round().bool(), b.round().bool()).float()


_OPERATIONS = {
    "multiply": lambda dst, src: dst * src,
    "add": lambda dst, src: dst + src,
    "subtract": lambda dst, src: dst - src,
    "and": lambda dst, src: _both(dst, src, torch.bitwise_and),
    "or": lambda dst, src: _both(dst, src, torch.bitwise_or),
    "xor": lambda dst, src: _both(dst, src, torch.bitwise_xor),
}


class MaskComposite:
    """Combine ``source`` into ``destination`` at (x, y) with an operation; the result is clamped to 0..1."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "destination": ("MASK",),
            "source": ("MASK",),
            "x": _OFFSET,
            "y": _OFFSET,
            "operation": (list(_OPERATIONS),),
        }}

    RETURN_TYPES = ("MASK",)
    FUNCTION = "combine"
    CATEGORY = "mask"

    def combine(self, destination: torch.Tensor, source: torch.Tensor, x: int, y: int,
                operation: str) -> tuple[torch.Tensor]:
        output = _as_masks(destination).clone()
        source = _as_masks(source).to(output.device)
        if operation not in _OPERATIONS:
            raise ValueError(f"MaskComposite: operation {operation!r} is not one of {list(_OPERATIONS)}")
        if source.shape[0] not in (1, output.shape[0]):
            raise ValueError(f"MaskComposite: the source has {source.shape[0]} masks and the destination "
                             f"{output.shape[0]}; give 1 source mask or as many as the destination has")
        # The part of the source that lands inside the destination (nothing when the offset is past its edge).
        bottom = min(y + source.shape[-2], output.shape[-2])
        right = min(x + source.shape[-1], output.shape[-1])
        if bottom > y and right > x:
            region = output[:, y:bottom, x:right]
            output[:, y:bottom, x:right] = _OPERATIONS[operation](region, source[:, :bottom - y, :right - x])
        return (output.clamp(0.0, 1.0),)


# ------------------------------------------------------------------------------------------- FeatherMask
def _edge_factors(length: int, near: int, far: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's feather ramps along one axis: factors for the near edge and for the far edge.

    Near: index ``i < near`` gets ``(i + 1) / near``.  Far: ComfyUI scales index ``-i`` by ``(i + 1) / far``
    for ``i < far``; as ``-0`` is index 0, the far ramp's first factor (``1 / far``) hits the *near* edge's
    first row/column and the far edge's outermost one gets ``2 / far``.  Kept, so results match ComfyUI.
    """
    near_f = torch.ones(length, dtype=torch.float64)
    far_f = torch.ones(length, dtype=torch.float64)
    for i in range(near):
        near_f[i] = (i + 1.0) / near
    for i in range(far):
        far_f[-i] = (i + 1.0) / far
    return near_f, far_f


class FeatherMask:
    """Fade the mask linearly towards its edges, by the given number of pixels per edge."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask": ("MASK",), "left": _OFFSET, "top": _OFFSET, "right": _OFFSET,
                             "bottom": _OFFSET}}

    RETURN_TYPES = ("MASK",)
    FUNCTION = "feather"
    CATEGORY = "mask"

    def feather(self, mask: torch.Tensor, left: int, top: int, right: int, bottom: int) -> tuple[torch.Tensor]:
        output = _as_masks(mask).clone()
        height, width = output.shape[-2:]
        left_f, right_f = _edge_factors(width, min(left, width), min(right, width))
        top_f, bottom_f = _edge_factors(height, min(top, height), min(bottom, height))
        # One multiplication per ramp, in ComfyUI's order (left, right, top, bottom), in the mask's dtype.
        for factors, shape in ((left_f, (1, 1, -1)), (right_f, (1, 1, -1)), (top_f, (1, -1, 1)),
                               (bottom_f, (1, -1, 1))):
            output = output * factors.to(device=output.device, dtype=output.dtype).reshape(shape)
        return (output,)


# ------------------------------------------------------------------------------------------- GrowMask
def _grow_once(masks: torch.Tensor, tapered_corners: bool, grow: bool) -> torch.Tensor:
    """One step of grey dilation (grow) or erosion over a 3x3 footprint; edges replicate the border.

    ``tapered_corners`` uses the cross footprint (4 neighbours), else the full square (8): the same as
    ComfyUI's ``scipy.ndimage.grey_dilation``/``grey_erosion`` with its default border mode.
    """
    padded = F.pad(masks.unsqueeze(1), (1, 1, 1, 1), mode="replicate").squeeze(1)
    height, width = masks.shape[-2:]
    offsets = [(dy, dx) for dy in (0, 1, 2) for dx in (0, 1, 2)
               if not (tapered_corners and dy != 1 and dx != 1)]
    shifted = torch.stack([padded[:, dy:dy + height, dx:dx + width] for dy, dx in offsets])
    return shifted.amax(dim=0) if grow else shifted.amin(dim=0)


class GrowMask:
    """Grow (positive ``expand``) or shrink (negative) the mask by that many pixels."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mask": ("MASK",),
            "expand": ("INT", {"default": 0, "min": -MAX_RESOLUTION, "max": MAX_RESOLUTION, "step": 1}),
            "tapered_corners": ("BOOLEAN", {"default": True}),
        }}

    RETURN_TYPES = ("MASK",)
    FUNCTION = "expand_mask"
    CATEGORY = "mask"

    def expand_mask(self, mask: torch.Tensor, expand: int, tapered_corners: bool) -> tuple[torch.Tensor]:
        output = _as_masks(mask).to(torch.float32)
        for _ in range(abs(expand)):
            output = _grow_once(output, tapered_corners, grow=expand > 0)
        return (output.clone() if expand == 0 else output,)


NODE_CLASS_MAPPINGS = {
    "LoadImageMask": LoadImageMask,
    "SolidMask": SolidMask,
    "InvertMask": InvertMask,
    "MaskComposite": MaskComposite,
    "ImageToMask": ImageToMask,
    "MaskToImage": MaskToImage,
    "GrowMask": GrowMask,
    "FeatherMask": FeatherMask,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadImageMask": "Load Image (as Mask)",
    "ImageToMask": "Convert Image to Mask",
    "MaskToImage": "Convert Mask to Image",
}
