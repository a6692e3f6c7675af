"""The CLIP vision encoder: loading, ComfyUI-compatible preprocessing and encoding.

The IP-Adapter engine and the CLIPVisionLoader / CLIPVisionEncode nodes use :class:`ClipVision` (the
``CLIP_VISION`` value headless) and :class:`ClipVisionOutput` (``CLIP_VISION_OUTPUT``).  Inside ComfyUI the
``CLIP_VISION`` value is ComfyUI's own ``ClipVisionModel``; :func:`as_clip_vision` gives both one face.

Output fields, as ComfyUI defines them — transformers agrees on all three:
- ``last_hidden_state``: the output of the last encoder layer, **before** ``post_layernorm`` [B,257,H]
  (transformers also returns it before the norm, which it applies to the CLS token only);
- ``penultimate_hidden_states``: ``hidden_states[-2]``, the output of the second-to-last layer, i.e. the
  input of the last layer, no layer norm [B,257,H]; what IP-Adapter Plus / full-face / FaceID-Plus use;
- ``image_embeds``: ``visual_projection(post_layernorm(CLS))`` [B,P]; what base adapters use.

Files: a transformers ``CLIPVisionModelWithProjection`` folder (config.json + weights), or one weights file
in transformers naming (``vision_model.*`` + ``visual_projection.weight``, as the public ComfyUI files
``CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors`` are stored) or in OpenCLIP naming
(``visual.conv1.weight``, ``visual.transformer.resblocks.N.*``, ``visual.proj``).  A single file's
configuration is inferred from tensor shapes, never from its name (:func:`infer_config`).
"""
from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

import torch
import torch.nn.functional as F

from .clip_vision_keys import infer_config, to_transformers_keys

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_OUTPUT_FIELDS = ("image_embeds", "last_hidden_state", "penultimate_hidden_states")



class ClipVisionOutput:
    """Encoder features with attribute access (``out.image_embeds``) and item access (``out["image_embeds"]``)."""

    def __init__(self, image_embeds: torch.Tensor | None = None, last_hidden_state: torch.Tensor | None = None,
                 penultimate_hidden_states: torch.Tensor | None = None, **extra: Any) -> None:
        self.image_embeds = image_embeds
        self.last_hidden_state = last_hidden_state
        self.penultimate_hidden_states = penultimate_hidden_states
        self.mm_projected = None  # ComfyUI sets this for vision-language encoders; always None for CLIP
        for key, value in extra.items():
            setattr(self, key, value)

    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def __setitem__(self, key: str, value: Any) -> None:
        setattr(self, key, value)

    def __contains__(self, key: str) -> bool:
        return getattr(self, key, None) is not None

    def keys(self) -> list[str]:
        return [k for k, v in vars(self).items() if v is not None]

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return f"ClipVisionOutput({shapes})"


def preprocess_image(image: torch.Tensor, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD,
                     crop: bool = True) -> torch.Tensor:
    """ComfyUI's CLIP preprocessing: IMAGE [B,H,W,C] 0..1 → normalized pixel_values [B,3,size,size].

    Drops alpha; unless already size×size, resizes bicubic with antialias — ``crop=True``: shortest side to
    ``size`` then centre crop, ``crop=False``: squash to size×size; rounds to 8-bit levels (round(255·x)/255,
    as ComfyUI does, so results match an 8-bit image pipeline); normalizes with ``mean``/``std``.
    """
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"CLIP vision preprocessing expects an IMAGE [B,H,W,C] with C=3, got {tuple(image.shape)}")
    _check_pixels(image)
    image = image[..., :3] if image.shape[-1] == 4 else image.expand(*image.shape[:3], 3)
    pixels = image.movedim(-1, 1).float()
    height, width = pixels.shape[2], pixels.shape[3]
    if (height, width) != (size, size):
        if crop:
            scale = size / min(height, width)
            new_h, new_w = max(size, round(scale * height)), max(size, round(scale * width))
            pixels = F.interpolate(pixels, size=(new_h, new_w), mode="bicubic", antialias=True)
            top, left = (new_h - size) // 2, (new_w - size) // 2
            pixels = pixels[:, :, top:top + size, left:left + size]
        else:
            pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True)
    pixels = torch.clamp(pixels * 255.0, 0.0, 255.0).round() / 255.0
    mean_t = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean_t) / std_t


