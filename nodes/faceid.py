"""FaceID nodes: InsightFace loader, the FaceID unified loader, FaceID apply (and Batch), FaceID encoder.

Names, inputs, widget order and outputs follow the existing pack (``IPAAdapterFaceIDBatch`` keeps its
spelling); the face options (``face_index``, ``on_no_face``) are optional widgets after the existing ones, so
workflow files with the old, shorter ``widgets_values`` still load with the old behaviour.
"""
from __future__ import annotations

import logging

from ..core import apply as engine
from ..core import faceid, faceid_apply, faceid_lora, presets
from . import inputs

logger = logging.getLogger(__name__)


def _face_options() -> dict:
    """The optional face widgets, after the existing pack's inputs (old widgets_values still load)."""
    return {
        "face_index": ("INT", {"default": -1, "min": -1, "max": 99, "step": 1,
                               "tooltip": "-1: the largest face; 0, 1, ...: that face counted left to right"}),
        "on_no_face": inputs.choice(faceid_apply.NO_FACE_ACTIONS, tooltip=(
            "error: stop and name the image; skip: leave that image out (no face at all: model unchanged)")),
    }


class IPAdapterInsightFaceLoader:
    """Loads an InsightFace model pack from models/insightface/models/<model_name> (never downloads)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "provider": (list(faceid.PROVIDERS),),
            "model_name": (list(faceid.MODEL_NAMES),),
        }}

    RETURN_TYPES = ("INSIGHTFACE",)
    FUNCTION = "load_insightface"
    CATEGORY = "ipadapter/loaders"

    def load_insightface(self, provider="CPU", model_name="buffalo_l"):
        return (faceid.load_insightface(model_name, provider=provider),)


class IPAdapterUnifiedLoaderFaceID:
    """Finds and loads a FaceID preset's adapter, CLIP vision and InsightFace, and patches the model with the
    preset's FaceID LoRA at ``lora_strength`` (the file from ``loras/``, else the one inside the adapter)."""

    def __init__(self) -> None:
        self.clipvision = {"file": None, "model": None}
        self.ipadapter = {"file": None, "model": None}
        self.insightface = {"provider": None, "model": None}

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "preset": (presets.presets_for("IPAdapterUnifiedLoaderFaceID"),),
                "lora_strength": ("FLOAT", {"default": 0.6, "min": 0.0, "max": 1.0, "step": 0.01}),
                "provider": (list(faceid.PROVIDERS),),
            },
            "optional": {
                "ipadapter": ("IPADAPTER",),
            },
        }

    RETURN_TYPES = ("MODEL", "IPADAPTER")
    RETURN_NAMES = ("MODEL", "ipadapter")
    FUNCTION = "load_models"
    CATEGORY = "ipadapter/faceid"

    def load_models(self, model, preset, lora_strength=0.6, provider="CPU", ipadapter=None):
        node = "IPAdapterUnifiedLoaderFaceID"
        family = engine.model_family(model)
        lent = ipadapter if isinstance(ipadapter, dict) else {}
        _, adapter_path = presets.find_files(preset, family, need_clip_vision=False)
        self.ipadapter = engine.reuse_or_load(self.ipadapter, lent.get("ipadapter"), adapter_path,
                                              engine.load_adapter)
        adapter = self.ipadapter["model"]
        engine.check_family(adapter, family, node=node)
        faceid_apply.check_faceid(adapter, node)
        pipeline = dict(lent)
        if faceid_apply.needs_clip_vision(adapter):
            clip_path, _ = presets.find_files(preset, family)
            self.clipvision = engine.reuse_or_load(self.clipvision, lent.get("clipvision"), clip_path,
                                                   engine.load_clip_vision)
            pipeline["clipvision"] = self.clipvision
        if self.insightface["provider"] != provider or self.insightface["model"] is None:
            borrowed = lent.get("insightface") or {}
            if borrowed.get("provider") == provider and borrowed.get("model") is not None:
                self.insightface = borrowed
            else:
                loaded = faceid.load_insightface("buffalo_l", provider=provider)
                self.insightface = {"provider": provider, "model": loaded}
        model, lora = faceid_lora.apply_preset_lora(model, preset, adapter, lora_strength)
        logger.info("%s: preset '%s' -> %s, LoRA: %s", node, preset, adapter_path, lora)
        pipeline.update(ipadapter=self.ipadapter, insightface=self.insightface,
                        faceid_plus_v2=faceid_apply.is_plus_v2(adapter, preset == "FACEID PLUS V2"))
        return (model, pipeline)


