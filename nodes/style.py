"""Style and layout nodes: Style & Composition (+Batch), Precise Style Transfer / Composition (+Batch),
IPAdapterMS (Mad Scientist: per-block weights as text) and IPAdapterInstantStyle (diffusers' block scales).

Each picks per-layer weights from ``core.weighting`` and calls ``core.apply.apply_ipadapter``.  Style &
Composition is two applications on the returned MODEL: the style image at the style layers and the
composition image at the composition layers, each with zero weight elsewhere.  Unlike the existing pack it
also runs on SD1.5 (with the pack's own SD1.5 maps).
"""
from __future__ import annotations

from ..core import apply as engine
from ..core import weighting
from . import inputs
from .apply import apply_pipeline

INSTANT_STYLE_DEFAULT = '{"up": {"block_0": [0.0, 1.0, 0.0]}}'  # InstantStyle's SDXL style-only setting


class IPAdapterStyleComposition:
    """Two references: the style image at the style layers, the composition image at the layout layers."""

    UNFOLD_BATCH = False
    NODE_NAME = "IPAdapterStyleComposition"

    @classmethod
    def INPUT_TYPES(cls):
        required = {
            **inputs.named("model", "ipadapter"),
            "image_style": ("IMAGE",),
            "image_composition": ("IMAGE",),
            "weight_style": inputs.weight(5.0),
            "weight_composition": inputs.weight(5.0),
            "expand_style": ("BOOLEAN", {"default": False}),
            "combine_embeds": inputs.choice(engine.COMBINE_EMBEDS, default="average"),
            **inputs.named("start_at", "end_at", "embeds_scaling"),
        }
        if cls.UNFOLD_BATCH:
            del required["combine_embeds"]
        return {"required": required, "optional": inputs.reference_optional()}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply_ipadapter"
    CATEGORY = "ipadapter/style_composition"

    def apply_ipadapter(self, model, ipadapter, image_style, image_composition, weight_style=1.0,
                        weight_composition=1.0, expand_style=False, combine_embeds="average", start_at=0.0,
                        end_at=1.0, embeds_scaling="V only", image_negative=None, attn_mask=None, clip_vision=None):
        node = self.NODE_NAME
        adapter, clip_vision = engine.unpack_pipeline(ipadapter, clip_vision, node=node)
        style, composition = weighting.style_composition_weights(
            engine.model_family(model), weight_style, weight_composition, expand_style)
        for image, weights in ((image_style, style), (image_composition, composition)):
            model = engine.apply_ipadapter(
                model, adapter, clip_vision, image, combine_embeds=combine_embeds, start_at=start_at,
                end_at=end_at, embeds_scaling=embeds_scaling, image_negative=image_negative, attn_mask=attn_mask,
                node=node, layer_weights=weights, unfold_batch=self.UNFOLD_BATCH)
        return (model,)


class IPAdapterStyleCompositionBatch(IPAdapterStyleComposition):
    """Style & Composition with ``unfold_batch``: reference i drives latent i."""

    UNFOLD_BATCH = True
    NODE_NAME = "IPAdapterStyleCompositionBatch"


