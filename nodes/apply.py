"""Apply nodes: IPAdapter (simple) and IPAdapterAdvanced.  Each returns a new MODEL; the input is untouched."""
from __future__ import annotations

from ..core import apply as engine

_START = ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001})
_END = ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001})


class IPAdapterSimple:
    """Minimal apply node; needs the pipeline from an IPAdapterUnifiedLoader."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "ipadapter": ("IPADAPTER",),
                "image": ("IMAGE",),
                "weight": ("FLOAT", {"default": 1.0, "min": -1.0, "max": 3.0, "step": 0.05}),
                "start_at": _START,
                "end_at": _END,
                "weight_type": (list(engine.SIMPLE_WEIGHT_TYPES),),
            },
            "optional": {
                "attn_mask": ("MASK",),
            },
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply_ipadapter"
    CATEGORY = "ipadapter"

    def apply_ipadapter(self, model, ipadapter, image, weight, start_at, end_at, weight_type, attn_mask=None):
        adapter, clip_vision = engine.unpack_pipeline(ipadapter, None, node="IPAdapter", require_pipeline=True)
        return (engine.apply_ipadapter(
            model, adapter, clip_vision, image, weight=weight,
            weight_type=engine.SIMPLE_WEIGHT_TYPES[weight_type], start_at=start_at, end_at=end_at,
            attn_mask=attn_mask, node="IPAdapter"),)


class IPAdapterAdvanced:
    """The full apply node: weight types, multi-image combining, step range, K/V scaling, negative image."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "ipadapter": ("IPADAPTER",),
                "image": ("IMAGE",),
                "weight": ("FLOAT", {"default": 1.0, "min": -1.0, "max": 5.0, "step": 0.05}),
                "weight_type": (list(engine.WEIGHT_TYPES),),
                "combine_embeds": (list(engine.COMBINE_EMBEDS),),
                "start_at": _START,
                "end_at": _END,
                "embeds_scaling": (list(engine.EMBEDS_SCALING),),
            },
            "optional": {
                "image_negative": ("IMAGE",),
                "attn_mask": ("MASK",),
                "clip_vision": ("CLIP_VISION",),
            },
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply_ipadapter"
    CATEGORY = "ipadapter"

    def apply_ipadapter(self, model, ipadapter, image, weight=1.0, weight_type="linear", combine_embeds="concat",
                        start_at=0.0, end_at=1.0, embeds_scaling="V only", image_negative=None, attn_mask=None,
                        clip_vision=None):
        adapter, clip_vision = engine.unpack_pipeline(ipadapter, clip_vision, node="IPAdapterAdvanced")
        return (engine.apply_ipadapter(
            model, adapter, clip_vision, image, weight=weight, weight_type=weight_type,
            combine_embeds=combine_embeds, start_at=start_at, end_at=end_at, embeds_scaling=embeds_scaling,
            image_negative=image_negative, attn_mask=attn_mask, node="IPAdapterAdvanced"),)


NODE_CLASS_MAPPINGS = {
    "IPAdapter": IPAdapterSimple,
    "IPAdapterAdvanced": IPAdapterAdvanced,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "IPAdapter": "IPAdapter",
    "IPAdapterAdvanced": "IPAdapter Advanced",
}
