"""InstantStyle block scales: diffusers' ``set_ip_adapter_scale`` dict form, read from a dict or node text.

``{"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}`` names attention modules by
section and block as diffusers does; :func:`block_scales_to_layer_weights` turns it into one weight per
cross-attention layer in our order (see ``core.block_index``).
"""
from __future__ import annotations

import ast
import json
import re
from typing import Any, Mapping

from .adapter import FAMILY_LABELS, attn2_layer_names
from .block_index import AttentionModule, attention_modules, check_family

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
    check_family(family)
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
