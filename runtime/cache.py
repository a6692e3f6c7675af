"""The executor's classic cache key: a node's *input signature*, and what is cached under it.

A node's signature is a digest of its ``class_type``, its constant inputs, the signatures of the nodes its
links come from (with the output slot), the value of its ``IS_CHANGED`` when it has one, and its node id
only for ``NOT_IDEMPOTENT`` / ``UNIQUE_ID`` nodes.  Equal signatures mean equal outputs, so an identical
re-run executes nothing and a changed widget re-runs only that node and what depends on it.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .node_inputs import NodeSpec, hidden_kind, is_linked, unwrap

log = logging.getLogger(__name__)


@dataclass
class CacheEntry:
    """What one executed node left in the cache: its output tuple and its ``ui`` dict (None when none)."""

    outputs: tuple
    ui: dict[str, Any] | None


def input_signatures(
    prompt: Mapping[str, Mapping[str, Any]],
    order: list[str],
    class_of: Callable[[str], type],
    spec_of: Callable[[type], NodeSpec],
) -> dict[str, str]:
    """Node id → signature for every node of ``order``, which must list each node after its sources.

    ``class_of(node_id)`` gives the node's class and ``spec_of(cls)`` its :func:`node_inputs.read_spec`.
    """
    signatures: dict[str, str] = {}
    for node_id in order:
        node = prompt[node_id]
        cls = class_of(node_id)
        spec = spec_of(cls)
        parts: list[Any] = [node["class_type"]]
        constants: dict[str, Any] = {}
        for name, value in sorted((node.get("inputs") or {}).items()):
            if is_linked(spec, name, value):
                parts.append(("link", name, signatures[str(value[0])], value[1]))
            else:
                constants[name] = unwrap(value)
                parts.append(("const", name, _stable_repr(constants[name])))
        hidden_kinds = {hidden_kind(e) for e in spec["hidden"].values()}
        if getattr(cls, "NOT_IDEMPOTENT", False) or "UNIQUE_ID" in hidden_kinds:
            parts.append(("id", node_id))
        if hasattr(cls, "IS_CHANGED"):
            parts.append(("changed", _is_changed(node_id, node, cls, constants)))
        signatures[node_id] = hashlib.sha256(repr(parts).encode("utf-8", "backslashreplace")).hexdigest()
    return signatures


def _is_changed(node_id: str, node: Mapping[str, Any], cls: type, constants: dict[str, Any]) -> str:
    # Like ComfyUI: constant inputs only (linked ones are None); NaN or an exception = always re-run.
    kwargs: dict[str, Any] = {name: None for name in (node.get("inputs") or {})}
    kwargs.update(constants)
    try:
        value = _call_with_accepted(cls.IS_CHANGED, kwargs)
    except Exception as exc:  # noqa: BLE001 - a failing IS_CHANGED must not stop the run
        log.warning("node %s (%s): IS_CHANGED raised %s; the node will re-run", node_id, node["class_type"], exc)
        return f"always:{uuid.uuid4().hex}"
    if isinstance(value, float) and math.isnan(value):
        return f"always:{uuid.uuid4().hex}"
    return _stable_repr(value)


def _call_with_accepted(func: Any, kwargs: dict[str, Any]) -> Any:
    """Call ``func`` with the keyword arguments its signature accepts (all of them with ``**kwargs``)."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return func(**kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return func(**kwargs)
    names = {p.name for p in params}
    return func(**{k: v for k, v in kwargs.items() if k in names})


def _stable_repr(value: Any) -> str:
    # JSON for widget values keeps keys order-free; anything else falls back to repr (which at worst
    # makes a key unique, i.e. re-runs the node: never a wrong cache hit for JSON values).
    return json.dumps(value, sort_keys=True, default=repr)
