"""Image nodes for headless runs: LoadImage, SaveImage, PreviewImage, ImageScale, ImageBatch.

Names, inputs, defaults and outputs follow ComfyUI's core nodes.  Two things are stricter than ComfyUI on
purpose: LoadImage refuses any name that leaves its folder (ComfyUI's node loads ``../x.png``; only its HTTP
layer guards), and SaveImage never overwrites and never leaves a partial file (written under a temporary
name, then linked to a name that does not exist yet).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, ImageSequence
from PIL.PngImagePlugin import PngInfo

from ...core import files, folders
from ...core.files import write_new_file

# "name.png [output]" picks another root, as ComfyUI's annotated file names do.
_ANNOTATION = re.compile(r"^(?P<name>.*?)\s*\[(?P<root>input|output|temp)\]$")
_ROOTS: dict[str, Callable[[], str]] = {
    "input": lambda: folders.provider().get_input_directory(),
    "output": lambda: folders.provider().get_output_directory(),
    "temp": lambda: folders.provider().get_temp_directory(),
}
UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]


# ----------------------------------------------------------------------------------------------- LoadImage
def input_image_names() -> list[str]:
    """Image files at the top level of the input folder (sub-folders are not listed, as in ComfyUI)."""
    root = folders.provider().get_input_directory()
    if not os.path.isdir(root):
        return []
    names = [e.name for e in os.scandir(root) if e.is_file() and not e.name.startswith(".")]
    return sorted(folders.filter_extensions(names, folders.IMAGE_EXTENSIONS))


def image_path(name: str) -> Path:
    """Path of a LoadImage name inside its root; raises ``PathOutsideFolderError`` for escaping names."""
    match = _ANNOTATION.match(name)
    root_kind, bare = (match["root"], match["name"]) if match else ("input", name)
    return folders.resolve_inside(_ROOTS[root_kind](), bare, what="LoadImage image")


def load_image_file(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """IMAGE [F,H,W,3] and MASK (1 - alpha; zeros [1,64,64] without alpha) from an image file.

    Every frame of an animated file becomes one batch entry (frames of another size are skipped); the EXIF
    orientation is applied; 16-bit ("I" mode) images are scaled to 8-bit levels first.
    """
    with Image.open(path) as img:
        frames = [img.copy()] if img.format == "MPO" else [f.copy() for f in ImageSequence.Iterator(img)]
    images, masks = [], []
    for frame in frames:
        frame = ImageOps.exif_transpose(frame)
        if frame.mode == "I":
            frame = frame.point(lambda v: v * (1 / 255))
        rgb = frame.convert("RGB")
        if images and rgb.size != (images[0].shape[1], images[0].shape[0]):
            continue
        images.append(torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0))
        if "A" in frame.getbands():
            alpha = np.asarray(frame.getchannel("A"), dtype=np.float32) / 255.0
        elif frame.mode == "P" and "transparency" in frame.info:
            alpha = np.asarray(frame.convert("RGBA").getchannel("A"), dtype=np.float32) / 255.0
        else:
            alpha = None
        masks.append(torch.zeros(64, 64) if alpha is None else 1.0 - torch.from_numpy(alpha))
    if not images:
        raise ValueError(f"LoadImage: '{path}' holds no image frames")
    if len({tuple(m.shape) for m in masks}) > 1:  # alpha only on some frames: give the others an empty mask
        height, width = images[0].shape[:2]
        masks = [m if m.shape == (height, width) else torch.zeros(height, width) for m in masks]
    return torch.stack(images), torch.stack(masks)


def input_file_hash(image: str) -> str | float:
    """IS_CHANGED of the nodes that read a file of the input folder: its content hash (NaN: always re-run,
    so the run reports the real error)."""
    try:
        return hashlib.sha256(image_path(image).read_bytes()).hexdigest()
    except (OSError, ValueError):
        return float("nan")


def check_input_file(image: str) -> bool | str:
    """VALIDATE_INPUTS of the nodes that read a file of the input folder: it must be inside it and exist."""
    try:
        path = image_path(image)
    except folders.PathOutsideFolderError as err:
        return str(err)  # the validator already names the node; the error names the input
    if not path.is_file():
        return (f"image file '{image}' not found in '{path.parent}'; put the file in the input folder or "
                f"choose one of the listed files")
    return True


class LoadImage:
    """Load an image from the input folder → IMAGE and MASK (1 - alpha)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": (input_image_names(), {"image_upload": True})}}

    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"
    CATEGORY = "image"

    def load_image(self, image: str) -> tuple[torch.Tensor, torch.Tensor]:
        path = image_path(image)
        if not path.is_file():
            raise FileNotFoundError(f"LoadImage: image '{image}' was not found at '{path}'")
        return load_image_file(path)

    @classmethod
    def IS_CHANGED(cls, image: str) -> str | float:
        return input_file_hash(image)

    @classmethod
    def VALIDATE_INPUTS(cls, image: str) -> bool | str:
        return check_input_file(image)


