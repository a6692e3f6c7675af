"""ComfyUI node classes of the pack.  Thin declarations that call ``core``.

Each module in this package defines ``NODE_CLASS_MAPPINGS`` and ``NODE_DISPLAY_NAME_MAPPINGS``;
they are merged here in a fixed order.
"""
from __future__ import annotations

import importlib

# Modules are added as the nodes arrive; a missing module is a packaging bug, so no try/except.
_MODULES: tuple[str, ...] = ("loaders", "apply", "images", "masks", "faceid", "style", "embeds", "weights", "batch", "regional", "legacy")

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

for _name in _MODULES:
    _module = importlib.import_module(f"{__name__}.{_name}")
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_module, "NODE_DISPLAY_NAME_MAPPINGS", {}))
