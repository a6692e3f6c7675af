"""CLIPVisionLoader and CLIPVisionEncode for headless runs (ComfyUI's names, inputs and outputs)."""
from __future__ import annotations

import torch

from ...core import folders
from ...core.encode import ClipVision, ClipVisionOutput, as_clip_vision, load_clip_vision

_FOLDER = "clip_vision"


def clip_vision_names() -> list[str]:
    """Model files and transformers folders (a folder holding config.json) in the ``clip_vision`` folders.

    A transformers folder is listed once, by its folder name; the files inside it are not listed separately.
    """
    names = folders.get_filename_list(_FOLDER)
    model_dirs = sorted({n.rsplit("/", 1)[0] for n in names if "/" in n and n.rsplit("/", 1)[1] == "config.json"})
    inside = tuple(d + "/" for d in model_dirs)
    files = [n for n in folders.filter_extensions(names, folders.MODEL_EXTENSIONS) if not n.startswith(inside)]
    return sorted(files + model_dirs)


def clip_vision_path(name: str) -> str:
    """Full path of a ``clip_vision`` entry (file or folder); refuses names that leave the folder."""
    for base in folders.get_folder_paths(_FOLDER):
        path = folders.resolve_inside(base, name, what="CLIPVisionLoader clip_name")
        if path.exists():
            return str(path)
    where = ", ".join(folders.get_folder_paths(_FOLDER)) or "(no folders configured)"
    raise FileNotFoundError(f"CLIPVisionLoader: '{name}' was not found in the clip_vision folders: {where}; "
                            f"put the encoder file or transformers folder there")


class CLIPVisionLoader:
    """Load a CLIP vision encoder (file or transformers folder) from the clip_vision folder."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": (clip_vision_names(),)}}

    RETURN_TYPES = ("CLIP_VISION",)
    FUNCTION = "load_clip"
    CATEGORY = "loaders"

    def load_clip(self, clip_name: str) -> tuple[ClipVision]:
        path = clip_vision_path(clip_name)
        return (load_clip_vision(path),)


class CLIPVisionEncode:
    """Encode an IMAGE with a CLIP vision model (crop "center": shortest side to 224 then centre crop)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_vision": ("CLIP_VISION",), "image": ("IMAGE",), "crop": (["center", "none"],)}}

    RETURN_TYPES = ("CLIP_VISION_OUTPUT",)
    FUNCTION = "encode"
    CATEGORY = "conditioning"

    def encode(self, clip_vision, image: torch.Tensor, crop: str) -> tuple[ClipVisionOutput]:
        if crop not in ("center", "none"):
            raise ValueError(f"CLIPVisionEncode: crop must be 'center' or 'none', got {crop!r}")
        return (as_clip_vision(clip_vision).encode(image, crop=(crop == "center")),)


NODE_CLASS_MAPPINGS = {"CLIPVisionLoader": CLIPVisionLoader, "CLIPVisionEncode": CLIPVisionEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"CLIPVisionLoader": "Load CLIP Vision", "CLIPVisionEncode": "CLIP Vision Encode"}
