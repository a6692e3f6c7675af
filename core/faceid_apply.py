"""FaceID apply glue: faces in reference images → the Embeds each FaceID kind consumes → a new MODEL.

Per adapter kind (``AdapterSpec.kind``):

=================  ============================================================================================
faceid             the L2-normalised ArcFace embedding of each face [N,512]; uncond zeros
portrait           the same, several face images at once: each face gives its 16 tokens, concatenated
portrait-unnorm    the raw (not normalised) embedding, read by a resampler
faceid-plus        the embedding plus CLIP vision's penultimate hidden states of the aligned face crop; the
                   CLIP uncond follows the nodes' convention (``image_negative``, else a black image).  Plus V2
                   is the same weights with the shortcut ``x + s·perceiver(x)``, ``s = weight_faceidv2``
=================  ============================================================================================

Plus V2 cannot be told from Plus by its weights; as in the existing pack it is chosen by the file name
(``plusv2`` in it) unless the caller says so (the FaceID unified loader knows it from its preset).  The
aligned crop is 224 px for SD1.5 and 256 px for SDXL and is returned as ``face_image``.  An image without a
face raises :class:`core.faceid.FaceNotFoundError` naming its index, or with ``on_no_face="skip"`` is left
out; when no image has a face the model is returned unchanged.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from . import faceid, memo
from .attention import fit_batch
from .embeds import Embeds, encode_for_adapter, feature_for

logger = logging.getLogger(__name__)

FACEID_KINDS = frozenset({"faceid", "faceid-plus", "faceid-plusv2", "portrait", "portrait-unnorm"})
NO_FACE_ACTIONS = faceid.NO_FACE_ACTIONS
# the existing pack's rule: a FaceID-Plus file whose name says "plusv2" runs with the v2 shortcut
_V2_NAME = re.compile(r"plus.?v2", re.IGNORECASE)


@dataclass(frozen=True, eq=False)
class FaceEmbeds:
    """What the faces of a reference batch give an adapter.

    ``embeds`` is None when no image had a face (and ``on_no_face`` was ``"skip"``); ``face_image`` holds the
    aligned crops [N,S,S,3] (one black S×S image when there is none); ``found`` is per input image.
    """

    embeds: Embeds | None
    face_image: torch.Tensor
    found: tuple[bool, ...]


def adapter_name(adapter: Any) -> str:
    """The adapter's file name for messages."""
    return Path(str(getattr(adapter, "path", "") or "the IP-Adapter")).name


def is_faceid(adapter: Any) -> bool:
    """Whether ``adapter`` consumes face embeddings (FaceID, FaceID-Plus/V2, Portrait, Portrait-unnorm)."""
    return getattr(getattr(adapter, "spec", None), "kind", None) in FACEID_KINDS


def is_plus_v2(adapter: Any, hint: bool | None = None) -> bool:
    """Whether a FaceID-Plus ``adapter`` runs as Plus V2: ``hint`` when given, else ``plusv2`` in its file name."""
    kind = getattr(getattr(adapter, "spec", None), "kind", None)
    if kind == "faceid-plusv2":
        return True
    if kind != "faceid-plus":
        return False
    if hint is not None:
        return bool(hint)
    return bool(_V2_NAME.search(adapter_name(adapter)))


def needs_clip_vision(adapter: Any) -> bool:
    """Whether the adapter also encodes the face crop with CLIP vision (FaceID Plus / Plus V2)."""
    return feature_for(adapter.spec)[1]


def crop_size(family: str) -> int:
    """Side of the aligned face crop for a model family (224 SD1.5, 256 SDXL)."""
    try:
        return faceid.CROP_SIZES[family]
    except KeyError:
        raise ValueError(f"no FaceID face-crop size for model family '{family}'; "
                         f"known: {', '.join(faceid.CROP_SIZES)}") from None


def check_faceid(adapter: Any, node: str) -> None:
    """Raise a ValueError when ``adapter`` is not a FaceID-type adapter."""
    if not is_faceid(adapter):
        kind = getattr(getattr(adapter, "spec", None), "kind", type(adapter).__name__)
        raise ValueError(f"{node}: IP-Adapter '{adapter_name(adapter)}' is a {kind} adapter, not a FaceID one; "
                         f"apply it with IPAdapterAdvanced, or load a FaceID / FaceID Plus / Portrait file")


