"""The v1 node pack's node names, for workflows saved before its 2024 rewrite (category ``ipadapter/legacy``).

Each class keeps its v1 class_type, input names, input order (so a UI save's ``widgets_values`` land on the
right widgets) and outputs, and runs on the engine today's nodes use: IPAdapterApply is IPAdapterAdvanced
(IPAdapterBatch with ``unfold_batch``) with ``weight_type`` ``linear``, ``combine_embeds`` ``concat``, the v1
weight type as ``embeds_scaling`` and ``noise`` as a noise negative image (``core.legacy``).  The classes
are marked DEPRECATED, so ComfyUI still runs old workflows but no longer offers them for new ones.
"""
from __future__ import annotations

from ..core import apply as engine
from ..core import embeds as embeds_core
from ..core import faceid, faceid_apply, legacy
from . import embeds as embeds_nodes
from . import inputs
from .apply import apply_pipeline

_CATEGORY = "ipadapter/legacy"


def _v1_required(*references: str, weight: tuple | None = None, noise: bool = True, **after: tuple) -> dict:
    """The v1 apply nodes' required inputs in their widget order: ipadapter, the ``references`` inputs, model,
    weight, noise (unless ``noise`` is false), the v1 weight_type, start_at, end_at, then ``after`` in order."""
    required = inputs.named("ipadapter", *references, "model")
    required["weight"] = weight or inputs.weight()
    if noise:
        required["noise"] = inputs.fraction(0.0, 0.01)
    required["weight_type"] = inputs.choice(legacy.WEIGHT_TYPES)
    return {**required, **inputs.named("start_at", "end_at"), **after}


def _unfold() -> tuple:
    return ("BOOLEAN", {"default": False})


class IPAdapterApply:
    """Apply IPAdapter (v1): IPAdapterAdvanced with the v1 weight type as embeds_scaling and noise as a
    noise negative image."""

    DEPRECATED = True
    DESCRIPTION = ("v1 node kept for old workflows; use IPAdapter Advanced (weight_type → embeds_scaling, "
                   "noise → IPAdapter Noise into image_negative).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": _v1_required("clip_vision", "image", unfold_batch=_unfold()),
            "optional": inputs.named("attn_mask"),
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply_ipadapter"
    CATEGORY = _CATEGORY

    def apply_ipadapter(self, ipadapter, clip_vision, image, model, weight=1.0, noise=0.0, weight_type="original",
                        start_at=0.0, end_at=1.0, unfold_batch=False, attn_mask=None):
        node = "IPAdapterApply"
        return (apply_pipeline(
            node, model, ipadapter, clip_vision, image, weight=weight, start_at=start_at, end_at=end_at,
            embeds_scaling=legacy.embeds_scaling_for(weight_type, node),
            image_negative=legacy.noise_negative(image, noise, node), attn_mask=attn_mask,
            unfold_batch=bool(unfold_batch)),)


class IPAdapterApplyFaceID:
    """Apply IPAdapter FaceID (v1): IPAdapterFaceID with the v1 weight type as embeds_scaling; ``faceid_v2``
    and ``weight_v2`` are today's Plus V2 switch and ``weight_faceidv2``."""

    DEPRECATED = True
    DESCRIPTION = "v1 node kept for old workflows; use IPAdapter FaceID."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": _v1_required("clip_vision", "insightface", "image", faceid_v2=("BOOLEAN", {"default": False}),
                                     weight_v2=inputs.weight(), unfold_batch=_unfold()),
            "optional": inputs.named("attn_mask"),
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply_ipadapter"
    CATEGORY = _CATEGORY

    def apply_ipadapter(self, ipadapter, clip_vision, insightface, image, model, weight=1.0, noise=0.0,
                        weight_type="original", start_at=0.0, end_at=1.0, faceid_v2=False, weight_v2=1.0,
                        unfold_batch=False, attn_mask=None):
        node = "IPAdapterApplyFaceID"
        adapter, clip_vision, insightface, _ = faceid_apply.unpack_pipeline(ipadapter, clip_vision, insightface, node)
        negative = legacy.face_noise_negative(adapter, insightface, image, noise, engine.model_family(model), node)
        patched, _ = faceid_apply.apply_faceid(
            model, adapter, insightface, image, clip_vision=clip_vision, weight=weight, weight_faceidv2=weight_v2,
            plus_v2=bool(faceid_v2), start_at=start_at, end_at=end_at,
            embeds_scaling=legacy.embeds_scaling_for(weight_type, node), image_negative=negative,
            attn_mask=attn_mask, unfold_batch=bool(unfold_batch), node=node)
        return (patched,)


class _EncodedApply(embeds_nodes.IPAdapterEmbeds):
    """IPAdapterEmbeds under the legacy node's name (errors name the node the user has)."""

    NODE_NAME = "IPAdapterApplyEncoded"


class _EncodedApplyBatch(_EncodedApply):
    UNFOLD_BATCH = True


class IPAdapterApplyEncoded:
    """Apply IPAdapter from Encoded (v1): IPAdapterEmbeds (IPAdapterEmbedsBatch with ``unfold_batch``) with
    the v1 weight type as embeds_scaling."""

    DEPRECATED = True
    DESCRIPTION = "v1 node kept for old workflows; use IPAdapter Embeds."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": _v1_required("embeds", noise=False, unfold_batch=_unfold()),
            "optional": inputs.named("attn_mask"),
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply_ipadapter"
    CATEGORY = _CATEGORY

    def apply_ipadapter(self, ipadapter, embeds, model, weight=1.0, weight_type="original", start_at=0.0,
                        end_at=1.0, unfold_batch=False, attn_mask=None):
        runner = _EncodedApplyBatch() if unfold_batch else _EncodedApply()
        scaling = legacy.embeds_scaling_for(weight_type, _EncodedApply.NODE_NAME)
        return runner.apply_ipadapter(model, ipadapter, embeds, weight=weight, weight_type="linear",
                                      start_at=start_at, end_at=end_at, embeds_scaling=scaling,
                                      attn_mask=attn_mask)


