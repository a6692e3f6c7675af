"""What reading an embeds file gives (:class:`EmbedsFile`), the error it raises, and the names it knows.

Shared by ``core.embeds_io`` (our format, and the entry points) and ``core.embeds_legacy`` (the pickled
layouts of the existing pack and of diffusers).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .embeds import Embeds

FEATURES = ("image_embeds", "hidden_states", "face")
LAYOUTS = ("auto", "ipadapter_nodes", "diffusers", "ipadapter_plus_v1", "ipadapter_plus")
FACE_WIDTH = 512  # insightface embeddings; no CLIP encoder an IP-Adapter uses is 512 wide


class EmbedsFileError(ValueError):
    """An embeds file is missing, unreadable, corrupt, unsafe or not embeds; the message names the file."""


@dataclass(frozen=True)
class EmbedsFile:
    """What :func:`core.embeds_io.read_embeds_file` found: the Embeds, the layout it was read as, whether
    the file held an uncond side (False for the pack's single-side files; ``embeds.uncond`` is then zeros)
    and the string metadata (ours only)."""

    embeds: Embeds
    layout: str
    uncond_known: bool = True
    metadata: dict[str, str] = field(default_factory=dict)
