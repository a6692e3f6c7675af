"""Batch, tiled and enhanced apply nodes: IPAdapterBatch, IPAdapterTiled (+Batch),
IPAdapterClipVisionEnhancer (+Batch).

"Batch" variants set ``unfold_batch``: reference image i drives latent i, and ``weight`` may be a list of
per-frame weights (from IPAdapterWeights).  The tiling math is ``core.tiled``, the enhancer's
``core.enhancer``; everything is applied through ``core.apply.apply_ipadapter``.
"""
from __future__ import annotations

import torch

from ..core import apply as engine
from ..core import embeds as embeds_core
from ..core import enhancer, tiled
from . import inputs
from .apply import apply_pipeline

_ENCODE_BATCH = ("INT", {"default": 0, "min": 0, "max": 4096})


class IPAdapterBatch:
    """Advanced apply with ``unfold_batch``: reference i drives latent i; per-frame weight lists."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **inputs.named("model", "ipadapter", "image"),
                "weight": inputs.weight(5.0),
                **inputs.named("weight_type", "start_at", "end_at", "embeds_scaling"),
                "encode_batch_size": _ENCODE_BATCH,
            },
            "optional": inputs.reference_optional(),
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply_ipadapter"
    CATEGORY = "ipadapter"

    def apply_ipadapter(self, model, ipadapter, image, weight=1.0, weight_type="linear", start_at=0.0, end_at=1.0,
                        embeds_scaling="V only", encode_batch_size=0, image_negative=None, attn_mask=None,
                        clip_vision=None):
        return (apply_pipeline(
            "IPAdapterBatch", model, ipadapter, clip_vision, image, weight=weight, weight_type=weight_type,
            start_at=start_at, end_at=end_at, embeds_scaling=embeds_scaling, image_negative=image_negative,
            attn_mask=attn_mask, unfold_batch=True, encode_batch_size=encode_batch_size),)


class IPAdapterTiled:
    """A non-square reference cut into 256-px tiles, each applied to its own region of the picture."""

    UNFOLD_BATCH = False
    NODE_NAME = "IPAdapterTiled"

    @classmethod
    def INPUT_TYPES(cls):
        required = {
            **inputs.named("model", "ipadapter", "image", "weight", "weight_type", "combine_embeds", "start_at",
                           "end_at"),
            "sharpening": inputs.fraction(0.0, 0.05),
            **inputs.named("embeds_scaling"),
        }
        if cls.UNFOLD_BATCH:
            del required["combine_embeds"]
            required["encode_batch_size"] = _ENCODE_BATCH
        return {"required": required, "optional": inputs.reference_optional()}

    RETURN_TYPES = ("MODEL", "IMAGE", "MASK")
    RETURN_NAMES = ("MODEL", "tiles", "masks")
    FUNCTION = "apply_tiled"
    CATEGORY = "ipadapter/tiled"

    def apply_tiled(self, model, ipadapter, image, weight=1.0, weight_type="linear", start_at=0.0, end_at=1.0,
                    sharpening=0.0, combine_embeds="concat", image_negative=None, attn_mask=None, clip_vision=None,
                    embeds_scaling="V only", encode_batch_size=0):
        node = self.NODE_NAME
        adapter, clip_vision = engine.unpack_pipeline(ipadapter, clip_vision, node=node)
        tiles = tiled.make_tiles(image, attn_mask, sharpening)
        for tile in tiles:
            model = engine.apply_ipadapter(
                model, adapter, clip_vision, tile.image, weight=weight, weight_type=weight_type,
                combine_embeds=combine_embeds, start_at=start_at, end_at=end_at, embeds_scaling=embeds_scaling,
                image_negative=image_negative, attn_mask=tile.mask, node=node, unfold_batch=self.UNFOLD_BATCH,
                encode_batch_size=encode_batch_size)
        return (model, torch.cat([t.image for t in tiles]), torch.cat([t.mask for t in tiles]))


class IPAdapterTiledBatch(IPAdapterTiled):
    """Tiled with ``unfold_batch``."""

    UNFOLD_BATCH = True
    NODE_NAME = "IPAdapterTiledBatch"


class IPAdapterClipVisionEnhancer:
    """Advanced apply whose CLIP features are enriched with those of an n x n grid of tiles."""

    UNFOLD_BATCH = False
    NODE_NAME = "IPAdapterClipVisionEnhancer"

    @classmethod
    def INPUT_TYPES(cls):
        required = {
            **inputs.named("model", "ipadapter", "image"),
            "weight": inputs.weight(5.0),
            **inputs.named("weight_type", "combine_embeds", "start_at", "end_at", "embeds_scaling"),
            "enhance_tiles": ("INT", {"default": 2, "min": 1, "max": 16}),
            "enhance_ratio": inputs.fraction(1.0, 0.05),
        }
        if cls.UNFOLD_BATCH:
            del required["combine_embeds"]
            required["enhance_ratio"] = inputs.fraction(0.5, 0.05)
            required["encode_batch_size"] = _ENCODE_BATCH
        return {"required": required, "optional": inputs.reference_optional()}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply_ipadapter"
    CATEGORY = "ipadapter/dev"

    def apply_ipadapter(self, model, ipadapter, image, weight=1.0, weight_type="linear", combine_embeds="concat",
                        start_at=0.0, end_at=1.0, embeds_scaling="V only", enhance_tiles=2, enhance_ratio=1.0,
                        encode_batch_size=0, image_negative=None, attn_mask=None, clip_vision=None):
        node = self.NODE_NAME
        adapter, clip_vision = engine.unpack_pipeline(ipadapter, clip_vision, node=node)
        base = engine.encode_images(adapter, clip_vision, image, image_negative, combine_embeds="concat",
                                    encode_batch_size=encode_batch_size, node=node)
        embeds = enhancer.enhance_embeds(base, clip_vision, image, enhance_tiles, enhance_ratio, encode_batch_size)
        if not self.UNFOLD_BATCH:
            embeds = embeds_core.combine_embeds(embeds, combine_embeds)
        return (engine.apply_ipadapter(
            model, adapter, clip_vision, None, weight=weight, weight_type=weight_type,
            combine_embeds=combine_embeds, start_at=start_at, end_at=end_at, embeds_scaling=embeds_scaling,
            attn_mask=attn_mask, node=node, embeds=embeds, unfold_batch=self.UNFOLD_BATCH),)


class IPAdapterClipVisionEnhancerBatch(IPAdapterClipVisionEnhancer):
    """ClipVision Enhancer with ``unfold_batch``."""

    UNFOLD_BATCH = True
    NODE_NAME = "IPAdapterClipVisionEnhancerBatch"


NODE_CLASS_MAPPINGS = {
    "IPAdapterBatch": IPAdapterBatch,
    "IPAdapterTiled": IPAdapterTiled,
    "IPAdapterTiledBatch": IPAdapterTiledBatch,
    "IPAdapterClipVisionEnhancer": IPAdapterClipVisionEnhancer,
    "IPAdapterClipVisionEnhancerBatch": IPAdapterClipVisionEnhancerBatch,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "IPAdapterBatch": "IPAdapter Batch (Adv.)",
    "IPAdapterTiled": "IPAdapter Tiled",
    "IPAdapterTiledBatch": "IPAdapter Tiled Batch",
    "IPAdapterClipVisionEnhancer": "IPAdapter ClipVision Enhancer",
    "IPAdapterClipVisionEnhancerBatch": "IPAdapter ClipVision Enhancer Batch",
}
