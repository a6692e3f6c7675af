"""ipadapter_nodes: an IP-Adapter node pack for ComfyUI, a headless workflow runner, and a diffusers API.

Inside ComfyUI this file is the custom-node entry point (``NODE_CLASS_MAPPINGS`` /
``NODE_DISPLAY_NAME_MAPPINGS``).  Importing it where ComfyUI is absent works too.
"""
from .core.attach import attach
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__version__ = "0.1.0"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "__version__", "attach"]
