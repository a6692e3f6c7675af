"""Animated image savers headless: SaveAnimatedWEBP and SaveAnimatedPNG (ComfyUI's names, inputs and
metadata) and SaveAnimatedGIF.  Files are written like SaveImage's: never overwriting, never partial."""
from __future__ import annotations

import json
from typing import Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ...core import folders
from ...core.files import write_new_file
from .image import image_to_pil, save_target


def _frames(images: torch.Tensor) -> list[Image.Image]:
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.shape[0] == 0:
        raise ValueError("animated save: the image batch is empty")
    return [image_to_pil(image) for image in images]


class _AnimatedSaver:
    """Shared plumbing: one animated file per call in the output folder, ``<prefix>_00001_.<ext>``."""

    extension = ""
    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image/animation"

    @staticmethod
    def _inputs(**more: tuple) -> dict:
        """INPUT_TYPES of a saver: images, filename_prefix, fps, then the format's own widgets ``more``."""
        return {"required": {
            "images": ("IMAGE",),
            "filename_prefix": ("STRING", {"default": "ComfyUI"}),
            "fps": ("FLOAT", {"default": 6.0, "min": 0.01, "max": 1000.0, "step": 0.01}),
            **more,
        }, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def _save(self, images: torch.Tensor, filename_prefix: str, write) -> dict:
        frames = _frames(images)
        root = folders.provider().get_output_directory()
        folder, subfolder, base, counter = save_target(root, filename_prefix, frames[0].width, frames[0].height)
        name, _ = write_new_file(folder, lambda c: f"{base}_{c:05d}_.{self.extension}", counter,
                                 lambda handle: write(handle, frames))
        return {"ui": {"images": [{"filename": name, "subfolder": subfolder, "type": "output"}],
                       "animated": (len(frames) != 1,)}}


class SaveAnimatedWEBP(_AnimatedSaver):
    """Save the batch as one animated WEBP (prompt and workflow in the EXIF, as ComfyUI writes them)."""

    extension = "webp"
    methods = {"default": 4, "fastest": 0, "slowest": 6}

    @classmethod
    def INPUT_TYPES(cls):
        return cls._inputs(lossless=("BOOLEAN", {"default": True}),
                           quality=("INT", {"default": 80, "min": 0, "max": 100}),
                           method=(list(cls.methods.keys()),))

    def save_images(self, images: torch.Tensor, fps: float, filename_prefix: str, lossless: bool, quality: int,
                    method: str, num_frames: int = 0, prompt: Any = None, extra_pnginfo: dict | None = None) -> dict:
        if method not in self.methods:
            raise ValueError(f"SaveAnimatedWEBP: method must be one of {list(self.methods)}, got {method!r}")

        def write(handle, frames):
            exif = frames[0].getexif()
            if prompt is not None:
                exif[0x0110] = "prompt:{}".format(json.dumps(prompt))
            for offset, (key, value) in enumerate((extra_pnginfo or {}).items()):
                exif[0x010F - offset] = "{}:{}".format(key, json.dumps(value))
            frames[0].save(handle, format="WEBP", save_all=True, append_images=frames[1:],
                           duration=int(1000.0 / fps), exif=exif, lossless=bool(lossless), quality=int(quality),
                           method=self.methods[method])

        return self._save(images, filename_prefix, write)


class SaveAnimatedPNG(_AnimatedSaver):
    """Save the batch as one animated PNG (APNG); prompt and workflow in 'comf' chunks, as ComfyUI does."""

    extension = "png"

    @classmethod
    def INPUT_TYPES(cls):
        return cls._inputs(compress_level=("INT", {"default": 4, "min": 0, "max": 9}))

    def save_images(self, images: torch.Tensor, fps: float, compress_level: int, filename_prefix: str = "ComfyUI",
                    prompt: Any = None, extra_pnginfo: dict | None = None) -> dict:
        metadata = PngInfo()
        entries = ([("prompt", prompt)] if prompt is not None else []) + list((extra_pnginfo or {}).items())
        for key, value in entries:
            metadata.add(b"comf", key.encode("latin-1", "strict") + b"\0"
                         + json.dumps(value).encode("latin-1", "strict"), after_idat=True)

        def write(handle, frames):
            frames[0].save(handle, format="PNG", pnginfo=metadata, compress_level=int(compress_level), save_all=True,
                           duration=int(1000.0 / fps), append_images=frames[1:])

        result = self._save(images, filename_prefix, write)
        result["ui"]["animated"] = (True,)  # ComfyUI marks APNGs animated even for one frame
        return result


class SaveAnimatedGIF(_AnimatedSaver):
    """Save the batch as one looping animated GIF (256 colours per frame; the prompt in the comment)."""

    extension = "gif"

    @classmethod
    def INPUT_TYPES(cls):
        return cls._inputs()

    def save_images(self, images: torch.Tensor, fps: float, filename_prefix: str = "ComfyUI", prompt: Any = None,
                    extra_pnginfo: dict | None = None) -> dict:
        extra = {"comment": json.dumps({"prompt": prompt}).encode("utf-8")} if prompt is not None else {}

        def write(handle, frames):
            # GIF delays are whole hundredths of a second: say which one instead of letting Pillow truncate
            delay = max(1, int(100.0 / fps)) * 10
            frames[0].save(handle, format="GIF", save_all=True, append_images=frames[1:], duration=delay, loop=0,
                           disposal=1, **extra)

        return self._save(images, filename_prefix, write)


NODE_CLASS_MAPPINGS = {"SaveAnimatedWEBP": SaveAnimatedWEBP, "SaveAnimatedPNG": SaveAnimatedPNG,
                       "SaveAnimatedGIF": SaveAnimatedGIF}
NODE_DISPLAY_NAME_MAPPINGS = {"SaveAnimatedWEBP": "SaveAnimatedWEBP", "SaveAnimatedPNG": "SaveAnimatedPNG",
                              "SaveAnimatedGIF": "Save Animated GIF"}
