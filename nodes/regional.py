"""Regional nodes: IPAdapterRegionalConditioning, IPAdapterCombineParams, IPAdapterFromParams.

A region is a reference image confined to a mask (plus, optionally, the prompts confined to the same mask);
the regions are collected on an IPADAPTER_PARAMS socket and applied by IPAdapterFromParams, one masked
application of one adapter per region.  The work is in ``core.regional``.
"""
from __future__ import annotations

from ..core import apply as engine
from ..core import regional
from . import inputs


class IPAdapterRegionalConditioning:
    """One region: a reference image for the masked area, and the prompts confined to the same mask."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE",),
                "image_weight": inputs.weight(),
                "prompt_weight": inputs.weight(10.0, minimum=0.0),
                **inputs.named("weight_type", "start_at", "end_at"),
            },
            "optional": {
                "mask": ("MASK",),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
            },
        }

    RETURN_TYPES = ("IPADAPTER_PARAMS", "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("IPADAPTER_PARAMS", "POSITIVE", "NEGATIVE")
    FUNCTION = "conditioning"
    CATEGORY = "ipadapter/params"

    def conditioning(self, image, image_weight, prompt_weight, weight_type, start_at, end_at, mask=None,
                     positive=None, negative=None):
        params = regional.region(image, mask, image_weight, weight_type, start_at, end_at,
                                 node="IPAdapterRegionalConditioning")
        # The prompts keep acting everywhere when no mask is given (the existing pack's behaviour).
        return (params, regional.mask_conditioning(positive, mask, prompt_weight),
                regional.mask_conditioning(negative, mask, prompt_weight))


class IPAdapterCombineParams:
    """Concatenate two to five IPADAPTER_PARAMS lists."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "params_1": ("IPADAPTER_PARAMS",),
                "params_2": ("IPADAPTER_PARAMS",),
            },
            "optional": {
                "params_3": ("IPADAPTER_PARAMS",),
                "params_4": ("IPADAPTER_PARAMS",),
                "params_5": ("IPADAPTER_PARAMS",),
            },
        }

    RETURN_TYPES = ("IPADAPTER_PARAMS",)
    FUNCTION = "combine"
    CATEGORY = "ipadapter/params"

    def combine(self, params_1, params_2, params_3=None, params_4=None, params_5=None):
        return (regional.combine_params(params_1, params_2, params_3, params_4, params_5),)


class IPAdapterFromParams:
    """Apply one adapter once per region of an IPADAPTER_PARAMS list (each with its own image and mask)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **inputs.named("model", "ipadapter"),
                "ipadapter_params": ("IPADAPTER_PARAMS",),
                **inputs.named("combine_embeds", "embeds_scaling"),
            },
            "optional": inputs.named("image_negative", "clip_vision"),
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply_ipadapter"
    CATEGORY = "ipadapter/params"

    def apply_ipadapter(self, model, ipadapter, ipadapter_params, combine_embeds="concat", embeds_scaling="V only",
                        image_negative=None, clip_vision=None):
        adapter, clip_vision = engine.unpack_pipeline(ipadapter, clip_vision, node="IPAdapterFromParams")
        return (regional.apply_params(model, adapter, clip_vision, ipadapter_params, combine_embeds=combine_embeds,
                                      embeds_scaling=embeds_scaling, image_negative=image_negative,
                                      node="IPAdapterFromParams"),)


NODE_CLASS_MAPPINGS = {
    "IPAdapterRegionalConditioning": IPAdapterRegionalConditioning,
    "IPAdapterCombineParams": IPAdapterCombineParams,
    "IPAdapterFromParams": IPAdapterFromParams,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "IPAdapterRegionalConditioning": "IPAdapter Regional Conditioning",
    "IPAdapterCombineParams": "IPAdapter Combine Params",
    "IPAdapterFromParams": "IPAdapter from Params",
}
