"""Regional IP-Adapter parameters: what flows on an IPADAPTER_PARAMS socket, and how it is applied.

An IPADAPTER_PARAMS value is a list of :class:`RegionParams`, one per region: a reference image, the mask
that confines it (None = everywhere), its weight, weight type and step range.  IPAdapterRegionalConditioning
makes one-entry lists, IPAdapterCombineParams concatenates them, IPAdapterFromParams applies every entry as
its own application of one adapter (:func:`apply_params`), so N regions give the same MODEL as N chained
IPAdapterAdvanced nodes with the same inputs.

The existing pack carries the same data as a dict of parallel lists (``image``, ``attn_mask``, ``weight``,
``weight_type``, ``start_at``, ``end_at``); :func:`as_params` reads that form too, so params made by another
pack's nodes still apply.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from . import apply as engine
from . import masks

# The existing pack's dict-of-lists keys, in its order (also RegionParams' field order).
PARAM_KEYS: tuple[str, ...] = ("image", "attn_mask", "weight", "weight_type", "start_at", "end_at")


@dataclass(frozen=True)
class RegionParams:
    """One region: ``image`` (IMAGE [B,H,W,C]) drives the adapter where ``attn_mask`` (MASK, any size; None =
    the whole image) is, with ``weight`` / ``weight_type`` between ``start_at`` and ``end_at``."""

    image: torch.Tensor
    attn_mask: torch.Tensor | None = None
    weight: float = 1.0
    weight_type: str = "linear"
    start_at: float = 0.0
    end_at: float = 1.0


def region(image: torch.Tensor, attn_mask: torch.Tensor | None = None, weight: float = 1.0,
           weight_type: str = "linear", start_at: float = 0.0, end_at: float = 1.0,
           node: str = "IPAdapterRegionalConditioning") -> list[RegionParams]:
    """A one-entry IPADAPTER_PARAMS list; the inputs are checked here so a bad value names this node."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[0] == 0:
        found = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{node}: 'image' must be an IMAGE batch [B,H,W,C]; got {found}")
    if weight_type not in engine.WEIGHT_TYPES:
        raise ValueError(f"{node}: weight_type '{weight_type}' is not known; expected one of: "
                         f"{', '.join(engine.WEIGHT_TYPES)}")
    if not 0.0 <= start_at <= end_at <= 1.0:
        raise ValueError(f"{node}: need 0 <= start_at <= end_at <= 1; got start_at={start_at}, end_at={end_at}")
    if attn_mask is not None:
        attn_mask = masks.as_mask_batch(attn_mask, f"{node}: mask")
    return [RegionParams(image, attn_mask, float(weight), weight_type, float(start_at), float(end_at))]


def as_params(value: Any, what: str = "ipadapter_params") -> list[RegionParams]:
    """An IPADAPTER_PARAMS value as a list of RegionParams: ours (a list), or the existing pack's dict of
    parallel lists.  None (an unconnected optional input) gives an empty list."""
    if value is None:
        return []
    if isinstance(value, RegionParams):
        return [value]
    if isinstance(value, Mapping):
        return _from_parallel_lists(value, what)
    if isinstance(value, (list, tuple)) and all(isinstance(entry, RegionParams) for entry in value):
        return list(value)
    raise TypeError(f"{what}: expected IPADAPTER_PARAMS (from IPAdapterRegionalConditioning or "
                    f"IPAdapterCombineParams), got {type(value).__name__}")


def _from_parallel_lists(value: Mapping, what: str) -> list[RegionParams]:
    missing = [key for key in PARAM_KEYS if key not in value]
    if missing:
        raise ValueError(f"{what}: the params dict lacks {', '.join(missing)}; expected the lists "
                         f"{', '.join(PARAM_KEYS)}")
    lengths = {key: len(value[key]) for key in PARAM_KEYS}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{what}: the params lists differ in length ({lengths}); each region needs one "
                         f"entry in every list")
    return [RegionParams(*(value[key][i] for key in PARAM_KEYS)) for i in range(lengths["image"])]


def combine_params(*params: Any) -> list[RegionParams]:
    """All regions of ``params`` in order (unconnected inputs, None, are skipped)."""
    combined: list[RegionParams] = []
    for number, value in enumerate(params, start=1):
        combined.extend(as_params(value, f"IPAdapterCombineParams: params_{number}"))
    return combined


def mask_conditioning(conditioning: list | None, mask: torch.Tensor | None, strength: float) -> list | None:
    """``conditioning`` confined to ``mask`` with ``strength`` (the options ConditioningSetMask sets with
    "default" area), every entry's options copied so the input list is untouched; None or no mask: as is."""
    if conditioning is None or mask is None:
        return conditioning
    mask = masks.as_mask_batch(mask, "IPAdapterRegionalConditioning: mask")
    values = {"mask": mask, "set_area_to_bounds": False, "mask_strength": float(strength)}
    return [[cond, {**options, **values}] for cond, options in conditioning]


def apply_params(model: Any, adapter: Any, clip_vision: Any, params: Iterable[RegionParams] | Any, *,
                 combine_embeds: str = "concat", embeds_scaling: str = "V only",
                 image_negative: torch.Tensor | None = None, node: str = "IPAdapterFromParams") -> Any:
    """A new MODEL with one application of ``adapter`` per region of ``params`` (in order, unfold_batch off):
    the same as chaining one IPAdapterAdvanced per region with that region's image, mask, weight, weight
    type and step range, and the shared ``combine_embeds``, ``embeds_scaling`` and ``image_negative``."""
    regions = as_params(params, f"{node}: ipadapter_params")
    if not regions:
        raise ValueError(f"{node}: 'ipadapter_params' holds no region; connect an IPAdapterRegionalConditioning "
                         f"(or IPAdapterCombineParams) output")
    for number, entry in enumerate(regions, start=1):
        model = engine.apply_ipadapter(
            model, adapter, clip_vision, entry.image, weight=entry.weight, weight_type=entry.weight_type,
            combine_embeds=combine_embeds, start_at=entry.start_at, end_at=entry.end_at,
            embeds_scaling=embeds_scaling, image_negative=image_negative, attn_mask=entry.attn_mask,
            node=f"{node} (region {number} of {len(regions)})" if len(regions) > 1 else node)
    return model