def _check_pixels(image: torch.Tensor) -> None:
    """Refuse an empty batch and NaN/inf pixels: either would only surface later as a meaningless shape
    error or as an all-NaN (black) result, far from the node that made the image."""
    if image.shape[0] == 0 or image.numel() == 0:
        raise ValueError(f"CLIP vision encoder: the IMAGE batch is empty (shape {tuple(image.shape)}); expected at "
                         f"least one image. Check the node that feeds 'image' (an empty batch or a filter that "
                         f"dropped every image)")
    finite = torch.isfinite(image)
    if not bool(finite.all()):
        bad = (~finite).flatten(1).sum(dim=1)
        which = [i for i, n in enumerate(bad.tolist()) if n]
        raise ValueError(f"CLIP vision encoder: image(s) {which[:8]}{'...' if len(which) > 8 else ''} of the batch "
                         f"hold {int(bad.sum())} NaN or infinite value(s); expected pixel values in 0..1. The node "
                         f"that made the image produced invalid values: fix or replace it")


class ClipVision:
    """A loaded CLIP vision tower with projection (the headless ``CLIP_VISION`` value).

    ``model`` is a transformers ``CLIPVisionModelWithProjection``; ``encode`` takes an IMAGE, ``encode_pixels``
    takes already preprocessed pixel_values (e.g. from ``CLIPImageProcessor``, as diffusers feeds them).
    """

    def __init__(self, model: torch.nn.Module, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                 image_size: int | None = None, source: str | None = None) -> None:
        self.model = model.eval()
        config = model.config
        self.image_size = int(image_size or config.image_size)
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.hidden_size = int(config.hidden_size)
        self.projection_dim = int(config.projection_dim)
        self.num_layers = int(config.num_hidden_layers)
        self.source = source

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def preprocess(self, image: torch.Tensor, crop: bool = True) -> torch.Tensor:
        """IMAGE [B,H,W,C] 0..1 → pixel_values [B,3,S,S] (see :func:`preprocess_image`)."""
        return preprocess_image(image, self.image_size, self.image_mean, self.image_std, crop=crop)

    @torch.no_grad()
    def encode_pixels(self, pixel_values: torch.Tensor) -> ClipVisionOutput:
        """Run the tower once on pixel_values [B,3,S,S]; features come back float32 on the model's device."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"CLIP vision encoder expects pixel_values [B,3,{self.image_size},{self.image_size}], "
                             f"got {tuple(pixel_values.shape)}")
        out = self.model(pixel_values=pixel_values.to(self.device, self.dtype), output_hidden_states=True)
        return ClipVisionOutput(
            image_embeds=out.image_embeds.float(),
            last_hidden_state=out.last_hidden_state.float(),
            penultimate_hidden_states=out.hidden_states[-2].float(),
        )

    def encode(self, image: torch.Tensor, crop: bool = True) -> ClipVisionOutput:
        """Preprocess an IMAGE the ComfyUI way and encode it."""
        return self.encode_pixels(self.preprocess(image, crop=crop))

    def encode_image(self, image: torch.Tensor, crop: bool = True) -> ClipVisionOutput:
        """ComfyUI's method name, so code written against ComfyUI's ClipVisionModel also works headless."""
        return self.encode(image, crop=crop)

    def __repr__(self) -> str:
        return (f"ClipVision(hidden={self.hidden_size}, projection={self.projection_dim}, "
                f"layers={self.num_layers}, image_size={self.image_size}, source={self.source!r})")


# ----------------------------------------------------------------------------------------------- loading
_CACHE: dict[tuple, ClipVision] = {}
_CACHE_LOCK = threading.Lock()


def _read_weights(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from .checkpoint import load_torch_weights, read_safetensors

    # Damaged files and pickles that would run code raise ModelFileError naming the file.
    if path.lower().endswith((".safetensors", ".sft")):
        return read_safetensors(path, "CLIP vision file")
    data = load_torch_weights(path, "CLIP vision file")  # weights_only: never unpickle arbitrary objects
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ValueError(f"CLIP vision file '{path}' holds a {type(data).__name__}, expected a state dict")
    return data, {}


def _stamp(path: str) -> tuple:
    if os.path.isdir(path):
        return tuple(sorted((e.name, e.stat().st_mtime_ns) for e in os.scandir(path) if e.is_file()))
    return (os.stat(path).st_mtime_ns,)


def _build_from_file(path: str, dtype: torch.dtype) -> ClipVision:
    from transformers import CLIPVisionConfig

    raw, metadata = _read_weights(path)
    where = f"CLIP vision file '{path}'"
    state_dict = to_transformers_keys(raw, where=where)
    config = CLIPVisionConfig(**infer_config(state_dict, metadata, where=where))
    return ClipVision(_model_from(config, state_dict, where).to(dtype), source=path)


def _build_from_folder(path: str, dtype: torch.dtype) -> ClipVision:
    from transformers import CLIPVisionConfig

    where = f"CLIP vision folder '{path}'"
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{where} has no config.json; expected a transformers "
                                f"CLIPVisionModelWithProjection folder (config.json + model.safetensors)")
    config = CLIPVisionConfig.from_pretrained(path, local_files_only=True)  # also takes a full CLIP config
    state_dict: dict[str, torch.Tensor] = {}
    for name in _folder_weight_files(path):
        state_dict.update(_read_weights(os.path.join(path, name))[0])
    model = _model_from(config, to_transformers_keys(state_dict, where=where), where)
    mean, std, size = CLIP_MEAN, CLIP_STD, None
    processor_file = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(processor_file):
        with open(processor_file, encoding="utf-8") as f:
            proc = json.load(f)
        mean, std = proc.get("image_mean", mean), proc.get("image_std", std)
        crop = proc.get("crop_size")
        size = crop.get("height") if isinstance(crop, dict) else crop
    return ClipVision(model.to(dtype), image_mean=mean, image_std=std, image_size=size, source=path)


def _folder_weight_files(path: str) -> list[str]:
    """The weight files of a transformers folder: one file, or the shards its index names."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if os.path.isfile(os.path.join(path, index)):
            with open(os.path.join(path, index), encoding="utf-8") as f:
                return sorted(set(json.load(f)["weight_map"].values()))
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, single)):
            return [single]
    raise FileNotFoundError(f"CLIP vision folder '{path}' has config.json but no weights; expected "
                            f"model.safetensors (or pytorch_model.bin, or a sharded index)")