class IPAdapterPreciseStyleTransfer:
    """Style transfer with the reference's layout pushed away at the composition layers."""

    UNFOLD_BATCH = False
    NODE_NAME = "IPAdapterPreciseStyleTransfer"
    WEIGHT_TYPE = "style transfer precise"
    BOOST = ("style_boost", 1.0)

    @classmethod
    def INPUT_TYPES(cls):
        name, default = cls.BOOST
        return {
            "required": {
                **inputs.named("model", "ipadapter", "image"),
                "weight": inputs.weight(5.0),
                name: inputs.weight(5.0, default=default, minimum=-5.0),
                **inputs.named("combine_embeds", "start_at", "end_at", "embeds_scaling"),
            },
            "optional": inputs.reference_optional(),
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply_ipadapter"
    CATEGORY = "ipadapter"

    def apply_ipadapter(self, model, ipadapter, image, weight=1.0, style_boost=None, composition_boost=None,
                        combine_embeds="concat", start_at=0.0, end_at=1.0, embeds_scaling="V only",
                        image_negative=None, attn_mask=None, clip_vision=None):
        node = self.NODE_NAME
        boost = style_boost if self.BOOST[0] == "style_boost" else composition_boost
        return (apply_pipeline(
            node, model, ipadapter, clip_vision, image, weight=weight, weight_type=self.WEIGHT_TYPE,
            combine_embeds=combine_embeds, start_at=start_at, end_at=end_at, embeds_scaling=embeds_scaling,
            image_negative=image_negative, attn_mask=attn_mask, boost=self.BOOST[1] if boost is None else boost,
            unfold_batch=self.UNFOLD_BATCH),)


class IPAdapterPreciseStyleTransferBatch(IPAdapterPreciseStyleTransfer):
    """Precise Style Transfer with ``unfold_batch``."""

    UNFOLD_BATCH = True
    NODE_NAME = "IPAdapterPreciseStyleTransferBatch"


class IPAdapterPreciseComposition(IPAdapterPreciseStyleTransfer):
    """The reference's layout at the composition layers; its style only as much as ``composition_boost``."""

    NODE_NAME = "IPAdapterPreciseComposition"
    WEIGHT_TYPE = "composition precise"
    BOOST = ("composition_boost", 0.0)


class IPAdapterPreciseCompositionBatch(IPAdapterPreciseComposition):
    """Precise Composition with ``unfold_batch``."""

    UNFOLD_BATCH = True
    NODE_NAME = "IPAdapterPreciseCompositionBatch"


class IPAdapterMS:
    """Mad Scientist: per-block weights as ``"index:value"`` text (the pack's block indices)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **inputs.named("model", "ipadapter", "image"),
                "weight": inputs.weight(5.0),
                "weight_faceidv2": inputs.weight(5.0),
                **inputs.named("weight_type", "combine_embeds", "start_at", "end_at", "embeds_scaling"),
                "layer_weights": ("STRING", {"default": "", "multiline": True}),
            },
            "optional": inputs.reference_optional("insightface"),
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply_ipadapter"
    CATEGORY = "ipadapter/dev"

    def apply_ipadapter(self, model, ipadapter, image, weight=1.0, weight_faceidv2=1.0, weight_type="linear",
                        combine_embeds="concat", start_at=0.0, end_at=1.0, embeds_scaling="V only",
                        layer_weights="", image_negative=None, attn_mask=None, clip_vision=None, insightface=None):
        node = "IPAdapterMS"
        family = engine.model_family(model)
        custom = weighting.parse_layer_weights(layer_weights or "", family)
        per_layer = None
        if custom:
            # as in the pack: the text replaces the type's map; only a precise type's swap still applies
            kind = weight_type if weight_type in weighting.PRECISE_TYPES else "linear"
            per_layer = weighting.layer_weights(kind, weight, family, custom=custom)
        if _is_faceid(ipadapter):
            from ..core import faceid_apply

            adapter, clip_vision, insightface, plus_v2 = faceid_apply.unpack_pipeline(
                ipadapter, clip_vision, insightface, node)
            if per_layer is not None:
                # needs a layer_weights argument in core.faceid_apply.apply_faceid (not there yet)
                raise NotImplementedError(
                    f"{node}: per-layer 'layer_weights' with a FaceID adapter is not supported yet; clear the "
                    f"layer_weights text (the weight_type still applies) or use a non-FaceID adapter")
            patched, _ = faceid_apply.apply_faceid(
                model, adapter, insightface, image, clip_vision=clip_vision, weight=weight,
                weight_faceidv2=weight_faceidv2, plus_v2=plus_v2, weight_type=weight_type,
                combine_embeds=combine_embeds, start_at=start_at, end_at=end_at, embeds_scaling=embeds_scaling,
                image_negative=image_negative, attn_mask=attn_mask, node=node)
            return (patched,)
        return (apply_pipeline(
            node, model, ipadapter, clip_vision, image, weight=weight, weight_type=weight_type,
            combine_embeds=combine_embeds, start_at=start_at, end_at=end_at, embeds_scaling=embeds_scaling,
            image_negative=image_negative, attn_mask=attn_mask, layer_weights=per_layer),)


def _is_faceid(ipadapter) -> bool:
    from ..core import faceid_apply

    adapter = ipadapter["ipadapter"].get("model") if isinstance(ipadapter, dict) and "ipadapter" in ipadapter \
        else ipadapter
    return faceid_apply.is_faceid(adapter)


class IPAdapterInstantStyle:
    """InstantStyle: per-block scales in diffusers' ``set_ip_adapter_scale`` dict form, given as text."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **inputs.named("model", "ipadapter", "image"),
                "block_scales": ("STRING", {
                    "default": INSTANT_STYLE_DEFAULT, "multiline": True,
                    "tooltip": "diffusers' set_ip_adapter_scale dict (JSON or Python literal) or one number; "
                               "blocks not named get 0. SDXL style only: "
                               '{"up": {"block_0": [0.0, 1.0, 0.0]}}; SDXL style + layout: '
                               '{"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}; '
                               'SD1.5 style: {"up": {"block_1": 1.0}}'}),
                **inputs.named("start_at", "end_at", "embeds_scaling"),
            },
            "optional": inputs.reference_optional(),
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply_ipadapter"
    CATEGORY = "ipadapter/style_composition"

    @classmethod
    def VALIDATE_INPUTS(cls, block_scales):
        # Syntax only: which blocks exist depends on the model, known when the node runs.
        try:
            weighting.parse_block_scales(block_scales)
        except ValueError as error:
            return str(error)
        return True

    def apply_ipadapter(self, model, ipadapter, image, block_scales=INSTANT_STYLE_DEFAULT, start_at=0.0,
                        end_at=1.0, embeds_scaling="V only", image_negative=None, attn_mask=None, clip_vision=None):
        node = "IPAdapterInstantStyle"
        try:
            scales = weighting.block_scales_to_layer_weights(weighting.parse_block_scales(block_scales),
                                                             engine.model_family(model))
        except ValueError as error:
            raise ValueError(f"{node}: block_scales: {error}") from None
        return (apply_pipeline(
            node, model, ipadapter, clip_vision, image, start_at=start_at, end_at=end_at,
            embeds_scaling=embeds_scaling, image_negative=image_negative, attn_mask=attn_mask,
            layer_weights=weighting.LayerWeights(scales)),)


