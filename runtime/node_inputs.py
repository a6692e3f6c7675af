"""A node class's declared inputs as the executor reads them: sections, options, hidden kinds, links.

Shared by the executor (which fills the inputs) and the cache (which keys outputs by them), so both agree
on which inputs are links and which are constants.
"""
from __future__ import annotations

from typing import Any

from .node_specs import is_link

#: ``INPUT_TYPES()`` with every section present: ``{"required": {...}, "optional": {...}, "hidden": {...}}``.
NodeSpec = dict[str, dict[str, Any]]


def read_spec(cls: type) -> NodeSpec:
    """The class's ``INPUT_TYPES()``, with missing sections as empty dicts."""
    spec = cls.INPUT_TYPES()
    return {section: dict(spec.get(section) or {}) for section in ("required", "optional", "hidden")}


def input_options(spec: NodeSpec, name: str) -> dict[str, Any]:
    """The options dict of a required or optional input (``{}`` when it has none or is not declared)."""
    for section in ("required", "optional"):
        entry = spec[section].get(name)
        if entry is not None:
            if isinstance(entry, (tuple, list)) and len(entry) > 1 and isinstance(entry[1], dict):
                return entry[1]
            return {}
    return {}


def is_linked(spec: NodeSpec, name: str, value: Any) -> bool:
    """Whether input ``name`` takes an upstream output: a link, unless the input asks for the raw link."""
    return is_link(value) and not input_options(spec, name).get("rawLink")


def hidden_kind(entry: Any) -> str:
    """``"PROMPT"``, ``"UNIQUE_ID"``, ... of a hidden input's declaration."""
    # Hidden entries are usually the bare string ("PROMPT"), sometimes a 1-tuple.
    if isinstance(entry, (tuple, list)) and entry:
        entry = entry[0]
    return str(entry)


def unwrap(value: Any) -> Any:
    """A constant input's value: list widget values travel as ``{"__value__": [...]}``, not to look like links."""
    if isinstance(value, dict) and set(value) == {"__value__"}:
        return value["__value__"]
    return value
