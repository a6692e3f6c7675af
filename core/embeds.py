"""Embeds: the image-encoder features an adapter is applied with, for the cond and the uncond side.

An adapter kind consumes one feature (:data:`FEATURE_BY_KIND`): base adapters the pooled, projected CLIP
``image_embeds`` [N,E]; Plus-type and full-face adapters the penultimate hidden states [N,257,H]; FaceID and
Portrait adapters a face embedding [N,512]; FaceID-Plus both a face embedding and the CLIP hidden states of
the face crops.  ``N`` counts reference images; each gives its own tokens after the projection.

The uncond side when no negative image is given follows one of two references (``uncond=``):

* ``"diffusers"`` (diffusers' pipelines and the original IP-Adapter training): zeros for ``image_embeds``;
  for hidden states the encoder run on ``zeros_like(pixel_values)``, i.e. an all-zero *normalized* input
  (the mean colour);
* ``"nodes"`` (the existing ComfyUI node pack): zeros for ``image_embeds``; for hidden states the encoder run
  on a black image (pixels 0 before normalization).

Face embeddings always have zeros as their uncond.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import memo
from .attention import fit_batch

# What each adapter kind (AdapterSpec.kind) feeds its projection: the main feature, and whether a
# FaceID-Plus style second input (CLIP hidden states of the face crops) comes with a face embedding.
FEATURE_BY_KIND: dict[str, tuple[str, bool]] = {
    "base": ("image_embeds", False),
    "light": ("image_embeds", False),
    "plus": ("hidden_states", False),
    "plus-face": ("hidden_states", False),
    "full-face": ("hidden_states", False),
    "faceid": ("face", False),
    "portrait": ("face", False),
    "portrait-unnorm": ("face", False),
    "faceid-plus": ("face", True),
    "faceid-plusv2": ("face", True),
}
UNCOND_MODES = ("diffusers", "nodes")


@dataclass(frozen=True, eq=False)
class Embeds:
    """Encoder features of N reference images and of their uncond counterpart.

    ``feature`` is ``"image_embeds"`` ([N,E]), ``"hidden_states"`` ([N,T,H]) or ``"face"`` ([N,512]); for
    FaceID-Plus, ``clip_cond``/``clip_uncond`` carry the CLIP hidden states of the face crops ([N,257,H]).
    """

    cond: torch.Tensor
    uncond: torch.Tensor
    feature: str
    clip_cond: torch.Tensor | None = None
    clip_uncond: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.cond.shape[0] != self.uncond.shape[0]:
            raise ValueError(f"Embeds: {self.cond.shape[0]} cond rows but {self.uncond.shape[0]} uncond rows")
        if (self.clip_cond is None) != (self.clip_uncond is None):
            raise ValueError("Embeds: clip_cond and clip_uncond must be given together")

    @property
    def count(self) -> int:
        """Number of reference images (rows)."""
        return int(self.cond.shape[0])


def feature_for(spec: Any) -> tuple[str, bool]:
    """(feature, needs_clip_hidden_states) for an AdapterSpec, from its kind."""
    try:
        return FEATURE_BY_KIND[spec.kind]
    except KeyError:
        raise ValueError(f"adapter kind {spec.kind!r} has no known encoder feature; "
                         f"known kinds: {sorted(FEATURE_BY_KIND)}") from None


def _adapter_name(spec: Any) -> str:
    name = getattr(spec, "name", "") or getattr(spec, "file", "") or ""
    family = getattr(spec, "family", "?")
    return f"IP-Adapter {name!r} ({family} {spec.kind})" if name else f"the {family} {spec.kind} IP-Adapter"


def check_width(spec: Any, feature: str, found: int) -> None:
    """Raise a ValueError naming both widths when the encoder's feature does not fit the adapter's projection."""
    needed = getattr(spec, "clip_width", getattr(spec, "encoder_width", None))
    if needed is None or int(needed) == int(found):
        return
    hint = getattr(spec, "encoder_hint", None) or "another CLIP vision encoder"
    label = "image_embeds" if feature == "image_embeds" else "hidden states"
    raise ValueError(
        f"{_adapter_name(spec)} needs {hint} ({needed}-d {label}) but the CLIP vision encoder gives "
        f"{found}-d {label}. Load the encoder the adapter was trained with.")


def _select(output: Any, feature: str) -> torch.Tensor:
    return output["image_embeds"] if feature == "image_embeds" else output["penultimate_hidden_states"]


def _black_image(clip_vision: Any, batch: int) -> torch.Tensor:
    size = int(getattr(clip_vision, "image_size", 224) or 224)
    return torch.zeros(batch, size, size, 3)


def _encode_side(clip_vision: Any, feature: str, images: torch.Tensor, image_negative: torch.Tensor | None,
                 uncond: str, crop: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) CLIP features of ``images`` for ``feature``, memoized by image content, encoder and
    preprocessing (:mod:`core.memo`): a re-run that changes only weights runs no encoder forward."""
    parts = (feature, uncond, bool(crop), memo.tensor_key(images), memo.tensor_key(image_negative))
    return memo.memoized("clip_vision", clip_vision, parts,
                         lambda: _encode_side_uncached(clip_vision, feature, images, image_negative, uncond, crop))


