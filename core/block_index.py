"""The UNet's cross-attention modules, and the two ways layers are numbered: ours and the pack's block index.

**Our layer index** (shared with the engine): layer ``i`` is the i-th cross-attention (attn2) layer of the
UNet in diffusers' ``attn_processors`` order, down blocks, then up blocks, then the mid block last; it is the
checkpoint's ``ip_adapter.{2i+1}`` and ``core.adapter.attn2_layer_names(family)[i]``.  SD1.5 has 16 layers,
SDXL 70.

**The pack's block index** ``t`` (ComfyUI_IPAdapter_plus's ``transformer_index``, which its weight types and
its ``layer_weights`` text use) counts attention *modules* (``attentions.K``) in the order down, mid, up:

* SD1.5 (one transformer layer per module): t 0-5 = our layers 0-5 (down_blocks.0-2), t 6 = our layer 15
  (mid_block), t 7-15 = our layers 6-14 (up_blocks.1-3).
* SDXL: t 0 = layers 0-1 (down_blocks.1.attentions.0), t 1 = 2-3, t 2 = 4-13 (down_blocks.2.attentions.0),
  t 3 = 14-23 (down_blocks.2.attentions.1), t 4 = 60-69 (mid_block), t 5 = 24-33 (up_blocks.0.attentions.0),
  t 6 = 34-43 (up_blocks.0.attentions.1), t 7 = 44-53, t 8 = 54-55, t 9 = 56-57, t 10 = 58-59
  (up_blocks.1.attentions.0-2).  All transformer layers of a module share its weight, as in the pack.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from .adapter import attn2_layer_names
from .weight_tables import BLOCK_COUNT


@dataclass(frozen=True)
class AttentionModule:
    """One ``attentions.K`` module: section ("down", "mid", "up"), block number, K, and our layers in it."""

    section: str
    block: int
    index: int
    layers: tuple[int, ...]


_LAYER_NAME = re.compile(r"^(?:(down|up)_blocks\.(\d+)|(mid)_block)\.attentions\.(\d+)\.")


def check_family(family: str) -> None:
    """Raise ValueError naming the known families unless ``family`` is one."""
    if family not in BLOCK_COUNT:
        raise ValueError(f"per-layer weights: unknown model family {family!r}; "
                         f"expected one of {', '.join(repr(f) for f in BLOCK_COUNT)}")


@functools.lru_cache(maxsize=None)
def attention_modules(family: str) -> tuple[AttentionModule, ...]:
    """The attention modules of a ``family`` UNet in our order (down, up, mid), read off the layer names."""
    check_family(family)
    layers: dict[tuple[str, int, int], list[int]] = {}
    for i, name in enumerate(attn2_layer_names(family)):
        match = _LAYER_NAME.match(name)
        section = match.group(1) or match.group(3)
        block = int(match.group(2) or 0)
        layers.setdefault((section, block, int(match.group(4))), []).append(i)
    return tuple(AttentionModule(s, b, k, tuple(v)) for (s, b, k), v in layers.items())


@functools.lru_cache(maxsize=None)
def pack_block_modules(family: str) -> tuple[AttentionModule, ...]:
    """The attention modules in the pack's order (down, mid, up); position = the pack's block index t."""
    modules = attention_modules(family)
    rank = {"down": 0, "mid": 1, "up": 2}
    return tuple(sorted(modules, key=lambda m: (rank[m.section], modules.index(m))))


@functools.lru_cache(maxsize=None)
def pack_block_index(family: str) -> tuple[int, ...]:
    """For every layer in our order, the pack's block index t (see the module docstring)."""
    index = [0] * len(attn2_layer_names(family))
    for t, module in enumerate(pack_block_modules(family)):
        for layer in module.layers:
            index[layer] = t
    return tuple(index)