def unpack_pipeline(ipadapter: Any, clip_vision: Any, insightface: Any, node: str) -> tuple[Any, Any, Any, bool | None]:
    """(adapter, clip_vision, insightface, plus_v2 hint) from an IPADAPTER value and the node's optional inputs.

    A unified loader's pipeline lends its CLIP vision, InsightFace and (FaceID loader) Plus V2 flag; inputs
    connected to the node win.  A bare adapter (IPAdapterModelLoader) brings nothing else.
    """
    plus_v2 = None
    if isinstance(ipadapter, dict) and "ipadapter" in ipadapter:
        adapter = (ipadapter.get("ipadapter") or {}).get("model")
        if clip_vision is None:
            clip_vision = (ipadapter.get("clipvision") or {}).get("model")
        if insightface is None:
            insightface = (ipadapter.get("insightface") or {}).get("model")
        plus_v2 = ipadapter.get("faceid_plus_v2")
    else:
        adapter = ipadapter
    if adapter is None:
        raise ValueError(f"{node}: the IPADAPTER input holds no loaded adapter; connect an IPAdapterModelLoader "
                         f"or IPAdapterUnifiedLoaderFaceID")
    return adapter, clip_vision, insightface, plus_v2


def _face_index(face_index: int | None) -> int | None:
    # the node widget uses -1 for "the largest face"
    return None if face_index is None or face_index < 0 else int(face_index)


def encode_faces(adapter: Any, insightface: Any, image: torch.Tensor, *, clip_vision: Any = None,
                 image_negative: torch.Tensor | None = None, face_index: int | None = None,
                 on_no_face: str = "error", keep_rows: bool = False, node: str = "IPAdapterFaceID") -> FaceEmbeds:
    """Analyse the faces of ``image`` (IMAGE [B,H,W,C]) and encode them for ``adapter``.

    ``face_index``: None or -1 takes the largest face, n ≥ 0 the n-th counted left to right.  ``keep_rows``
    keeps one row per input image (an image without a face gets the uncond row), so that reference i still
    drives latent i with ``unfold_batch``.  FaceID-Plus needs ``clip_vision``.
    """
    check_faceid(adapter, node)
    if insightface is None:
        raise ValueError(f"{node}: FaceID adapter '{adapter_name(adapter)}' needs an InsightFace model: connect an "
                         f"IPAdapterInsightFaceLoader to 'insightface', or load the adapter with "
                         f"IPAdapterUnifiedLoaderFaceID")
    if image is None or not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[0] == 0:
        raise ValueError(f"{node}: 'image' must be an IMAGE batch [B,H,W,C]; got "
                         f"{None if not isinstance(image, torch.Tensor) else tuple(image.shape)}")
    if on_no_face not in NO_FACE_ACTIONS:
        raise ValueError(f"{node}: on_no_face '{on_no_face}' is not known; "
                         f"expected one of {', '.join(NO_FACE_ACTIONS)}")
    spec = adapter.spec
    size = crop_size(spec.family)
    try:
        analysis = analyze_faces_memoized(insightface, image, crop_size=size, face_index=_face_index(face_index),
                                          on_no_face=on_no_face, normed=spec.kind != "portrait-unnorm")
    except (faceid.FaceNotFoundError, IndexError) as error:
        raise type(error)(f"{node}: {error}") from None
    found = tuple(analysis.found)
    if not analysis.image_index:
        logger.warning("%s: no face in any of the %d reference image(s); the adapter is skipped", node, len(found))
        return FaceEmbeds(None, torch.zeros(1, size, size, 3), found)
    _, with_clip = feature_for(spec)
    if with_clip and clip_vision is None:
        raise ValueError(f"{node}: FaceID Plus adapter '{adapter_name(adapter)}' also encodes the face crop with "
                         f"CLIP vision: connect a CLIPVisionLoader to 'clip_vision' or use "
                         f"IPAdapterUnifiedLoaderFaceID")
    embeds = encode_for_adapter(clip_vision if with_clip else None, spec, analysis.crops if with_clip else None,
                                image_negative if with_clip else None, uncond="nodes",
                                face_embeds=analysis.embeds)
    if keep_rows and not all(found):
        embeds = _rows_per_image(embeds, analysis.image_index, len(found))
    return FaceEmbeds(embeds, analysis.crops, found)


def analyze_faces_memoized(insightface: Any, image: torch.Tensor, *, crop_size: int, face_index: int | None,
                           on_no_face: str, normed: bool) -> faceid.FaceAnalysis:
    """:func:`core.faceid.analyze_faces`, memoized by image content, InsightFace pack and every option
    (:mod:`core.memo`): a re-run that changes only weights runs no detection or recognition.

    A result is shared between callers: treat its tensors as read-only (a changed one is recomputed).
    """
    parts = (memo.tensor_key(image), int(crop_size), face_index, on_no_face, bool(normed), faceid.DET_SIZES)
    return memo.memoized("insightface", insightface, parts, lambda: faceid.analyze_faces(
        insightface, image, crop_size=crop_size, face_index=face_index, on_no_face=on_no_face, normed=normed))


