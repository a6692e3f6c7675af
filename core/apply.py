"""From apply-node inputs to a new MODEL: the one place that turns widget values into an Application.

Every apply node calls :func:`apply_ipadapter`; it checks the inputs, encodes the reference images for the
adapter (or takes EMBEDS), maps the weight type to per-layer weights (``core.weighting``), builds the
backend-free ``Application`` and hands it to the backend that owns the MODEL's type (the diffusers handle
headless, ComfyUI's ModelPatcher inside ComfyUI).
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, Sequence

import torch

from . import masks, memo, weighting
from .application import Application
from .embeds import COMBINE_MODES, Embeds, combine_embeds, encode_for_adapter
from .weighting import LayerWeights

# Option lists of the existing pack, in widget order (the first entry is the default).
WEIGHT_TYPES: tuple[str, ...] = weighting.WEIGHT_TYPES
# The apply nodes' combine_embeds combo (IPAdapterCombineEmbeds also offers max and min: embeds.COMBINE_MODES).
COMBINE_EMBEDS: tuple[str, ...] = COMBINE_MODES[:5]
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
    """The CLIP_VISION of ``path``: inside ComfyUI (a weights file) ComfyUI's own ``ClipVisionModel``, as
    CLIPVisionLoader gives; elsewhere (or for a transformers folder) our cached ClipVision."""
    from . import encode
    from .backends import comfy

    comfy_loader = comfy.clip_vision_loader()
    if comfy_loader is not None and os.path.isfile(path):
        # ComfyUI's model management then places, casts and offloads it like any CLIPVisionLoader output;
        # our loader would keep a second, fp32 copy on the CPU that ComfyUI neither sees nor moves to the GPU.
        model = comfy_loader(path)
        if model is None:
            raise ValueError(f"ComfyUI could not read '{path}' as a CLIP vision model; pick a CLIP-ViT-H or "
                             "CLIP-ViT-bigG file in models/clip_vision")
        return model
    return encode.load_clip_vision(path)


def load_clip_vision_on_demand(path: str) -> Any:
    """A ClipVision of ``path`` that holds its weights only while encoding (``core.memo.on_demand_clip_vision``):
    the loaders' ``free_clip_vision`` option; the encoder memo keeps the outputs.

    Inside ComfyUI a weights file is ComfyUI's own model instead: its model management already offloads
    models it does not need, and the encoder memo still spares the forwards.
    """
    from .backends import comfy

    if comfy.clip_vision_loader() is not None and os.path.isfile(path):
        return load_clip_vision(path)
    return memo.on_demand_clip_vision(path)


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


@contextlib.contextmanager
def _named(node: str) -> Iterator[None]:
    """Prefix the node's name to a ValueError/TypeError raised inside that does not name it yet."""
    try:
        yield
    except (ValueError, TypeError) as error:
        if str(error).startswith(f"{node}:"):
            raise
        raise type(error)(f"{node}: {error}") from error


def apply_ipadapter(model: Any, adapter: Any, clip_vision: Any = None, image: torch.Tensor | None = None, *,
                    weight: float | Sequence[float] = 1.0, weight_type: str = "linear",
                    combine_embeds: str = "concat", start_at: float = 0.0, end_at: float = 1.0,
                    embeds_scaling: str = "V only", image_negative: torch.Tensor | None = None,
                    attn_mask: torch.Tensor | None = None, node: str = "IPAdapterAdvanced",
                    embeds: Embeds | None = None, layer_weights: LayerWeights | Sequence[float] | None = None,
                    boost: float | None = None, unfold_batch: bool = False, encode_batch_size: int = 0,
                    faceid_v2_weight: float | None = None) -> Any:
    """A new MODEL with ``adapter`` applied to ``model``; the input MODEL is not changed.

    The references are either ``image`` (IMAGE [B,H,W,C], encoded with ``clip_vision``, the nodes' uncond
    convention, ``image_negative`` as the uncond when given, several images combined by ``combine_embeds``)
    or ``embeds`` (a :class:`core.embeds.Embeds`, used as is) — exactly one of the two.

    ``weight`` is a number, or (with ``unfold_batch``) one number per latent/frame; without ``unfold_batch``
    a list uses its first value, as the existing pack does.  ``weight_type`` (and ``boost``, the precise
    types' style/composition boost) map through :func:`core.weighting.layer_weights`, per frame; a
    ``layer_weights`` override (a :class:`core.weighting.LayerWeights` that already includes the weight, or
    one cond weight per layer) replaces that map, and a per-frame weight list then multiplies it.
    ``attn_mask`` (MASK [H,W] or [N,H,W], any size) confines this adapter's output (``ipadapter_plus``
    resizing).  ``unfold_batch``: reference i drives latent i (combine_embeds is then not applied).
    ``encode_batch_size`` > 0 encodes the images in chunks of that many.  ``faceid_v2_weight``: FaceID-Plus
    v2 shortcut scale (None = v1).  Every error names ``node``.
    """
    _check_option(weight_type, weighting.WEIGHT_TYPES + weighting.INTERNAL_WEIGHT_TYPES, "weight_type", node)
    _check_option(combine_embeds, COMBINE_MODES, "combine_embeds", node)
    _check_option(embeds_scaling, EMBEDS_SCALING, "embeds_scaling", node)
    if not 0.0 <= start_at <= end_at <= 1.0:
        raise ValueError(f"{node}: need 0 <= start_at <= end_at <= 1; got start_at={start_at}, end_at={end_at}")
    if (image is None) == (embeds is None):
        raise ValueError(f"{node}: give the reference either as 'image' (encoded here) or as 'embeds' (already "
                         f"encoded), not {'both' if image is not None else 'neither'}")
    family = model_family(model)
    check_family(adapter, family, node)
    with _named(node):
        frames = _frame_weights(weight, unfold_batch, node)
        per_layer = _weight_fields(weight_type, frames, family, boost, layer_weights)
        if attn_mask is not None:
            attn_mask = masks.as_mask_batch(attn_mask, "attn_mask")
        if embeds is None:
            embeds = encode_images(adapter, clip_vision, image, image_negative,
                                   "concat" if unfold_batch else combine_embeds, encode_batch_size, node=node)
        elif not isinstance(embeds, Embeds):
            raise TypeError(f"'embeds' must be EMBEDS (core.embeds.Embeds), got {type(embeds).__name__}")
        application = Application(
            adapter=adapter, embeds=embeds, weight=frames[0], start_at=float(start_at), end_at=float(end_at),
            embeds_scaling=embeds_scaling, attn_mask=attn_mask, unfold_batch=bool(unfold_batch),
            faceid_v2_weight=None if faceid_v2_weight is None else float(faceid_v2_weight),
            mask_method="ipadapter_plus", **per_layer)
        return attach_application(model, application)


