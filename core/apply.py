"""From apply-node inputs to a new MODEL: the one place that turns widget values into an Application.

Every apply node calls :func:`apply_ipadapter`; it checks the inputs, encodes the reference images for the
adapter, combines several images as asked, builds the backend-free ``Application`` and hands it to the
backend that owns the MODEL's type (the diffusers handle headless, ComfyUI's ModelPatcher inside ComfyUI).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

# Option lists of the existing pack, in widget order (the first entry is the default).
WEIGHT_TYPES: tuple[str, ...] = (
    "linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input", "weak output",
    "weak middle", "strong middle", "style transfer", "composition", "strong style transfer",
    "style and composition", "style transfer precise", "composition precise",
)
COMBINE_EMBEDS: tuple[str, ...] = ("concat", "add", "subtract", "average", "norm average")
EMBEDS_SCALING: tuple[str, ...] = ("V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty")
# The simple node's three choices → the weight types they stand for.
SIMPLE_WEIGHT_TYPES: dict[str, str] = {
    "standard": "linear",
    "prompt is more important": "ease out",
    "style transfer": "style transfer",
}
# ComfyUI model classes (``type(patcher.model).__name__``) that carry an SDXL UNet.
_COMFY_SDXL_CLASSES = ("SDXL", "SDXLRefiner", "SDXL_instructpix2pix")
_FAMILY_LABEL = {"sd15": "SD1.5", "sdxl": "SDXL"}


# ---- loading (cached by the engine modules) ------------------------------------------------------------

def load_adapter(path: str) -> Any:
    """The IPAdapter of ``path`` (``core.adapter.load_adapter``, cached per path and mtime)."""
    from . import adapter

    return adapter.load_adapter(path)


def load_clip_vision(path: str) -> Any:
    """The ClipVision of ``path``, a transformers folder or one weights file (cached)."""
    from . import encode

    return encode.load_clip_vision(path)


def reuse_or_load(mine: dict, lent: dict | None, path: str, load: Callable[[str], Any]) -> dict:
    """A ``{"file", "model"}`` entry for ``path``: the node's own if it holds that file, else one lent by
    a daisy-chained pipeline for the same file, else freshly loaded."""
    if mine.get("file") == path and mine.get("model") is not None:
        return mine
    if lent and lent.get("file") == path and lent.get("model") is not None:
        return lent
    return {"file": path, "model": load(path)}


# ---- models and pipelines -------------------------------------------------------------------------------

def model_family(model: Any) -> str:
    """``"sd15"`` or ``"sdxl"`` for a MODEL: the diffusers handle's ``family``, or ComfyUI's model class."""
    family = getattr(model, "family", None)
    if family in _FAMILY_LABEL:
        return family
    inner = getattr(model, "model", None)
    if inner is not None:
        return "sdxl" if type(inner).__name__ in _COMFY_SDXL_CLASSES else "sd15"
    raise TypeError(f"expected a MODEL (a checkpoint loader's output), got {type(model).__name__}")


def check_family(adapter: Any, family: str, node: str) -> None:
    """Raise a ValueError when ``adapter`` was made for another model family than ``family``."""
    spec = getattr(adapter, "spec", None)
    if spec is None or spec.family == family:
        return
    kind = getattr(spec, "kind", "")
    name = getattr(adapter, "path", None) or getattr(spec, "path", None) or "the IP-Adapter"
    raise ValueError(
        f"{node}: IP-Adapter '{name}' is a {_FAMILY_LABEL.get(spec.family, spec.family)} {kind} adapter "
        f"({spec.cross_attention_dim}-d cross-attention) but the model is "
        f"{_FAMILY_LABEL.get(family, family)}; load the {_FAMILY_LABEL.get(family, family)} version of the "
        f"adapter or a matching checkpoint")


def unpack_pipeline(ipadapter: Any, clip_vision: Any, node: str, require_pipeline: bool = False) -> tuple[Any, Any]:
    """(adapter, clip_vision) from an IPADAPTER value: a unified loader's pipeline dict or a bare adapter.

    An explicitly connected ``clip_vision`` wins over the pipeline's.
    """
    if isinstance(ipadapter, dict) and "ipadapter" in ipadapter:
        adapter = ipadapter["ipadapter"].get("model")
        if clip_vision is None:
            clip_vision = (ipadapter.get("clipvision") or {}).get("model")
    elif require_pipeline:
        raise ValueError(f"{node}: the 'ipadapter' input must come from an IPAdapterUnifiedLoader (it carries "
                         f"the CLIP vision model too); with an IPAdapterModelLoader use IPAdapterAdvanced and "
                         f"connect a CLIPVisionLoader to its 'clip_vision' input")
    else:
        adapter = ipadapter
    if adapter is None:
        raise ValueError(f"{node}: the IPADAPTER input holds no loaded adapter; connect an IPAdapterModelLoader "
                         f"or IPAdapterUnifiedLoader")
    if clip_vision is None:
        raise ValueError(f"{node}: no CLIP vision model: connect a CLIPVisionLoader to 'clip_vision' or load the "
                         f"adapter with an IPAdapterUnifiedLoader")
    return adapter, clip_vision


# ---- the apply glue -----------------------------------------------------------------------------------

def _check_option(value: str, options: tuple[str, ...], name: str, node: str) -> None:
    if value not in options:
        raise ValueError(f"{node}: {name} '{value}' is not known; expected one of: {', '.join(options)}")


def apply_ipadapter(model: Any, adapter: Any, clip_vision: Any, image: torch.Tensor, weight: float = 1.0,
                    weight_type: str = "linear", combine_embeds: str = "concat", start_at: float = 0.0,
                    end_at: float = 1.0, embeds_scaling: str = "V only", image_negative: torch.Tensor | None = None,
                    attn_mask: torch.Tensor | None = None, node: str = "IPAdapterAdvanced") -> Any:
    """A new MODEL with ``adapter`` applied to ``model`` for the reference ``image`` (IMAGE [B,H,W,C]).

    Several reference images are combined with ``combine_embeds`` on the encoder features, before the
    projection (``concat`` keeps every image's tokens). The input MODEL is not changed.
    """
    _check_option(weight_type, WEIGHT_TYPES, "weight_type", node)
    _check_option(combine_embeds, COMBINE_EMBEDS, "combine_embeds", node)
    _check_option(embeds_scaling, EMBEDS_SCALING, "embeds_scaling", node)
    if not 0.0 <= start_at <= end_at <= 1.0:
        raise ValueError(f"{node}: need 0 <= start_at <= end_at <= 1; got start_at={start_at}, end_at={end_at}")
    if weight_type != "linear":
        raise NotImplementedError(f"{node}: weight_type '{weight_type}' is not supported yet; use 'linear' "
                                  f"(per-layer weight types arrive with their own issue)")
    if attn_mask is not None:
        raise NotImplementedError(f"{node}: attn_mask is not supported yet; disconnect the mask input "
                                  f"(attention masks arrive with their own issue)")
    check_family(adapter, model_family(model), node)
    application = build_application(adapter, clip_vision, image, weight, combine_embeds, start_at, end_at,
                                    embeds_scaling, image_negative, node)
    return attach_application(model, application)


def build_application(adapter: Any, clip_vision: Any, image: torch.Tensor, weight: float, combine_embeds: str,
                      start_at: float, end_at: float, embeds_scaling: str,
                      image_negative: torch.Tensor | None, node: str = "IPAdapterAdvanced") -> Any:
    """Encode, combine and package one adapter use as a backend-free Application.

    The uncond side without ``image_negative`` follows the existing node pack (``uncond="nodes"``).
    """
    from .application import Application
    from .embeds import encode_for_adapter

    spec = adapter.spec
    if str(getattr(spec, "feature", "")).startswith("face"):
        raise NotImplementedError(
            f"{node}: '{getattr(adapter, 'path', 'the adapter')}' is a FaceID-type adapter ({spec.kind}); it needs "
            f"face embeddings from insightface, which the IPAdapterFaceID node (coming) provides")
    if image is None or image.dim() != 4 or image.shape[0] == 0:
        raise ValueError(f"{node}: 'image' must be an IMAGE batch [B,H,W,C]; got "
                         f"{None if image is None else tuple(image.shape)}")
    embeds = encode_for_adapter(clip_vision, spec, image, image_negative, uncond="nodes")
    embeds = combine(embeds, combine_embeds)
    return Application(adapter=adapter, embeds=embeds, weight=float(weight), start_at=float(start_at),
                       end_at=float(end_at), embeds_scaling=embeds_scaling)


def _reduce(rows: torch.Tensor, mode: str) -> torch.Tensor:
    """Several images' features [N,...] reduced to one [1,...] (the existing pack's formulas)."""
    if mode == "add":
        return rows.sum(0, keepdim=True)
    if mode == "subtract":
        return (rows[0] - rows[1:].mean(0)).unsqueeze(0)
    if mode == "average":
        return rows.mean(0, keepdim=True)
    if mode == "norm average":
        # the norm is taken across the image axis per element, not per feature vector (as the pack does)
        return (rows / rows.norm(dim=0, keepdim=True)).mean(0, keepdim=True)
    raise ValueError(f"combine_embeds '{mode}' is not known; expected one of: {', '.join(COMBINE_EMBEDS)}")


def combine(embeds: Any, mode: str) -> Any:
    """Embeds of several reference images combined before the projection.

    ``concat`` keeps every image (their tokens are concatenated); the other modes reduce the cond
    features to one image and keep the first image's uncond, as the existing pack does.
    """
    if mode == "concat" or embeds.count < 2:
        return embeds
    changes = {"cond": _reduce(embeds.cond, mode), "uncond": embeds.uncond[:1]}
    if embeds.clip_cond is not None:
        changes.update(clip_cond=_reduce(embeds.clip_cond, mode), clip_uncond=embeds.clip_uncond[:1])
    return dataclasses.replace(embeds, **changes)


def attach_application(model: Any, application: Any) -> Any:
    """Hand ``application`` to the backend that owns ``model``'s type; returns the new MODEL."""
    from .backends import comfy
    from .backends.diffusers import DiffusersModel

    if isinstance(model, DiffusersModel):
        return model.with_application(application)
    if comfy.is_comfy_model(model):
        return comfy.apply_application(model, application)
    raise TypeError(f"expected a MODEL (DiffusersModel headless or a ComfyUI ModelPatcher), "
                    f"got {type(model).__name__}")
