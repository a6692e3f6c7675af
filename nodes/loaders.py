"""Loader nodes: IPAdapterModelLoader (one file) and IPAdapterUnifiedLoader (a preset → adapter + encoder)."""
from __future__ import annotations

from ..core import apply as engine
from ..core import folders, memo, presets


class IPAdapterUnifiedLoader:
    """Finds and loads the IP-Adapter and CLIP vision files of a preset for the connected model.

    The MODEL passes through unchanged. Loaded files are kept per node instance, and a pipeline arriving
    on the optional ``ipadapter`` input (daisy-chaining) lends its already loaded models.  With
    ``free_clip_vision`` the pipeline carries an on-demand encoder that holds its weights only while an apply
    node encodes (``core.memo.on_demand_clip_vision``).
    """

    def __init__(self) -> None:
        self.clipvision = {"file": None, "model": None}
        self.ipadapter = {"file": None, "model": None}

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "preset": (presets.presets_for("IPAdapterUnifiedLoader"),),
            },
            "optional": {
                "ipadapter": ("IPADAPTER",),
                # appended after the existing pack's inputs, so saved workflows keep their widget order
                "free_clip_vision": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Hold the CLIP vision weights only while encoding; the encoded features are "
                               "memoized, so re-runs that change only weights need no encoder."}),
            },
        }

    RETURN_TYPES = ("MODEL", "IPADAPTER")
    RETURN_NAMES = ("model", "ipadapter")
    FUNCTION = "load_models"
    CATEGORY = "ipadapter"

    def load_models(self, model, preset, ipadapter=None, free_clip_vision=False):
        family = engine.model_family(model)
        clip_path, adapter_path = presets.find_files(preset, family)
        lent = ipadapter if isinstance(ipadapter, dict) else {}
        if memo.is_on_demand(self.clipvision.get("model")) != bool(free_clip_vision):
            self.clipvision = {"file": None, "model": None}  # the option changed: load the other kind
        load_clip_vision = engine.load_clip_vision_on_demand if free_clip_vision else engine.load_clip_vision
        self.clipvision = engine.reuse_or_load(self.clipvision, lent.get("clipvision"), clip_path, load_clip_vision)
        self.ipadapter = engine.reuse_or_load(self.ipadapter, lent.get("ipadapter"), adapter_path,
                                              engine.load_adapter)
        engine.check_family(self.ipadapter["model"], family, node="IPAdapterUnifiedLoader")
        pipeline = dict(lent)
        pipeline.update(clipvision=self.clipvision, ipadapter=self.ipadapter)
        return (model, pipeline)


class IPAdapterModelLoader:
    """Loads one file from the ``ipadapter`` folder; pair it with a CLIPVisionLoader."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ipadapter_file": (folders.get_filename_list("ipadapter"),)}}

    RETURN_TYPES = ("IPADAPTER",)
    FUNCTION = "load_ipadapter_model"
    CATEGORY = "ipadapter/loaders"

    def load_ipadapter_model(self, ipadapter_file):
        path = folders.get_full_path_or_raise("ipadapter", ipadapter_file, node="IPAdapterModelLoader")
        return (engine.load_adapter(path),)


NODE_CLASS_MAPPINGS = {
    "IPAdapterUnifiedLoader": IPAdapterUnifiedLoader,
    "IPAdapterModelLoader": IPAdapterModelLoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "IPAdapterUnifiedLoader": "IPAdapter Unified Loader",
    "IPAdapterModelLoader": "IPAdapter Model Loader",
}
