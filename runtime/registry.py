"""The node classes a headless run knows: the pack's nodes plus the diffusers-backed standard nodes."""
from __future__ import annotations

from .. import nodes as pack_nodes
from . import standard_nodes


def node_classes() -> dict[str, type]:
    """class_type → node class.  The pack's own nodes win over a standard node of the same name."""
    merged = dict(standard_nodes.NODE_CLASS_MAPPINGS)
    merged.update(pack_nodes.NODE_CLASS_MAPPINGS)
    return merged


def display_names() -> dict[str, str]:
    merged = dict(standard_nodes.NODE_DISPLAY_NAME_MAPPINGS)
    merged.update(pack_nodes.NODE_DISPLAY_NAME_MAPPINGS)
    return merged
