"""ComfyUI's core nodes, re-implemented on diffusers for headless runs (same names, inputs, widget order)."""
from __future__ import annotations

import importlib

_MODULES: tuple[str, ...] = ("checkpoint", "text", "latent", "image", "clip_vision", "sampler", "masks",
                              "conditioning", "inpaint", "lora", "animatediff", "animated")

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

for _name in _MODULES:
    _module = importlib.import_module(f"{__name__}.{_name}")
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_module, "NODE_DISPLAY_NAME_MAPPINGS", {}))