def _encode_side_uncached(clip_vision: Any, feature: str, images: torch.Tensor,
                          image_negative: torch.Tensor | None, uncond: str, crop: bool
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    count = images.shape[0]
    cond = _select(clip_vision.encode(images, crop=crop), feature).float()
    if image_negative is not None:
        negative = _select(clip_vision.encode(image_negative, crop=crop), feature).float()
        return cond, fit_batch(negative, count)
    if feature == "image_embeds":
        return cond, torch.zeros_like(cond)
    if uncond == "diffusers":
        pixels = clip_vision.preprocess(images, crop=crop)
        negative = _select(clip_vision.encode_pixels(torch.zeros_like(pixels)), feature).float()
        return cond, fit_batch(negative, count)
    negative = _select(clip_vision.encode(_black_image(clip_vision, 1), crop=crop), feature).float()
    return cond, fit_batch(negative, count)


def encode_for_adapter(
    clip_vision: Any,
    adapter_spec: Any,
    images: torch.Tensor | None,
    image_negative: torch.Tensor | None = None,
    uncond: str = "nodes",
    *,
    face_embeds: torch.Tensor | None = None,
    crop: bool = True,
) -> Embeds:
    """Encode reference ``images`` (IMAGE [N,H,W,C], 0..1) into the Embeds ``adapter_spec`` consumes.

    ``clip_vision`` is a :class:`core.encode.ClipVision` (or anything :func:`core.encode.as_clip_vision`
    accepts); ``uncond`` picks the reference whose uncond features are built when ``image_negative`` is None
    (see the module docstring).  FaceID-type adapters need ``face_embeds`` [N,512] (from insightface); for
    FaceID-Plus the ``images`` are the aligned face crops.  Raises ValueError when the encoder's width does
    not fit the adapter, naming both widths and the encoder the adapter needs.
    """
    if uncond not in UNCOND_MODES:
        raise ValueError(f"uncond mode {uncond!r} is not known; expected one of {list(UNCOND_MODES)}")
    # an on-demand encoder (the loaders' free_clip_vision option) lets go of its weights when this ends
    with memo.encoder_session(clip_vision):
        return _encode_for_adapter(clip_vision, adapter_spec, images, image_negative, uncond, face_embeds, crop)


def _encode_for_adapter(clip_vision: Any, adapter_spec: Any, images: torch.Tensor | None,
                        image_negative: torch.Tensor | None, uncond: str, face_embeds: torch.Tensor | None,
                        crop: bool) -> Embeds:
    feature, with_clip = feature_for(adapter_spec)
    if feature == "face":
        if face_embeds is None:
            raise ValueError(f"{_adapter_name(adapter_spec)} takes face embeddings (512-d, from insightface); "
                             "pass face_embeds")
        face = face_embeds.float().reshape(-1, face_embeds.shape[-1])
        if not with_clip:
            return Embeds(face, torch.zeros_like(face), "face")
        if images is None:
            raise ValueError(f"{_adapter_name(adapter_spec)} also needs the face crops as images for CLIP vision")
        clip_cond, clip_uncond = _encode_side(_as_clip_vision(clip_vision), "hidden_states", images,
                                              image_negative, uncond, crop)
        check_width(adapter_spec, "hidden_states", clip_cond.shape[-1])
        count = max(face.shape[0], clip_cond.shape[0])
        face, clip_cond, clip_uncond = (fit_batch(rows, count) for rows in (face, clip_cond, clip_uncond))
        return Embeds(face, torch.zeros_like(face), "face", clip_cond, clip_uncond)
    if images is None:
        raise ValueError(f"{_adapter_name(adapter_spec)} needs reference images")
    cond, negative = _encode_side(_as_clip_vision(clip_vision), feature, images, image_negative, uncond, crop)
    check_width(adapter_spec, feature, cond.shape[-1])
    return Embeds(cond, negative, feature)


def _as_clip_vision(obj: Any) -> Any:
    if obj is None:
        raise ValueError("no CLIP vision encoder was given, but this IP-Adapter encodes images with one")
    from .encode import as_clip_vision  # the encoder module pulls in transformers; only load it when used

    return as_clip_vision(obj)


# ---- combining several references ---------------------------------------------------------------------

# The existing pack's combine methods: the apply nodes offer the first five, IPAdapterCombineEmbeds all seven.
COMBINE_MODES: tuple[str, ...] = ("concat", "add", "subtract", "average", "norm average", "max", "min")


def _reduce(rows: torch.Tensor, mode: str) -> torch.Tensor:
    """Several images' features ``[N, ...]`` reduced to one ``[1, ...]`` (the existing pack's formulas)."""
    if mode == "add":
        return rows.sum(0, keepdim=True)
    if mode == "subtract":
        return (rows[0] - rows[1:].mean(0)).unsqueeze(0)
    if mode == "average":
        return rows.mean(0, keepdim=True)
    if mode == "norm average":
        # the norm is taken across the image axis per element, not per feature vector (as the pack does)
        return (rows / rows.norm(dim=0, keepdim=True)).mean(0, keepdim=True)
    if mode == "max":
        return rows.max(dim=0, keepdim=True).values
    if mode == "min":
        return rows.min(dim=0, keepdim=True).values
    raise ValueError(f"combine_embeds {mode!r} is not known; expected one of: {', '.join(COMBINE_MODES)}")


def _concat(parts: list[Embeds]) -> Embeds:
    """The rows of several Embeds as one, in order; they must hold the same feature of the same width."""
    first = parts[0]
    for index, part in enumerate(parts[1:], start=2):
        if part.feature != first.feature or part.cond.shape[1:] != first.cond.shape[1:]:
            raise ValueError(f"combine_embeds: embeds {index} hold {part.feature} {list(part.cond.shape[1:])} but "
                             f"embeds 1 hold {first.feature} {list(first.cond.shape[1:])}; only embeds of the same "
                             "encoder and feature (from the same kind of adapter) can be combined")
        if (part.clip_cond is None) != (first.clip_cond is None):
            raise ValueError(f"combine_embeds: embeds {index} and embeds 1 differ in carrying FaceID-Plus CLIP "
                             "features; combine embeds of the same adapter kind")

    def rows(name: str) -> torch.Tensor | None:
        if getattr(first, name) is None:
            return None
        return torch.cat([getattr(part, name) for part in parts], dim=0)

    return Embeds(rows("cond"), rows("uncond"), first.feature, rows("clip_cond"), rows("clip_uncond"))


def combine_embeds(embeds: "Embeds | list[Embeds] | tuple[Embeds, ...]", mode: str = "concat") -> Embeds:
    """Several references' Embeds as one, by ``mode`` (one of :data:`COMBINE_MODES`).

    A list is first concatenated along the image axis (in order).  ``concat`` keeps every image (their
    tokens are concatenated at apply time); the other modes reduce the cond features to one image:
    ``add`` (sum), ``subtract`` (first minus the mean of the others), ``average``, ``norm average`` (each
    element divided by its norm across the images, then averaged), ``max`` / ``min`` (element-wise over the
    images).  The uncond of a reduced Embeds is the first image's, as the existing pack does.  FaceID-Plus
    CLIP features are reduced alike.  A single image is returned unchanged.
    """
    if mode not in COMBINE_MODES:
        raise ValueError(f"combine_embeds {mode!r} is not known; expected one of: {', '.join(COMBINE_MODES)}")
    parts = list(embeds) if isinstance(embeds, (list, tuple)) else [embeds]
    if not parts:
        raise ValueError("combine_embeds: no embeds given")
    for index, part in enumerate(parts, start=1):
        if not isinstance(part, Embeds):
            raise TypeError(f"combine_embeds: item {index} is a {type(part).__name__}, expected EMBEDS (Embeds)")
    combined = parts[0] if len(parts) == 1 else _concat(parts)
    if mode == "concat" or combined.count < 2:
        return combined
    clip = {}
    if combined.clip_cond is not None:
        clip = dict(clip_cond=_reduce(combined.clip_cond, mode), clip_uncond=combined.clip_uncond[:1])
    return Embeds(_reduce(combined.cond, mode), combined.uncond[:1], combined.feature, **clip)
