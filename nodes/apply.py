"""Apply nodes: IPAdapter (simple) and IPAdapterAdvanced.  Each returns a new MODEL; the input is untouched.

``apply_pipeline`` is the body every plain apply node shares (here, in the batch, style and legacy nodes).
"""
from __future__ import annotations

from typing import Any

from ..core import apply as engine
from . import inputs


def apply_pipeline(node: str, model: Any, ipadapter: Any, clip_vision: Any, image: Any, *,
                   require_pipeline: bool = False, **options: Any) -> Any:
    """The new MODEL: the adapter of the node's IPADAPTER input (its CLIP vision unless ``clip_vision`` is
    connected) applied to ``model`` with ``options``, the keyword arguments of ``core.apply.apply_ipadapter``.
    """
    adapter, clip_vision = engine.unpack_pipeline(ipadapter, clip_vision, node=node,
                                                  require_pipeline=require_pipeline)
    return engine.apply_ipadapter(model, adapter, clip_vision, image, node=node, **options)


class IPAdapterSimple:
    """Minimal apply node; needs the pipeline from an IPAdapterUnifiedLoader."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **inputs.named("model", "ipadapter", "image", "weight", "start_at", "end_at"),
                "weight_type": inputs.choice(engine.SIMPLE_WEIGHT_TYPES),
            },
            "optional": inputs.named("attn_mask"),
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply_ipadapter"
    CATEGORY = "ipadapter"

    def apply_ipadapter(self, model, ipadapter, image, weight, start_at, end_at, weight_type, attn_mask=None):
        return (apply_pipeline(
            "IPAdapter", model, ipadapter, None, image, require_pipeline=True, weight=weight,
            weight_type=engine.SIMPLE_WEIGHT_TYPES[weight_type], start_at=start_at, end_at=end_at,
            attn_mask=attn_mask),)


class IPAdapterAdvanced:
    """The full apply node: weight types, multi-image combining, step range, K/V scaling, negative image."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **inputs.named("model", "ipadapter", "image"),
                "weight": inputs.weight(5.0),
                **inputs.named("weight_type", "combine_embeds", "start_at", "end_at", "embeds_scaling"),
            },
            "optional": inputs.reference_optional(),
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply_ipadapter"
    CATEGORY = "ipadapter"

    def apply_ipadapter(self, model, ipadapter, image, weight=1.0, weight_type="linear", combine_embeds="concat",
                        start_at=0.0, end_at=1.0, embeds_scaling="V only", image_negative=None, attn_mask=None,
                        clip_vision=None):
        return (apply_pipeline(
            "IPAdapterAdvanced", model, ipadapter, clip_vision, image, weight=weight, weight_type=weight_type,
            combine_embeds=combine_embeds, start_at=start_at, end_at=end_at, embeds_scaling=embeds_scaling,
            image_negative=image_negative, attn_mask=attn_mask),)


NODE_CLASS_MAPPINGS = {
    "IPAdapter": IPAdapterSimple,
    "IPAdapterAdvanced": IPAdapterAdvanced,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "IPAdapter": "IPAdapter",
    "IPAdapterAdvanced": "IPAdapter Advanced",
}