def _rows_per_image(embeds: Embeds, rows: Sequence[int], count: int) -> Embeds:
    """One row per input image: images without a face get the uncond features (their weight is then 0)."""
    def spread(found: torch.Tensor, filler: torch.Tensor) -> torch.Tensor:
        full = fit_batch(filler[:1], count).clone()
        full[list(rows)] = found
        return full

    changes = {"cond": spread(embeds.cond, embeds.uncond), "uncond": fit_batch(embeds.uncond, count).clone()}
    if embeds.clip_cond is not None:
        changes.update(clip_cond=spread(embeds.clip_cond, embeds.clip_uncond),
                       clip_uncond=fit_batch(embeds.clip_uncond, count).clone())
    return dataclasses.replace(embeds, **changes)


def _per_image_weights(weight: Any, found: Sequence[bool]) -> list[float]:
    """Per-reference weights for ``unfold_batch`` with 0 where the image had no face."""
    if isinstance(weight, (list, tuple)):
        weights = [float(w) for w in weight]
        weights = weights + [weights[-1]] * (len(found) - len(weights)) if weights else [1.0] * len(found)
    else:
        weights = [float(weight)] * len(found)
    return [w if has_face else 0.0 for w, has_face in zip(weights, found)]


def apply_faceid(model: Any, adapter: Any, insightface: Any, image: torch.Tensor, *, clip_vision: Any = None,
                 weight: Any = 1.0, weight_faceidv2: float = 1.0, plus_v2: bool | None = None,
                 weight_type: str = "linear", combine_embeds: str = "concat", start_at: float = 0.0,
                 end_at: float = 1.0, embeds_scaling: str = "V only", image_negative: torch.Tensor | None = None,
                 attn_mask: torch.Tensor | None = None, unfold_batch: bool = False, face_index: int | None = None,
                 on_no_face: str = "error", node: str = "IPAdapterFaceID") -> tuple[Any, torch.Tensor]:
    """(new MODEL, face_image): the FaceID ``adapter`` applied with the faces of ``image``.

    ``weight_faceidv2`` is the Plus V2 shortcut scale (used when :func:`is_plus_v2`, ``plus_v2`` deciding when
    given).  When no image has a face (``on_no_face="skip"``) the model is returned unchanged.
    """
    from .apply import apply_ipadapter, check_family, model_family
    from .embeds import combine_embeds as combine

    check_faceid(adapter, node)
    check_family(adapter, model_family(model), node)
    faces = encode_faces(adapter, insightface, image, clip_vision=clip_vision, image_negative=image_negative,
                         face_index=face_index, on_no_face=on_no_face, keep_rows=unfold_batch, node=node)
    if faces.embeds is None:
        return model, faces.face_image
    embeds = faces.embeds
    if unfold_batch:
        if not all(faces.found) or isinstance(weight, (list, tuple)):
            weight = _per_image_weights(weight, faces.found)
    else:
        embeds = combine(embeds, combine_embeds)
    v2 = float(weight_faceidv2) if is_plus_v2(adapter, plus_v2) else None
    patched = apply_ipadapter(model, adapter, clip_vision, None, weight=weight, weight_type=weight_type,
                              combine_embeds=combine_embeds, start_at=start_at, end_at=end_at,
                              embeds_scaling=embeds_scaling, attn_mask=attn_mask, node=node, embeds=embeds,
                              unfold_batch=unfold_batch, faceid_v2_weight=v2)
    return patched, faces.face_image


def encode_face_embeds(adapter: Any, insightface: Any, image: torch.Tensor, *, clip_vision: Any = None,
                       image_negative: torch.Tensor | None = None, weight: float = 1.0,
                       face_index: int | None = None, on_no_face: str = "error",
                       node: str = "IPAdapterFaceIDEncoder") -> tuple[Embeds, Embeds, torch.Tensor]:
    """(pos_embed, neg_embed, face_image) for the EMBEDS sockets, as IPAdapterEncoder shapes them.

    pos = the faces' features (× ``weight``) with their uncond; neg = the uncond as both sides.  Raises
    :class:`core.faceid.FaceNotFoundError` when no image has a face, even with ``skip`` (nothing to encode).
    """
    faces = encode_faces(adapter, insightface, image, clip_vision=clip_vision, image_negative=image_negative,
                         face_index=face_index, on_no_face=on_no_face, node=node)
    if faces.embeds is None:
        raise faceid.FaceNotFoundError(f"{node}: InsightFace found no face in any of the {len(faces.found)} "
                                       f"image(s), so there is nothing to encode; use pictures with a visible face")
    embeds = faces.embeds
    scale = float(weight)
    pos = dataclasses.replace(
        embeds, cond=embeds.cond * scale,
        clip_cond=None if embeds.clip_cond is None else embeds.clip_cond * scale)
    neg = dataclasses.replace(embeds, cond=embeds.uncond, clip_cond=embeds.clip_uncond)
    return pos, neg, faces.face_image