# ----------------------------------------------------------------------------------------------- saving
def _expand_prefix(prefix: str, width: int, height: int) -> str:
    """Expand %width%, %height%, %year% ... %second% (the server) and %date:FMT% (ComfyUI's frontend)."""
    now = time.localtime()
    values = {"width": width, "height": height, "year": now.tm_year, "month": f"{now.tm_mon:02d}",
              "day": f"{now.tm_mday:02d}", "hour": f"{now.tm_hour:02d}", "minute": f"{now.tm_min:02d}",
              "second": f"{now.tm_sec:02d}"}
    for key, value in values.items():
        prefix = prefix.replace(f"%{key}%", str(value))
    tokens = {"yyyy": f"{now.tm_year:04d}", "yy": f"{now.tm_year % 100:02d}", "MM": f"{now.tm_mon:02d}",
              "M": str(now.tm_mon), "dd": f"{now.tm_mday:02d}", "d": str(now.tm_mday), "hh": f"{now.tm_hour:02d}",
              "h": str(now.tm_hour), "mm": f"{now.tm_min:02d}", "m": str(now.tm_min), "ss": f"{now.tm_sec:02d}",
              "s": str(now.tm_sec)}
    date_token = re.compile("|".join(sorted(tokens, key=len, reverse=True)))
    return re.sub(r"%date:([^%]+)%", lambda m: date_token.sub(lambda t: tokens[t.group(0)], m.group(1)), prefix)


def save_target(root: str, prefix: str, width: int, height: int) -> tuple[Path, str, str, int]:
    """(folder, subfolder, file name base, next counter) for ``prefix`` inside ``root``.

    The counter continues the highest ``<base>_<digits>`` already in the folder.  A prefix that leaves
    ``root`` (``..``, absolute, an escaping link) raises ``PathOutsideFolderError``.
    """
    prefix = _expand_prefix(prefix, width, height)
    return files.numbered_target(
        root, prefix, what="SaveImage filename_prefix",
        outside=lambda given: (f"Saving image outside the output folder is not allowed: filename_prefix '{given}' "
                               f"leaves '{root}'; use a relative prefix such as 'my_folder/image'"))


def image_to_pil(image: torch.Tensor) -> Image.Image:
    """One IMAGE [H,W,C] → PIL, 8 bits as ComfyUI makes them (clip to 0..255, then truncate)."""
    array = np.clip(255.0 * image.detach().float().cpu().numpy(), 0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array)


def png_metadata(prompt: Any = None, extra_pnginfo: dict | None = None) -> PngInfo:
    """tEXt chunks as ComfyUI writes them: ``prompt`` (the API prompt) and one chunk per extra_pnginfo key."""
    info = PngInfo()
    if prompt is not None:
        info.add_text("prompt", json.dumps(prompt))
    for key, value in (extra_pnginfo or {}).items():
        info.add_text(key, json.dumps(value))
    return info


