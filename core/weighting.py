"""Per-layer weights of an IP-Adapter: weight types, style & composition, Mad-Scientist layer weights.

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

Each rule of the pack is applied to the layers of the block it names.  Unlike the pack, whose middle-block
patch never runs (its known regression), the middle block here gets the weight its rule gives it
(e.g. ``weak middle`` really weakens it, ``ease in`` gives it the ramp value of t 6 / t 4).

The tables themselves are data in ``core.weight_tables``.
"""
from __future__ import annotations

import ast
import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

from . import weight_tables as tables
from .adapter import FAMILY_LABELS, attn2_layer_names

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
# the UNet's attention modules; our layers <-> the pack's block index


@dataclass(frozen=True)
class AttentionModule:
    """One ``attentions.K`` module: section ("down", "mid", "up"), block number, K, and our layers in it."""

    section: str
    block: int
    index: int
    layers: tuple[int, ...]


_LAYER_NAME = re.compile(r"^(?:(down|up)_blocks\.(\d+)|(mid)_block)\.attentions\.(\d+)\.")


@functools.lru_cache(maxsize=None)
def attention_modules(family: str) -> tuple[AttentionModule, ...]:
    """The attention modules of a ``family`` UNet in our order (down, up, mid), read off the layer names."""
    _check_family(family)
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


def _check_family(family: str) -> None:
    if family not in tables.BLOCK_COUNT:
        raise ValueError(f"per-layer weights: unknown model family {family!r}; "
                         f"expected one of {', '.join(repr(f) for f in tables.BLOCK_COUNT)}")


def _section_of_layers(family: str) -> tuple[str, ...]:
    sections = [module.section for module in pack_block_modules(family)]
    return tuple(sections[t] for t in pack_block_index(family))


# ----------------------------------------------------------------------------------------------------
# weight types


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
    _check_family(family)
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
    _check_family(family)
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
    _check_family(family)
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


# ----------------------------------------------------------------------------------------------------
# InstantStyle block scales: diffusers' set_ip_adapter_scale dict form

_SECTIONS = ("down", "mid", "up")
BlockScales = float | Mapping[str, Any]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def valid_block_keys(family: str) -> str:
    """The keys a block-scales dict may use on ``family``, for error messages and node tooltips."""
    parts = []
    for section in _SECTIONS:
        modules = [m for m in attention_modules(family) if m.section == section]
        if section == "mid":
            parts.append("'mid' (a number or a 1-item list)")
            continue
        blocks = sorted({m.block for m in modules})
        per_block = len(modules) // len(blocks)
        names = ", ".join(f"'block_{b}'" for b in blocks)
        parts.append(f"'{section}' -> {names} (a number or a list of {per_block}, one per attention module)")
    return f"{FAMILY_LABELS[family]}: " + "; ".join(parts)


def block_scales_to_layer_weights(scales: BlockScales, family: str) -> tuple[float, ...]:
    """Per-layer weights (our order) of an InstantStyle / diffusers ``set_ip_adapter_scale`` config.

    ``scales`` is a number (every layer) or a dict with the keys ``"down"``, ``"mid"``, ``"up"``, expanded
    as diffusers does: a section may be a number (all its attention modules), a list (one value per
    attention module, for every block of the section) or a dict of ``"block_N"`` entries, each a number or a
    list with one value per attention module of that block (a 1-item list is broadcast); ``"mid"`` is a
    number or a 1-item list; whatever the dict does not name gets 0.  All transformer layers of a module
    share its value (diffusers has no per-transformer-layer form).  Unlike diffusers, which silently
    zeroes a block it does not know (``{"up": {"block_0": ...}}`` on SD1.5), a key that names no block with
    attention is an error listing the valid keys.  Per-image nested lists (diffusers' masked multi-image
    form) are refused: one application has one weight per layer.
    """
    _check_family(family)
    if _is_number(scales):
        return (float(scales),) * len(attn2_layer_names(family))
    if not isinstance(scales, Mapping):
        raise ValueError(f"block scales: expected a number or a dict like "
                         f"{{\"up\": {{\"block_0\": [0.0, 1.0, 0.0]}}}}, got {type(scales).__name__} {scales!r}")
    per_module = {module: 0.0 for module in attention_modules(family)}  # unnamed blocks: 0, as diffusers
    for section, value in scales.items():
        if section not in _SECTIONS:
            raise _unknown_key(repr(section), family)
        modules = [m for m in per_module if m.section == section]
        if section == "mid":
            per_module.update(zip(modules, _module_values(value, 1, "'mid'", broadcast_to=len(modules))))
            continue
        blocks: dict[int, list[AttentionModule]] = {}
        for module in modules:
            blocks.setdefault(module.block, []).append(module)
        if not isinstance(value, Mapping):
            value = {f"block_{b}": value for b in blocks}  # a number or list for the whole section
        for key, block_value in value.items():
            match = re.fullmatch(r"block_(\d+)", key) if isinstance(key, str) else None
            if match is None or int(match.group(1)) not in blocks:
                raise _unknown_key(f"'{section}' -> {key!r}", family)
            group = blocks[int(match.group(1))]
            per_module.update(zip(group, _module_values(block_value, len(group), f"'{section}' -> {key!r}")))
    weights = [0.0] * len(attn2_layer_names(family))
    for module, scale in per_module.items():
        for layer in module.layers:
            weights[layer] = scale
    return tuple(weights)