def _model_from(config: Any, state_dict: dict[str, torch.Tensor], where: str) -> torch.nn.Module:
    """A CLIPVisionModelWithProjection holding ``state_dict`` (built on the meta device: no random init)."""
    from transformers import CLIPVisionModelWithProjection

    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"{where} does not fit its config (hidden {config.hidden_size}, {config.num_hidden_layers} "
                         f"layers, projection {config.projection_dim}): missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    _rebuild_meta_buffers(model)
    return model.eval()


def _rebuild_meta_buffers(model: torch.nn.Module) -> None:
    """Recreate the non-persistent buffers a meta-device construction left empty (only ``position_ids``)."""
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                if name != "position_ids":
                    raise RuntimeError(f"cannot rebuild buffer '{name}' of {type(module).__name__}")
                module._buffers[name] = torch.arange(buffer.shape[-1]).expand(tuple(buffer.shape)).clone()


def load_clip_vision(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu") -> ClipVision:
    """Load a CLIP vision tower from a transformers folder or a single weights file (cached per path+mtime).

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file and what was expected.
    """
    path = os.path.realpath(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"CLIP vision model '{path}' does not exist")
    key = (path, _stamp(path), str(dtype), str(device))
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
        if cached is not None:
            return cached
        loader = _build_from_folder if os.path.isdir(path) else _build_from_file
        clip_vision = loader(path, dtype)
        clip_vision.model.to(device)
        for stale in [k for k in _CACHE if k[0] == path]:  # a changed file replaces its old entry
            del _CACHE[stale]
        _CACHE[key] = clip_vision
        return clip_vision


def forget_clip_vision(path: str | os.PathLike) -> None:
    """Drop the cached encoder(s) loaded from ``path`` so their weights can be freed."""
    real = os.path.realpath(path)
    with _CACHE_LOCK:
        for key in [k for k in _CACHE if k[0] == real]:
            del _CACHE[key]


# ----------------------------------------------------------------------------------------------- interop
class _ComfyClipVision:
    """ComfyUI's ``comfy.clip_vision.ClipVisionModel`` behind :class:`ClipVision`'s encode interface."""

    def __init__(self, comfy_model: Any) -> None:
        self.comfy_model = comfy_model
        self.model = getattr(comfy_model, "model", None)
        self.image_size = int(getattr(comfy_model, "image_size", 224))
        self.image_mean = tuple(getattr(comfy_model, "image_mean", CLIP_MEAN))
        self.image_std = tuple(getattr(comfy_model, "image_std", CLIP_STD))

    def preprocess(self, image: torch.Tensor, crop: bool = True) -> torch.Tensor:
        return preprocess_image(image, self.image_size, self.image_mean, self.image_std, crop=crop)

    def encode(self, image: torch.Tensor, crop: bool = True) -> ClipVisionOutput:
        try:
            out = self.comfy_model.encode_image(image, crop=crop)
        except TypeError:  # ComfyUI releases before the crop argument always centre-crop
            out = self.comfy_model.encode_image(image)
        return as_clip_vision_output(out)

    def encode_image(self, image: torch.Tensor, crop: bool = True) -> ClipVisionOutput:
        return self.encode(image, crop=crop)

    def encode_pixels(self, pixel_values: torch.Tensor) -> ClipVisionOutput:
        import comfy.model_management as mm  # only inside ComfyUI

        mm.load_model_gpu(self.comfy_model.patcher)
        pixel_values = pixel_values.to(self.comfy_model.load_device).float()
        out = self.comfy_model.model(pixel_values=pixel_values, intermediate_output=-2)
        device = mm.intermediate_device()
        return ClipVisionOutput(last_hidden_state=out[0].to(device), penultimate_hidden_states=out[1].to(device),
                                image_embeds=out[2].to(device))


def as_clip_vision_output(out: Any) -> ClipVisionOutput:
    """Any CLIP_VISION_OUTPUT value (ours, ComfyUI's ``Output``, a dict) as a :class:`ClipVisionOutput`."""
    if isinstance(out, ClipVisionOutput):
        return out

    def field(name: str) -> Any:
        value = getattr(out, name, None)
        if value is None and isinstance(out, dict):
            value = out.get(name)
        return value

    return ClipVisionOutput(**{name: field(name) for name in _OUTPUT_FIELDS})


def as_clip_vision(obj: Any) -> Any:
    """Something with ``encode(image, crop)`` → :class:`ClipVisionOutput` for any CLIP_VISION value.

    Accepts our :class:`ClipVision`, ComfyUI's ``ClipVisionModel`` (duck-typed by ``encode_image``) and a bare
    transformers ``CLIPVisionModelWithProjection`` (e.g. a diffusers pipeline's ``image_encoder``).
    """
    if isinstance(obj, (ClipVision, _ComfyClipVision)):
        return obj
    if callable(getattr(obj, "encode_image", None)):
        return _ComfyClipVision(obj)
    config = getattr(obj, "config", None)
    if isinstance(obj, torch.nn.Module) and hasattr(config, "projection_dim") and hasattr(config, "image_size"):
        return ClipVision(obj)
    raise TypeError(f"expected a CLIP_VISION value (ClipVision, ComfyUI ClipVisionModel or "
                    f"CLIPVisionModelWithProjection), got {type(obj).__name__}; connect a CLIPVisionLoader output")