class SaveImage:
    """Save images as PNG to the output folder, ``<prefix>_00001_.png``, never overwriting."""

    folder_type = "output"
    prefix_append = ""
    compress_level = 4

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to save."}),
                "filename_prefix": ("STRING", {"default": "ComfyUI", "tooltip": "The prefix for the file to save. "
                                    "This may include formatting information such as %date:yyyy-MM-dd% or "
                                    "%Empty Latent Image.width% to include values from nodes."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image"
    DESCRIPTION = "Saves the input images to your ComfyUI output directory."

    def root_directory(self) -> str:
        return _ROOTS[self.folder_type]()

    def save_images(self, images: torch.Tensor, filename_prefix: str = "ComfyUI", prompt: Any = None,
                    extra_pnginfo: dict | None = None) -> dict:
        if images.ndim == 3:
            images = images.unsqueeze(0)
        root = self.root_directory()
        filename_prefix = filename_prefix + self.prefix_append
        folder, subfolder, base, counter = save_target(root, filename_prefix, images.shape[2], images.shape[1])
        metadata = png_metadata(prompt, extra_pnginfo)
        results = []
        for batch_number, image in enumerate(images):
            pil = image_to_pil(image)
            stem = base.replace("%batch_num%", str(batch_number))

            def write(handle, pil=pil):
                pil.save(handle, format="PNG", pnginfo=metadata, compress_level=self.compress_level)

            name, counter = write_new_file(folder, lambda c, stem=stem: f"{stem}_{c:05d}_.png", counter, write)
            results.append({"filename": name, "subfolder": subfolder, "type": self.folder_type})
            counter += 1
        return {"ui": {"images": results}}


class PreviewImage(SaveImage):
    """Save images to the temp folder for viewing (``ComfyUI_temp_xxxxx_00001_.png``)."""

    folder_type = "temp"
    compress_level = 1

    def __init__(self) -> None:
        self.prefix_append = "_temp_" + "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}


# ----------------------------------------------------------------------------------------------- resizing
def resize_images(samples: torch.Tensor, width: int, height: int, method: str, crop: str) -> torch.Tensor:
    """Resize [B,C,H,W] to height×width; ``crop="center"`` first crops to the target aspect ratio."""
    if method not in UPSCALE_METHODS:
        raise ValueError(f"upscale_method must be one of {UPSCALE_METHODS}, got {method!r}")
    if crop == "center":
        old_h, old_w = samples.shape[2], samples.shape[3]
        old_aspect, new_aspect = old_w / old_h, width / height
        x = round((old_w - old_w * new_aspect / old_aspect) / 2) if old_aspect > new_aspect else 0
        y = round((old_h - old_h * old_aspect / new_aspect) / 2) if old_aspect < new_aspect else 0
        samples = samples[:, :, y:old_h - y, x:old_w - x]
    if method == "lanczos":  # torch has no lanczos; PIL works on 8-bit images
        out = []
        for image in samples.movedim(1, -1):
            pil = image_to_pil(image).resize((width, height), resample=Image.Resampling.LANCZOS)
            array = np.asarray(pil, dtype=np.float32) / 255.0
            out.append(torch.from_numpy(array.reshape(height, width, -1)))
        return torch.stack(out).movedim(-1, 1).to(samples.device)
    return F.interpolate(samples, size=(height, width), mode=method)


class ImageScale:
    """Resize an image; a width or height of 0 keeps the aspect ratio."""

    @classmethod
    def INPUT_TYPES(cls):
        size = {"default": 512, "min": 0, "max": 16384, "step": 1}
        return {"required": {"image": ("IMAGE",), "upscale_method": (UPSCALE_METHODS,), "width": ("INT", size),
                             "height": ("INT", dict(size)), "crop": (["disabled", "center"],)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "upscale"
    CATEGORY = "image/upscaling"

    def upscale(self, image: torch.Tensor, upscale_method: str, width: int, height: int,
                crop: str) -> tuple[torch.Tensor]:
        if width == 0 and height == 0:
            return (image,)
        old_h, old_w = image.shape[1], image.shape[2]
        if width == 0:
            width = max(1, round(old_w * height / old_h))
        elif height == 0:
            height = max(1, round(old_h * width / old_w))
        samples = resize_images(image.movedim(-1, 1), width, height, upscale_method, crop)
        # bicubic/lanczos overshoot; IMAGE values stay in 0..1
        return (samples.movedim(1, -1).clamp(0.0, 1.0),)


class ImageBatch:
    """Join two image batches; image2 is resized (bilinear, centre crop) to image1's size if they differ."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image1": ("IMAGE",), "image2": ("IMAGE",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "batch"
    CATEGORY = "image"

    def batch(self, image1: torch.Tensor, image2: torch.Tensor) -> tuple[torch.Tensor]:
        channels = max(image1.shape[-1], image2.shape[-1])
        image1, image2 = _with_channels(image1, channels), _with_channels(image2, channels)
        if image1.shape[1:3] != image2.shape[1:3]:
            image2 = resize_images(image2.movedim(-1, 1), image1.shape[2], image1.shape[1], "bilinear", "center")
            image2 = image2.movedim(1, -1)
        return (torch.cat((image1, image2.to(image1)), dim=0),)


def _with_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """Pad RGB with an opaque alpha channel when the other batch is RGBA."""
    if image.shape[-1] >= channels:
        return image
    alpha = torch.ones(*image.shape[:-1], channels - image.shape[-1], dtype=image.dtype, device=image.device)
    return torch.cat((image, alpha), dim=-1)


NODE_CLASS_MAPPINGS = {
    "LoadImage": LoadImage, "SaveImage": SaveImage, "PreviewImage": PreviewImage,
    "ImageScale": ImageScale, "ImageBatch": ImageBatch,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadImage": "Load Image", "SaveImage": "Save Image", "PreviewImage": "Preview Image",
    "ImageScale": "Upscale Image", "ImageBatch": "Batch Images",
}