def _module_values(value: Any, count: int, where: str, broadcast_to: int | None = None) -> list[float]:
    """One value per attention module from a number, a 1-item list or a ``count``-item list."""
    values = value if isinstance(value, (list, tuple)) else [value]
    for item in values:
        if not _is_number(item):
            raise ValueError(f"block scales {where}: expected numbers, found {item!r}"
                             + (" (per-image nested lists are not supported)" if isinstance(item, list) else ""))
    if len(values) == 1:
        return [float(values[0])] * (broadcast_to or count)
    if len(values) != count:
        raise ValueError(f"block scales {where}: expected a number or a list of {count} value(s) (one per "
                         f"attention module), found {len(values)}: {value!r}")
    return [float(v) for v in values]


def _unknown_key(key: str, family: str) -> ValueError:
    return ValueError(f"block scales: {key} names no block with attention on this model; valid keys are "
                      f"{valid_block_keys(family)}")


def parse_block_scales(text: str) -> BlockScales:
    """Read a block-scales config from node text: JSON or a Python-style dict (single quotes allowed).

    Returns a number or a dict for ``block_scales_to_layer_weights``.  Nothing is executed: the text is
    parsed as literals only.  Bad text is an error naming the line and column.
    """
    stripped = text.strip()
    if not stripped:
        raise ValueError('block scales text is empty; expected e.g. {"up": {"block_0": [0.0, 1.0, 0.0]}} or 1.0')
    try:
        value = json.loads(stripped)
    except (json.JSONDecodeError, RecursionError):
        try:  # Python-style literals; only parsed here, never evaluated
            tree = ast.parse(stripped, mode="eval")
        except (SyntaxError, RecursionError, MemoryError) as error:
            where = f"line {error.lineno}, column {error.offset}: {error.msg}" \
                if isinstance(error, SyntaxError) else "nested too deeply"
            raise ValueError(f"block scales text: bad syntax at {where}") from None
        value = _literal(tree.body, stripped)
    if not (_is_number(value) or isinstance(value, dict)):
        raise ValueError(f"block scales text: expected a dict or a number, found {type(value).__name__}")
    return value


def _literal(node: ast.AST, text: str) -> Any:
    if isinstance(node, ast.Dict) and all(isinstance(k, ast.Constant) and isinstance(k.value, str)
                                          for k in node.keys):
        return {k.value: _literal(v, text) for k, v in zip(node.keys, node.values)}
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(item, text) for item in node.elts]
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)) \
            and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _literal(node.operand, text)
        if _is_number(operand):
            return -operand if isinstance(node.op, ast.USub) else operand
    found = ast.get_source_segment(text, node) or type(node).__name__
    raise ValueError(f"block scales text: unexpected {found!r} at line {node.lineno}, column "
                     f"{node.col_offset + 1}; expected a number, a list, a quoted key or a dict")