NODE_CLASS_MAPPINGS = {
    "IPAdapterStyleComposition": IPAdapterStyleComposition,
    "IPAdapterStyleCompositionBatch": IPAdapterStyleCompositionBatch,
    "IPAdapterPreciseStyleTransfer": IPAdapterPreciseStyleTransfer,
    "IPAdapterPreciseStyleTransferBatch": IPAdapterPreciseStyleTransferBatch,
    "IPAdapterPreciseComposition": IPAdapterPreciseComposition,
    "IPAdapterPreciseCompositionBatch": IPAdapterPreciseCompositionBatch,
    "IPAdapterMS": IPAdapterMS,
    "IPAdapterInstantStyle": IPAdapterInstantStyle,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "IPAdapterStyleComposition": "IPAdapter Style & Composition SDXL",
    "IPAdapterStyleCompositionBatch": "IPAdapter Style & Composition Batch SDXL",
    "IPAdapterPreciseStyleTransfer": "IPAdapter Precise Style Transfer",
    "IPAdapterPreciseStyleTransferBatch": "IPAdapter Precise Style Transfer Batch",
    "IPAdapterPreciseComposition": "IPAdapter Precise Composition",
    "IPAdapterPreciseCompositionBatch": "IPAdapter Precise Composition Batch",
    "IPAdapterMS": "IPAdapter Mad Scientist",
    "IPAdapterInstantStyle": "IPAdapter InstantStyle",
}
