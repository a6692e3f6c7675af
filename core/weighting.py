"""Per-layer weights of an IP-Adapter: weight types, style & composition, Mad-Scientist layer weights.

Weights are given per layer in **our layer index**; the pack's rules name layers by **its block index**
``t``.  Both numberings and their translation are in ``core.block_index``.

Each rule of the pack is applied to the layers of the block it names.  Unlike the pack, whose middle-block
patch never runs (its known regression), the middle block here gets the weight its rule gives it
(e.g. ``weak middle`` really weakens it, ``ease in`` gives it the ramp value of t 6 / t 4).

The tables themselves are data in ``core.weight_tables``; InstantStyle's block-scale dicts are read by
``core.block_scales`` (its public names are re-exported here).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from . import weight_tables as tables
from .adapter import FAMILY_LABELS
from .block_index import AttentionModule, attention_modules, check_family, pack_block_index, pack_block_modules
from .block_scales import BlockScales, block_scales_to_layer_weights, parse_block_scales, valid_block_keys

__all__ = [
    "WEIGHT_TYPES", "INTERNAL_WEIGHT_TYPES", "PRECISE_TYPES", "LayerWeights", "layer_weights",
    "composition_layers", "style_composition_weights", "parse_layer_weights",
    # re-exported from core.block_index and core.block_scales, where they live
    "AttentionModule", "attention_modules", "pack_block_modules", "pack_block_index",
    "BlockScales", "block_scales_to_layer_weights", "parse_block_scales", "valid_block_keys",
]

# The 15 options of the pack's weight_type combo, in its order (the first is the default).
WEIGHT_TYPES: tuple[str, ...] = (
    "linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input", "weak output",
    "weak middle", "strong middle", "style transfer", "composition", "strong style transfer",
    "style and composition", "style transfer precise", "composition precise",
)
# Selected by Style & Composition's expand_style; not offered in the combo.
INTERNAL_WEIGHT_TYPES: tuple[str, ...] = ("strong style and composition",)
PRECISE_TYPES: tuple[str, ...] = tuple(tables.PRECISE_SWAP_AT_COMPOSITION)


@dataclass(frozen=True)
class LayerWeights:
    """The weight of one adapter application at every cross-attention layer (our layer index).

    At layer ``i`` the IP-attention output added to each branch of classifier-free guidance is

    * cond branch: ``cond[i] * attn(q_cond, reference tokens)``;
    * uncond branch: ``cond[i] * attn(q_uncond, negative tokens)``
      ``+ uncond[i] * attn(q_uncond, reference tokens)``, the second term only when ``uncond`` is not None,

    each term computed with its own weight under the chosen ``embeds_scaling`` (a term of weight 0 adds
    nothing).  ``uncond`` models the "precise" types' swap exactly: at a swapped layer the pack replaces the
    uncond tokens by the reference tokens and the cond tokens by zeros (whose keys/values are zero, so the
    cond branch adds nothing), keeping the layer's weight; here that is ``cond[i] = 0`` and
    ``uncond[i] = `` the layer's weight.  ``uncond`` is None when both branches are weighted alike.
    """

    cond: tuple[float, ...]
    uncond: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "cond", tuple(float(w) for w in self.cond))
        if self.uncond is not None:
            object.__setattr__(self, "uncond", tuple(float(w) for w in self.uncond))
            if len(self.uncond) != len(self.cond):
                raise ValueError(f"LayerWeights: uncond has {len(self.uncond)} entries but cond has "
                                 f"{len(self.cond)}; give one weight per cross-attention layer for both")

    @property
    def num_layers(self) -> int:
        """Cross-attention layers covered."""
        return len(self.cond)

    @property
    def swapped_layers(self) -> tuple[int, ...]:
        """Layers where the reference acts on the uncond branch (the precise types' swap)."""
        if self.uncond is None:
            return ()
        return tuple(i for i, w in enumerate(self.uncond) if w != 0.0)


# ----------------------------------------------------------------------------------------------------
# weight types


def _section_of_layers(family: str) -> tuple[str, ...]:
    sections = [module.section for module in pack_block_modules(family)]
    return tuple(sections[t] for t in pack_block_index(family))


def layer_weights(weight_type: str, weight: float, family: str, *, boost: float | None = None,
                  composition_weight: float = 1.0, custom: Mapping[int, float] | None = None) -> LayerWeights:
    """Per-layer weights of ``weight_type`` for node weight ``weight`` on a ``family`` UNet.

    ``boost`` is the precise types' ``style_boost`` / ``composition_boost`` (None: ``weight``, as in the pack;
    given for another type it is an error).  ``composition_weight`` is the weight of the composition blocks
    in the two "style and composition" types.  ``custom`` (Mad Scientist, from ``parse_layer_weights``: our
    layer index -> multiplier) replaces the type's map: layer ``i`` gets ``custom[i] * weight`` and layers it
    does not name get 0; the type then only matters when it is a precise type, whose swap still applies
    (as in the pack, which forces ``linear`` otherwise).  An empty ``custom`` counts as none.
    """
    check_family(family)
    known = WEIGHT_TYPES + INTERNAL_WEIGHT_TYPES
    if weight_type not in known:
        raise ValueError(f"unknown weight_type {weight_type!r}; expected one of: {', '.join(known)}")
    if boost is not None and weight_type not in PRECISE_TYPES:
        raise ValueError(f"a boost (style_boost / composition_boost) only applies to the precise weight types "
                         f"({', '.join(PRECISE_TYPES)}), not to {weight_type!r}")
    blocks = pack_block_index(family)
    count = tables.BLOCK_COUNT[family]
    weight = float(weight)
    if custom:
        cond = _custom_weights(custom, weight, len(blocks), family)
    elif weight_type in tables.RAMPS:
        ramp = tables.RAMPS[weight_type]
        cond = [weight * ramp(t, count) for t in blocks]
    elif weight_type in tables.SECTION_FACTORS:
        factors = tables.SECTION_FACTORS[weight_type]
        cond = [weight * factors.get(section, 1.0) for section in _section_of_layers(family)]
    else:
        block_map = tables.BLOCK_MAPS[weight_type][family]
        values = {"weight": weight, "composition": float(composition_weight),
                  "boost": weight if boost is None else float(boost)}
        cond = [_factor_value(block_map.get(t), values) for t in blocks]
    if weight_type not in PRECISE_TYPES:
        return LayerWeights(tuple(cond))
    return _swap(cond, weight_type, family)


def _factor_value(factor: tables.Factor | None, values: Mapping[str, float]) -> float:
    if factor is None:
        return 0.0
    source, multiplier = factor
    return multiplier * values[source]


def _custom_weights(custom: Mapping[int, float], weight: float, layers: int, family: str) -> list[float]:
    for index in custom:
        if not isinstance(index, int) or not 0 <= index < layers:
            raise ValueError(f"custom layer weights: layer {index!r} does not exist; "
                             f"{FAMILY_LABELS[family]} UNets have layers 0..{layers - 1}")
    return [float(custom[i]) * weight if i in custom else 0.0 for i in range(layers)]


def _swap(cond: list[float], weight_type: str, family: str) -> LayerWeights:
    """Move the weight of the swapped layers from the cond branch to the reference-on-uncond term."""
    at_composition = tables.PRECISE_SWAP_AT_COMPOSITION[weight_type]
    composition = tables.COMPOSITION_BLOCKS[family]
    swapped = [(t in composition) == at_composition for t in pack_block_index(family)]
    uncond = [w if s else 0.0 for w, s in zip(cond, swapped)]
    cond = [0.0 if s else w for w, s in zip(cond, swapped)]
    return LayerWeights(tuple(cond), tuple(uncond))


def composition_layers(family: str) -> tuple[int, ...]:
    """Our layers of the composition (layout) blocks: SDXL 14-23, SD1.5 4-5 (down_blocks.2)."""
    check_family(family)
    composition = tables.COMPOSITION_BLOCKS[family]
    return tuple(i for i, t in enumerate(pack_block_index(family)) if t in composition)


def style_composition_weights(family: str, weight_style: float, weight_composition: float,
                              expand_style: bool = False) -> tuple[LayerWeights, LayerWeights]:
    """(style image weights, composition image weights) of the Style & Composition node.

    The node's weight type is ``style and composition`` (``strong style and composition`` with
    ``expand_style``); the composition image acts only at the layers that type weights with
    ``weight_composition`` and the style image at every other layer the type weights.  So the two
    applications together weigh every layer exactly as ``layer_weights(type, weight_style, family,
    composition_weight=weight_composition)`` does, each image where it belongs.

    SDXL (as the pack): composition image at down_blocks.2.attentions.1 (our layers 14-23, InstantStyle's
    layout block); style image at up_blocks.0.attentions.1 (34-43, InstantStyle's style block), with
    ``expand_style`` at every other layer too.
    SD1.5 (the pack refuses it; its SD1.5 maps are used here): composition image at down_blocks.2 (our
    layers 4 and 5 with 0.25 and 1.0 times ``weight_composition``; 1.0 both with ``expand_style``), the same
    layout block InstantStyle's SD1.5 script uses; style image at down_blocks.0-1 and
    up_blocks.1.attentions.2, up_blocks.2-3 (our layers 0-3 and 8-14), with ``expand_style`` also at
    up_blocks.1.attentions.0-1 and the mid block (6, 7 and 15).  (InstantStyle's experimental SD1.5 style
    block is up_blocks.1 alone; for that, use block scales ``{"up": {"block_1": 1.0}}``.)
    """
    weight_type = "strong style and composition" if expand_style else "style and composition"
    both = layer_weights(weight_type, weight_style, family, composition_weight=weight_composition)
    block_map = tables.BLOCK_MAPS[weight_type][family]
    from_composition = [block_map.get(t, ("", 0.0))[0] == "composition" for t in pack_block_index(family)]
    style = tuple(0.0 if c else w for w, c in zip(both.cond, from_composition))
    composition = tuple(w if c else 0.0 for w, c in zip(both.cond, from_composition))
    return LayerWeights(style), LayerWeights(composition)


# ----------------------------------------------------------------------------------------------------
# Mad Scientist's layer_weights text


def parse_layer_weights(text: str, family: str) -> dict[int, float]:
    """Read IPAdapterMS's ``"idx:value, idx:value"`` text into {our layer index: value}.

    ``idx`` is the pack's block index (SD1.5 0-15, SDXL 0-10; see the module docstring), translated to all
    our layers of that block (one on SD1.5, 2 or 10 on SDXL).  Items are separated by commas or new lines;
    empty items are skipped, so blank text gives {} (= no custom weights).  A repeated index keeps its last
    value, as the pack's dict does.  The values are multipliers of the node weight (see ``layer_weights``).
    """
    check_family(family)
    count = tables.BLOCK_COUNT[family]
    modules = pack_block_modules(family)
    by_block: dict[int, float] = {}
    items = [item.strip() for item in text.replace("\n", ",").split(",")]
    for position, item in enumerate(i for i in items if i):
        parts = item.split(":")
        where = f"layer_weights item {position + 1} {item!r}"
        if len(parts) != 2:
            raise ValueError(f"{where}: expected 'index:value', e.g. '3:1.0, 6:0.5'")
        index = _read_number(int, parts[0], f"{where}: the index", "a whole number")
        if not 0 <= index < count:
            raise ValueError(f"{where}: index {index} is out of range; {FAMILY_LABELS[family]} models have "
                             f"block indices 0..{count - 1} (down blocks, then the middle block, then up blocks)")
        by_block[index] = _read_number(float, parts[1], f"{where}: the value", "a number")
    result = {layer: value for t, value in by_block.items() for layer in modules[t].layers}
    return dict(sorted(result.items()))


def _read_number(kind: type, text: str, what: str, expected: str) -> Any:
    try:
        return kind(text.strip())
    except ValueError:
        raise ValueError(f"{what} {text.strip()!r} is not {expected}") from None
