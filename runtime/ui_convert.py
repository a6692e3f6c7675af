"""ComfyUI frontend (UI format, version 0.4) workflow → API prompt, as the frontend's ``graphToPrompt`` does.

Widget values are matched to input names by position.  The widget order is derived from each class's
``INPUT_TYPES``: required then optional inputs of a widget type (INT, FLOAT, STRING, BOOLEAN, COMBO),
``forceInput`` inputs excluded.  Some widgets add values that are never sent to the server: the
``control_after_generate`` value after an INT seed (two values after a COMBO with that option) and the
upload button's value after the last required widget of a node with an ``image_upload`` input.  Virtual
nodes resolve themselves: a PrimitiveNode's value is written into every widget it feeds, Reroutes are
followed, Notes vanish.  Muted nodes (mode 2) are dropped
with their links; bypassed nodes (mode 4) hand each consumer the first of their own inputs of the matching
type.  See ``shared/reference/comfyui-interfaces.md`` §4.2–4.3.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .node_specs import InputSpec, input_specs, types_match

MODE_MUTED = 2
MODE_BYPASS = 4
#: Frontend-only nodes: they never reach the server.
VIRTUAL_NODES = frozenset({"PrimitiveNode", "Reroute", "Note", "MarkdownNote"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
#: INT inputs with these names get a control_after_generate widget even without the option.
_SEED_NAMES = frozenset({"seed", "noise_seed"})
_EMPTY_VALUES = {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}


class WorkflowFormatError(ValueError):
    """A workflow file or dict that cannot be read as a ComfyUI workflow (says what was expected/found)."""


# --------------------------------------------------------------------------------------------- widget layout
@dataclass(frozen=True)
class WidgetSlot:
    """One widget of a node as the frontend lays it out in ``widgets_values``."""

    spec: InputSpec
    extra_values: int      # frontend-only values stored right after this one
    force_input: bool      # only in layouts of old saves, which kept a slot for forceInput inputs


def widget_layout(node_class: type, legacy: bool = False) -> list[WidgetSlot]:
    """The widgets of a node class in ``widgets_values`` order.

    ``legacy=True`` gives the layout of old saves that also reserved a slot for each ``forceInput`` input.
    """
    layout = []
    uploads = 0
    for spec in input_specs(node_class):
        uploads += bool(spec.options.get("image_upload"))
        if spec.type not in WIDGET_TYPES:
            continue
        force = bool(spec.options.get("forceInput"))
        if force and not legacy:
            continue
        layout.append(WidgetSlot(spec, _extra_values(spec), force))
    if uploads:
        # The frontend adds the upload button as one more *required* input, after the declared ones, so its
        # value follows the last required widget (LoadImageMask saves ["mask.png", "alpha", "image"]).
        last = max((i for i, slot in enumerate(layout) if slot.spec.section == "required"), default=None)
        if last is not None:
            slot = layout[last]
            layout[last] = WidgetSlot(slot.spec, slot.extra_values + uploads, slot.force_input)
    return layout


def _extra_values(spec: InputSpec) -> int:
    extra = 0
    if spec.type == "INT" and (spec.options.get("control_after_generate") or spec.name in _SEED_NAMES):
        extra += 1                 # "fixed" / "increment" / "decrement" / "randomize"
    elif spec.type == "COMBO" and spec.options.get("control_after_generate"):
        extra += 2                 # the control value and its filter
    return extra


def default_value(spec: InputSpec) -> Any:
    """What the frontend puts in a widget that an older save did not store."""
    if "default" in spec.options:
        return spec.options["default"]
    if spec.choices:
        return spec.choices[0]
    return _EMPTY_VALUES.get(spec.type)


def widget_inputs(node_class: type, widgets_values: Any) -> dict[str, Any]:
    """Input name → value for the widgets of one UI node (lists wrapped as ``{"__value__": [...]}``)."""
    layout = widget_layout(node_class)
    if isinstance(widgets_values, Mapping):        # some packs save widgets by name
        return {slot.spec.name: _wrap(widgets_values.get(slot.spec.name, default_value(slot.spec)))
                for slot in layout}
    values = list(widgets_values or [])
    if len(values) != _length(layout):
        legacy = widget_layout(node_class, legacy=True)
        if len(legacy) != len(layout) and len(values) == _length(legacy):
            layout = legacy
    inputs: dict[str, Any] = {}
    position = 0
    for slot in layout:
        if not slot.force_input:
            value = values[position] if position < len(values) else default_value(slot.spec)
            inputs[slot.spec.name] = _wrap(value)
        position += 1 + slot.extra_values
    return inputs


def _length(layout: list[WidgetSlot]) -> int:
    return sum(1 + slot.extra_values for slot in layout)


def _wrap(value: Any) -> Any:
    # In the API format a bare list is a link; list-valued widgets travel wrapped.
    return {"__value__": value} if isinstance(value, list) else value


# --------------------------------------------------------------------------------------------- graph
@dataclass(frozen=True)
class _Link:
    from_node: str
    from_slot: int
    to_node: str
    to_slot: int
    type: Any


@dataclass(frozen=True)
class _Constant:
    value: Any


def _parse_links(raw_links: Any) -> dict[Any, _Link]:
    links: dict[Any, _Link] = {}
    for entry in raw_links or []:
        if entry is None:                       # old saves keep holes where links were deleted
            continue
        if isinstance(entry, Mapping):          # the object form (version-1 schema, subgraph links)
            entry = [entry.get("id"), entry.get("origin_id"), entry.get("origin_slot"),
                     entry.get("target_id"), entry.get("target_slot"), entry.get("type")]
        try:
            link_id, from_node, from_slot, to_node, to_slot = entry[:5]
            links[link_id] = _Link(str(from_node), int(from_slot), str(to_node), int(to_slot),
                                   entry[5] if len(entry) > 5 else None)
        except (TypeError, ValueError):
            raise WorkflowFormatError("UI workflow: a link must be [link_id, from_node, from_slot, to_node, "
                                      f"to_slot, type]; found {entry!r:.200}") from None
    return links


#: Optional fields of a UI node and the JSON types they must have when present (None is always allowed).
_NODE_FIELDS: dict[str, tuple[type, ...]] = {"inputs": (list,), "outputs": (list,), "widgets_values": (list, dict),
                                             "mode": (int,), "title": (str,)}


def _check_node_shape(node: Any) -> None:
    """Refuse a UI node whose fields have the wrong JSON types, naming the node and the field."""
    if not isinstance(node, Mapping) or "id" not in node or "type" not in node:
        raise WorkflowFormatError(f"UI workflow: every node needs an 'id' and a 'type'; found {node!r:.200}")
    node_id, kind = node["id"], node["type"]
    if isinstance(node_id, bool) or not isinstance(node_id, (int, str)) or not isinstance(kind, str):
        raise WorkflowFormatError(
            f"UI workflow: a node's 'id' must be a number or a string and its 'type' a string; found id "
            f"{node_id!r:.60} and type {kind!r:.60}")
    where = f"UI workflow: node #{node_id} ('{kind}')"
    for name, types in _NODE_FIELDS.items():
        value = node.get(name)
        if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
            expected = " or ".join("a list" if t is list else f"a {_json_name(t)}" for t in types)
            raise WorkflowFormatError(f"{where}: '{name}' must be {expected}; found {_json_name(type(value))} "
                                      f"{value!r:.80}. Re-save the workflow from ComfyUI.")
    for entry in node.get("inputs") or []:
        link = entry.get("link") if isinstance(entry, Mapping) else None
        if not isinstance(entry, Mapping) or (link is not None and not _is_id(link)) \
                or not isinstance(entry.get("widget") or {}, Mapping):
            raise WorkflowFormatError(
                f"{where}: every entry of 'inputs' must be an object {{name, type, link}} with a link id or "
                f"null; found {entry!r:.120}. Re-save the workflow from ComfyUI.")
    for entry in node.get("outputs") or []:
        if not isinstance(entry, Mapping):
            raise WorkflowFormatError(f"{where}: every entry of 'outputs' must be an object {{name, type, links}}; "
                                      f"found {entry!r:.120}")


def _is_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _json_name(kind: type) -> str:
    return {list: "list", dict: "object", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(kind, kind.__name__)


class _Graph:
    """The UI nodes and links, with link resolution through virtual, muted and bypassed nodes."""

    def __init__(self, ui: Mapping[str, Any]):
        self.nodes: dict[str, dict] = {}
        for node in ui.get("nodes") or []:
            _check_node_shape(node)
            node_id = str(node["id"])
            if node_id in self.nodes:
                raise WorkflowFormatError(
                    f"UI workflow: two nodes have the id {node_id} ('{self.nodes[node_id]['type']}' and "
                    f"'{node['type']}'); node ids must be unique. Re-save the workflow from ComfyUI.")
            self.nodes[node_id] = dict(node)
        self.links = _parse_links(ui.get("links"))

    def resolve(self, link_id: Any, seen: frozenset = frozenset()) -> _Link | _Constant | None:
        """Where a link really comes from: a real node's output, a primitive's value, or nothing (dropped)."""
        link = self.links.get(link_id)
        if link is None or link_id in seen:
            return None
        seen = seen | {link_id}
        source = self.nodes.get(link.from_node)
        if source is None:
            return None
        kind = source["type"]
        if kind == "PrimitiveNode":
            values = source.get("widgets_values") or []
            return _Constant(_wrap(values[0])) if values else None
        if kind == "Reroute":
            return self._follow(source, 0, seen)
        if kind in VIRTUAL_NODES or source.get("mode") == MODE_MUTED:
            return None
        if source.get("mode") == MODE_BYPASS:
            outputs = source.get("outputs") or []
            declared = outputs[link.from_slot].get("type") if link.from_slot < len(outputs) else None
            wanted = declared or link.type or "*"
            for index, entry in enumerate(source.get("inputs") or []):
                if entry.get("link") is not None and types_match(entry.get("type", "*"), wanted):
                    return self._follow(source, index, seen)
            return None
        return link

    def _follow(self, node: Mapping[str, Any], input_index: int, seen: frozenset) -> _Link | _Constant | None:
        inputs = node.get("inputs") or []
        if input_index >= len(inputs) or inputs[input_index].get("link") is None:
            return None
        return self.resolve(inputs[input_index]["link"], seen)


def _node_order(node_id: str) -> tuple:
    return (0, int(node_id), "") if node_id.lstrip("-").isdigit() else (1, 0, node_id)


def _check_supported(ui: Mapping[str, Any]) -> None:
    definitions = ui.get("definitions") or {}
    subgraphs = definitions.get("subgraphs") if isinstance(definitions, Mapping) else None
    if not isinstance(subgraphs, (list, type(None))) or not isinstance(definitions, Mapping):
        raise WorkflowFormatError("UI workflow: 'definitions' must be an object whose 'subgraphs' is a list; "
                                  f"found {definitions!r:.120}")
    subgraphs = subgraphs or []
    subgraph_ids = {str(sg.get("id")) for sg in subgraphs if isinstance(sg, Mapping)}
    for node in ui.get("nodes") or []:
        kind = str(node.get("type", "")) if isinstance(node, Mapping) else ""
        if kind in subgraph_ids:
            raise WorkflowFormatError(
                f"UI workflow: node #{node.get('id')} is a subgraph ({kind}); subgraphs are not supported yet. "
                "Unpack the subgraph in ComfyUI (right click → Unpack Subgraph) or export the API format.")
        if kind.startswith("workflow>") or kind.startswith("workflow/"):
            raise WorkflowFormatError(
                f"UI workflow: node #{node.get('id')} is a group node ('{kind}'); group nodes are not supported. "
                "Convert it back to nodes in ComfyUI or export the API format.")


# --------------------------------------------------------------------------------------------- conversion
def ui_to_api(ui: Mapping[str, Any], node_classes: Mapping[str, type],
              display_names: Mapping[str, str] | None = None) -> tuple[dict, dict]:
    """Convert a UI-format workflow into ``(api_prompt, ui_titles)``.

    ``api_prompt`` maps node id (string) → ``{"class_type", "inputs", "_meta": {"title"}}``;
    ``ui_titles`` maps API node id → ``(ui node id, title)``.  Nodes of unknown classes are still emitted
    (with their links only) so that validation can name them.
    """
    if not isinstance(ui.get("nodes"), list) or not isinstance(ui.get("links", []), list):
        raise WorkflowFormatError("UI workflow: expected 'nodes' and 'links' lists")
    _check_supported(ui)
    graph = _Graph(ui)
    names = display_names or {}
    prompt: dict[str, dict] = {}
    titles: dict[str, tuple] = {}
    for node_id in sorted(graph.nodes, key=_node_order):
        node = graph.nodes[node_id]
        class_type = node["type"]
        if class_type in VIRTUAL_NODES or node.get("mode") in (MODE_MUTED, MODE_BYPASS):
            continue
        inputs = _widget_inputs_or_none(node_classes.get(class_type), node.get("widgets_values"))
        for entry in node.get("inputs") or []:
            if entry.get("link") is None:
                continue
            name = (entry.get("widget") or {}).get("name") or entry.get("name")
            source = graph.resolve(entry["link"])
            if isinstance(source, _Constant):
                inputs[name] = source.value
            elif isinstance(source, _Link):
                inputs[name] = [source.from_node, source.from_slot]
            # unresolved (muted or missing source): a converted widget keeps its own value
        title = node.get("title") or names.get(class_type) or class_type
        prompt[node_id] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}
        titles[node_id] = (node["id"], title)
    return prompt, titles


def _widget_inputs_or_none(node_class: type | None, widgets_values: Any) -> dict[str, Any]:
    if node_class is None:
        return {}
    try:
        return widget_inputs(node_class, widgets_values)
    except Exception:  # a broken INPUT_TYPES is reported by validation, with the node named
        return {}