class IPAdapterFaceID:
    """Applies a FaceID / FaceID Plus / Plus V2 / Portrait adapter with the faces found in ``image``."""

    UNFOLD_BATCH = False
    NODE_NAME = "IPAdapterFaceID"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **inputs.named("model", "ipadapter", "image", "weight"),
                "weight_faceidv2": inputs.weight(5.0),
                **inputs.named("weight_type", "combine_embeds", "start_at", "end_at", "embeds_scaling"),
            },
            "optional": {**inputs.reference_optional("insightface"), **_face_options()},
        }

    RETURN_TYPES = ("MODEL", "IMAGE")
    RETURN_NAMES = ("MODEL", "face_image")
    FUNCTION = "apply_ipadapter"
    CATEGORY = "ipadapter/faceid"

    def apply_ipadapter(self, model, ipadapter, image, weight=1.0, weight_faceidv2=1.0, weight_type="linear",
                        combine_embeds="concat", start_at=0.0, end_at=1.0, embeds_scaling="V only",
                        image_negative=None, attn_mask=None, clip_vision=None, insightface=None, face_index=-1,
                        on_no_face="error"):
        node = type(self).NODE_NAME
        adapter, clip_vision, insightface, plus_v2 = faceid_apply.unpack_pipeline(ipadapter, clip_vision,
                                                                                  insightface, node)
        return faceid_apply.apply_faceid(
            model, adapter, insightface, image, clip_vision=clip_vision, weight=weight,
            weight_faceidv2=weight_faceidv2, plus_v2=plus_v2, weight_type=weight_type,
            combine_embeds=combine_embeds, start_at=start_at, end_at=end_at, embeds_scaling=embeds_scaling,
            image_negative=image_negative, attn_mask=attn_mask, unfold_batch=self.UNFOLD_BATCH,
            face_index=face_index, on_no_face=on_no_face, node=node)


class IPAAdapterFaceIDBatch(IPAdapterFaceID):
    """FaceID with ``unfold_batch``: reference image i drives latent i (the spelling is the existing pack's)."""

    UNFOLD_BATCH = True
    NODE_NAME = "IPAAdapterFaceIDBatch"


class IPAdapterFaceIDEncoder:
    """Encodes the faces of ``image`` into EMBEDS for IPAdapterEmbeds or IPAdapter Save Embeds."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **inputs.named("ipadapter", "image"),
                "weight": inputs.weight(step=0.01),
            },
            "optional": {**inputs.named("image_negative", "clip_vision", "insightface"), **_face_options()},
        }

    RETURN_TYPES = ("EMBEDS", "EMBEDS", "IMAGE")
    RETURN_NAMES = ("pos_embed", "neg_embed", "face_image")
    FUNCTION = "encode"
    CATEGORY = "ipadapter/faceid"

    def encode(self, ipadapter, image, weight=1.0, image_negative=None, clip_vision=None, insightface=None,
               face_index=-1, on_no_face="error"):
        node = "IPAdapterFaceIDEncoder"
        adapter, clip_vision, insightface, _ = faceid_apply.unpack_pipeline(ipadapter, clip_vision, insightface, node)
        return faceid_apply.encode_face_embeds(adapter, insightface, image, clip_vision=clip_vision,
                                               image_negative=image_negative, weight=weight,
                                               face_index=face_index, on_no_face=on_no_face, node=node)


NODE_CLASS_MAPPINGS = {
    "IPAdapterInsightFaceLoader": IPAdapterInsightFaceLoader,
    "IPAdapterUnifiedLoaderFaceID": IPAdapterUnifiedLoaderFaceID,
    "IPAdapterFaceID": IPAdapterFaceID,
    "IPAAdapterFaceIDBatch": IPAAdapterFaceIDBatch,
    "IPAdapterFaceIDEncoder": IPAdapterFaceIDEncoder,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "IPAdapterInsightFaceLoader": "IPAdapter InsightFace Loader",
    "IPAdapterUnifiedLoaderFaceID": "IPAdapter Unified Loader FaceID",
    "IPAdapterFaceID": "IPAdapter FaceID",
    "IPAAdapterFaceIDBatch": "IPAdapter FaceID Batch",
    "IPAdapterFaceIDEncoder": "IPAdapter FaceID Encoder",
}
