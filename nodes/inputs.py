"""The input declarations the pack's nodes share, as data: one table of the recurring inputs, read by name.

A node's ``INPUT_TYPES`` still lists every input in its widget order (saved workflows store widget values
by position, so that order is part of the node's contract); these helpers only spare it from spelling the
same spec again.  Every call returns new objects, so a caller that edits what it got (ComfyUI's front end
and some packs do) cannot change another node's declaration.
"""
from __future__ import annotations

from typing import Any, Callable

from ..core import apply as engine

Spec = tuple  # one INPUT_TYPES entry: (TYPE,) / (TYPE, {options}) / ([choices],) / ([choices], {options})


def weight(maximum: float = 3.0, *, default: float = 1.0, minimum: float = -1.0, step: float = 0.05) -> Spec:
    """A weight widget; the apply nodes differ only in the upper bound (3 or 5) and the encoders in the step."""
    return ("FLOAT", {"default": default, "min": minimum, "max": maximum, "step": step})


def fraction(default: float, step: float) -> Spec:
    """A FLOAT widget in 0..1 (step range ends, sharpening, ratios)."""
    return ("FLOAT", {"default": default, "min": 0.0, "max": 1.0, "step": step})


def choice(options: Any, **extra: Any) -> Spec:
    """A combo of ``options`` (a fresh list), with an options dict only when ``extra`` is given."""
    return (list(options), dict(extra)) if extra else (list(options),)


# The inputs that mean the same everywhere they appear: name -> spec factory.
_SHARED: dict[str, Callable[[], Spec]] = {
    # sockets
    "model": lambda: ("MODEL",),
    "ipadapter": lambda: ("IPADAPTER",),
    "image": lambda: ("IMAGE",),
    "image_negative": lambda: ("IMAGE",),
    "attn_mask": lambda: ("MASK",),
    "mask": lambda: ("MASK",),
    "clip_vision": lambda: ("CLIP_VISION",),
    "insightface": lambda: ("INSIGHTFACE",),
    "embeds": lambda: ("EMBEDS",),
    # widgets
    "weight": weight,
    "weight_type": lambda: choice(engine.WEIGHT_TYPES),
    "combine_embeds": lambda: choice(engine.COMBINE_EMBEDS),
    "embeds_scaling": lambda: choice(engine.EMBEDS_SCALING),
    "start_at": lambda: fraction(0.0, 0.001),
    "end_at": lambda: fraction(1.0, 0.001),
}


def named(*names: str) -> dict[str, Spec]:
    """``{name: spec}`` for the shared inputs ``names``, in the order given (merge into INPUT_TYPES with ``**``)."""
    unknown = [name for name in names if name not in _SHARED]
    if unknown:
        raise KeyError(f"nodes.inputs.named: no shared input spec for {unknown}; known: {sorted(_SHARED)}")
    return {name: _SHARED[name]() for name in names}


def reference_optional(*more: str) -> dict[str, Spec]:
    """The optional inputs of most apply nodes (image_negative, attn_mask, clip_vision), then ``more``."""
    return named("image_negative", "attn_mask", "clip_vision", *more)