class IPAdapterTilesMasked:
    """IPAdapter Masked Tiles (v1): the reference cut into 224 px tiles, ``short_side_tiles`` along its short
    side, each applied through a mask over its own region holding ``tile_weight``; 0 tiles applies the whole
    image."""

    DEPRECATED = True
    DESCRIPTION = "v1 node kept for old workflows; use IPAdapter Tiled."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": _v1_required(
                "clip_vision", "image", weight=inputs.weight(default=0.7),
                short_side_tiles=("INT", {"default": 1, "min": 0, "max": 12, "step": 1}),
                tile_weight=inputs.fraction(0.6, 0.05)),
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply_tiles"
    CATEGORY = _CATEGORY

    def apply_tiles(self, ipadapter, clip_vision, image, model, weight=0.7, noise=0.0, weight_type="original",
                    start_at=0.0, end_at=1.0, short_side_tiles=1, tile_weight=0.6):
        node = "IPAdapterTilesMasked"
        adapter, clip_vision = engine.unpack_pipeline(ipadapter, clip_vision, node=node)
        scaling = legacy.embeds_scaling_for(weight_type, node)
        if int(short_side_tiles) == 0:
            return (engine.apply_ipadapter(
                model, adapter, clip_vision, image, weight=weight, start_at=start_at, end_at=end_at,
                embeds_scaling=scaling, image_negative=legacy.noise_negative(image, noise, node), node=node),)
        tiles, masks = legacy.masked_tiles(image, short_side_tiles, tile_weight, node)
        negatives = legacy.noise_negative(tiles, noise, node)
        for n in range(tiles.shape[0]):
            model = engine.apply_ipadapter(
                model, adapter, clip_vision, tiles[n:n + 1], weight=weight, start_at=start_at, end_at=end_at,
                embeds_scaling=scaling, image_negative=None if negatives is None else negatives[n:n + 1],
                attn_mask=masks[n:n + 1], node=node)
        return (model,)


class IPAdapterBatchEmbeds:
    """IPAdapter Batch Embeds (v1): two EMBEDS joined along the image axis (IPAdapterCombineEmbeds, concat)."""

    DEPRECATED = True
    DESCRIPTION = "v1 node kept for old workflows; use IPAdapter Combine Embeds (concat)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"embed1": ("EMBEDS",), "embed2": ("EMBEDS",)}}

    RETURN_TYPES = ("EMBEDS",)
    FUNCTION = "batch"
    CATEGORY = _CATEGORY

    def batch(self, embed1, embed2):
        return (embeds_core.combine_embeds([embed1, embed2], "concat"),)


class InsightFaceLoader:
    """Load InsightFace (v1): the ``buffalo_l`` pack from models/insightface (IPAdapterInsightFaceLoader)."""

    DEPRECATED = True
    DESCRIPTION = "v1 node kept for old workflows; use IPAdapter InsightFace Loader."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"provider": (["CPU", "CUDA", "ROCM"],)}}

    RETURN_TYPES = ("INSIGHTFACE",)
    FUNCTION = "load_insight_face"
    CATEGORY = _CATEGORY

    def load_insight_face(self, provider="CPU"):
        return (faceid.load_insightface("buffalo_l", provider=provider),)


class PrepImageForInsightFace:
    """Prepare Image For InsightFace (v1): a square 640 px image (580 px plus a white border with
    ``pad_around``) for face detection."""

    DEPRECATED = True
    DESCRIPTION = "v1 node kept for old workflows; today's FaceID nodes detect faces at several sizes themselves."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE",),
            "crop_position": (["center", "top", "bottom", "left", "right"],),
            "sharpening": inputs.fraction(0.0, 0.05),
            "pad_around": ("BOOLEAN", {"default": True}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "prep_image"
    CATEGORY = _CATEGORY

    def prep_image(self, image, crop_position="center", sharpening=0.0, pad_around=True):
        return (legacy.prep_for_insightface(image, crop_position, sharpening, pad_around),)


NODE_CLASS_MAPPINGS = {
    "IPAdapterApply": IPAdapterApply,
    "IPAdapterApplyFaceID": IPAdapterApplyFaceID,
    "IPAdapterApplyEncoded": IPAdapterApplyEncoded,
    "IPAdapterTilesMasked": IPAdapterTilesMasked,
    "IPAdapterBatchEmbeds": IPAdapterBatchEmbeds,
    "InsightFaceLoader": InsightFaceLoader,
    "PrepImageForInsightFace": PrepImageForInsightFace,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "IPAdapterApply": "Apply IPAdapter (legacy)",
    "IPAdapterApplyFaceID": "Apply IPAdapter FaceID (legacy)",
    "IPAdapterApplyEncoded": "Apply IPAdapter from Encoded (legacy)",
    "IPAdapterTilesMasked": "IPAdapter Masked Tiles (legacy)",
    "IPAdapterBatchEmbeds": "IPAdapter Batch Embeds (legacy)",
    "InsightFaceLoader": "Load InsightFace (legacy)",
    "PrepImageForInsightFace": "Prepare Image For InsightFace (legacy)",
}