def _frame_weights(weight: Any, unfold_batch: bool, node: str) -> list[float]:
    """The weight as a list: one entry, or (with unfold_batch) one per latent/frame."""
    if isinstance(weight, torch.Tensor):
        weight = weight.reshape(-1).tolist()
    if not isinstance(weight, (list, tuple)):
        return [float(weight)]
    if len(weight) == 0:
        raise ValueError(f"{node}: the weight list is empty; give a number or one weight per frame")
    values = [float(w) for w in weight]
    return values if unfold_batch else values[:1]  # the pack uses the first weight when not unfolding


def _weight_fields(weight_type: str, frames: list[float], family: str, boost: float | None,
                   override: LayerWeights | Sequence[float] | None) -> dict:
    """Application fields for the per-layer (and per-frame) weights."""
    if override is not None:
        if not isinstance(override, LayerWeights):
            override = LayerWeights(tuple(override))
        if len(frames) == 1:
            return dict(layer_weights=override.cond, uncond_layer_weights=override.uncond)
        tables = [LayerWeights(tuple(w * f for w in override.cond),
                               None if override.uncond is None else tuple(w * f for w in override.uncond))
                  for f in frames]
    elif weight_type == "linear" and boost is None and len(frames) == 1:
        return {}  # ``weight`` on every layer
    else:
        tables = [weighting.layer_weights(weight_type, f, family, boost=boost) for f in frames]
    if len(tables) == 1:
        return dict(layer_weights=tables[0].cond, uncond_layer_weights=tables[0].uncond)
    swapped = any(t.uncond is not None for t in tables)
    return dict(frame_layer_weights=tuple(t.cond for t in tables),
                frame_uncond_layer_weights=tuple(t.uncond or (0.0,) * len(t.cond) for t in tables) if swapped else None)


def encode_images(adapter: Any, clip_vision: Any, image: torch.Tensor, image_negative: torch.Tensor | None = None,
                  combine_embeds: str = "concat", encode_batch_size: int = 0, node: str = "IPAdapterEncoder"
                  ) -> Embeds:
    """Encode reference images for ``adapter`` with the nodes' uncond convention (what IPAdapterEncoder does).

    ``image_negative`` (IMAGE) gives the uncond side, else a black image's features (zeros for
    ``image_embeds``).  ``encode_batch_size`` > 0 encodes in chunks of that many images (less memory).
    Several images are then combined by ``combine_embeds`` (``concat`` keeps them all).  FaceID-type
    adapters take face embeddings, not images: they raise an error pointing at IPAdapterFaceID.
    """
    _check_option(combine_embeds, COMBINE_MODES, "combine_embeds", node)
    spec = adapter.spec
    if str(getattr(spec, "feature", "")).startswith("face"):
        raise ValueError(
            f"{node}: '{getattr(adapter, 'path', 'the adapter')}' is a FaceID-type adapter ({spec.kind}); it needs "
            f"face embeddings from InsightFace: use the IPAdapterFaceID node (or give this node EMBEDS from "
            f"IPAdapterFaceIDEncoder)")
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[0] == 0:
        raise ValueError(f"{node}: 'image' must be an IMAGE batch [B,H,W,C]; got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    if int(encode_batch_size) < 0:
        raise ValueError(f"{node}: encode_batch_size must be 0 (all at once) or positive, got {encode_batch_size}")
    count = image.shape[0]
    size = int(encode_batch_size) or count
    parts = []
    # one session over every chunk: an on-demand encoder loads its weights once, not once per chunk
    with _named(node), memo.encoder_session(clip_vision):
        for start in range(0, count, size):
            negative = image_negative
            if negative is not None and negative.shape[0] == count and size < count:
                negative = negative[start:start + size]  # one negative per image: keep them paired
            parts.append(encode_for_adapter(clip_vision, spec, image[start:start + size], negative, uncond="nodes"))
        return combine(parts, combine_embeds)


combine = combine_embeds  # the name earlier callers used


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
