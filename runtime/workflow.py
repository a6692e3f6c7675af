"""Reading workflows: API-format JSON, UI-format JSON, ``POST /prompt`` bodies and PNGs saved by SaveImage.

Everything ends as a :class:`LoadedWorkflow` whose ``prompt`` is in API format (what the validator and
executor take); a UI workflow is converted by :mod:`.ui_convert` and also kept (``ui``) so that saved images
carry it as metadata, like ComfyUI's.  Anything unreadable raises :class:`WorkflowFormatError` naming the
file, what was expected and what was found.
"""
from __future__ import annotations

import copy
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from .ui_convert import WorkflowFormatError, ui_to_api

__all__ = ["LoadedWorkflow", "WorkflowFormatError", "apply_overrides", "load_workflow"]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_EXPECTED = ("a ComfyUI workflow: API format {node_id: {class_type, inputs}}, UI format {nodes, links, ...} "
             "or a /prompt body {prompt: {...}}")


@dataclass
class LoadedWorkflow:
    """A workflow ready to validate and run.

    ``prompt``: API format ``{node_id: {"class_type", "inputs", "_meta"?}}``; ``ui``: the UI-format workflow
    when one was given (or stored in the PNG), else None; ``origin``: the path or ``"<dict>"``;
    ``ui_titles``: API node id → (UI node id, title), for error messages.
    """

    prompt: dict
    ui: dict | None
    origin: str
    ui_titles: dict = field(default_factory=dict)

    @property
    def extra_pnginfo(self) -> dict:
        """What ComfyUI passes to hidden ``EXTRA_PNGINFO`` inputs: the UI workflow, when known."""
        return {"workflow": self.ui} if self.ui is not None else {}


def load_workflow(source: str | os.PathLike | Mapping[str, Any],
                  node_classes: Mapping[str, type] | None = None,
                  display_names: Mapping[str, str] | None = None) -> LoadedWorkflow:
    """Load a workflow from a path (``.json`` or a ``.png`` with ComfyUI metadata) or a dict.

    ``node_classes``/``display_names`` are only needed to convert a UI-format workflow (widget order comes
    from each class's ``INPUT_TYPES``); they default to the headless registry.
    """
    if isinstance(source, Mapping):
        check_depth(source, "<dict>")
        return _from_object(copy.deepcopy(dict(source)), "<dict>", node_classes, display_names)
    path = Path(source)
    origin = str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise WorkflowFormatError(f"{origin}: no such file; expected {_EXPECTED}") from None
    except OSError as exc:
        raise WorkflowFormatError(f"{origin}: cannot read the file ({exc.strerror or exc})") from None
    if not data.strip():
        raise WorkflowFormatError(f"{origin}: the file is empty; expected {_EXPECTED}")
    if data.startswith(_PNG_MAGIC):
        return _from_png(data, origin, node_classes, display_names)
    return _from_object(_parse_json(data, origin), origin, node_classes, display_names)


def _parse_json(data: bytes | str, origin: str) -> Any:
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise WorkflowFormatError(
                f"{origin}: not UTF-8 text (byte {exc.start}); expected JSON or a PNG saved by ComfyUI") from None
    try:
        parsed = json.loads(data)
    except json.JSONDecodeError as exc:
        raise WorkflowFormatError(
            f"{origin}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
            f"{' (the file looks truncated)' if exc.pos >= len(data.rstrip()) else ''}; expected {_EXPECTED}"
        ) from None
    except RecursionError:
        raise WorkflowFormatError(_too_deep(origin)) from None
    check_depth(parsed, origin)
    return parsed


#: Deeper than any real workflow (a UI workflow with subgraphs is about 10 levels); past it, copying and
#: validating would hit Python's recursion limit.
MAX_DEPTH = 100


def _too_deep(origin: str, where: str = "") -> str:
    return (f"{origin}: the JSON is nested more than {MAX_DEPTH} levels deep{where}; no ComfyUI workflow is. "
            "The file is damaged or not a workflow.")


def check_depth(data: Any, origin: str) -> None:
    """Refuse JSON nested deeper than :data:`MAX_DEPTH` (walked without recursion), naming where."""
    stack: list[tuple[Any, int, str]] = [(data, 0, "")]
    while stack:
        value, depth, path = stack.pop()
        if depth > MAX_DEPTH:
            raise WorkflowFormatError(_too_deep(origin, f" (at {path[:120]}...)"))
        if isinstance(value, Mapping):
            stack.extend((v, depth + 1, f"{path}/{k}") for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((v, depth + 1, f"{path}/{i}") for i, v in enumerate(value))


def _png_text(data: bytes, origin: str) -> dict[str, str]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            try:
                text = dict(getattr(image, "text", {}) or {})
            except (OSError, SyntaxError, ValueError):
                text = {}                          # damaged image data: the chunks read before it still count
            for key, value in image.info.items():
                if isinstance(value, str):
                    text.setdefault(key, value)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise WorkflowFormatError(f"{origin}: a damaged PNG file ({exc})") from None
    return text


def _from_png(data: bytes, origin: str, node_classes, display_names) -> LoadedWorkflow:
    text = _png_text(data, origin)
    if "prompt" not in text and "workflow" not in text:
        found = ", ".join(sorted(text)) or "none"
        raise WorkflowFormatError(
            f"{origin}: this PNG carries no workflow: expected a 'prompt' or 'workflow' text chunk, as "
            f"ComfyUI's SaveImage writes them; found text chunks: {found}. It was probably saved with "
            "--disable-metadata or re-encoded by another program.")
    ui = None
    if "workflow" in text:
        ui = _parse_json(text["workflow"], f"{origin} ('workflow' chunk)")
        if not (isinstance(ui, dict) and "nodes" in ui):
            raise WorkflowFormatError(f"{origin}: the 'workflow' chunk is not a UI-format workflow "
                                      f"(found {_describe(ui)})")
    if "prompt" in text:
        prompt = _parse_json(text["prompt"], f"{origin} ('prompt' chunk)")
        if not _looks_like_api(prompt):
            raise WorkflowFormatError(f"{origin}: the 'prompt' chunk is not an API-format prompt "
                                      f"(found {_describe(prompt)})")
        return LoadedWorkflow(prompt, ui, origin, _api_titles(prompt, ui))
    return _from_object(ui, origin, node_classes, display_names)


def _from_object(data: Any, origin: str, node_classes, display_names) -> LoadedWorkflow:
    if not isinstance(data, dict):
        raise WorkflowFormatError(f"{origin}: found {_describe(data)}; expected {_EXPECTED}")
    if isinstance(data.get("prompt"), dict) and "nodes" not in data:
        # The body of POST /prompt; its extra_data may carry the UI workflow.
        extra = data.get("extra_data") or {}
        ui = (extra.get("extra_pnginfo") or {}).get("workflow") if isinstance(extra, dict) else None
        prompt = data["prompt"]
        if not _looks_like_api(prompt):
            raise WorkflowFormatError(f"{origin}: 'prompt' is not an API-format prompt (found {_describe(prompt)})")
        ui = ui if isinstance(ui, dict) else None
        return LoadedWorkflow(prompt, ui, origin, _api_titles(prompt, ui))
    if "nodes" in data and "links" in data:
        if node_classes is None:
            from . import registry          # lazy: the registry imports every node module
            node_classes = registry.node_classes()
            display_names = display_names if display_names is not None else registry.display_names()
        try:
            prompt, titles = ui_to_api(data, node_classes, display_names)
        except WorkflowFormatError as exc:
            raise WorkflowFormatError(f"{origin}: {exc}") from None
        return LoadedWorkflow(prompt, data, origin, titles)
    if _looks_like_api(data):
        return LoadedWorkflow(data, None, origin, _api_titles(data, None))
    raise WorkflowFormatError(f"{origin}: found {_describe(data)}; expected {_EXPECTED}")


def _looks_like_api(data: Any) -> bool:
    # A node without class_type is still API format: validation names that node.
    return (isinstance(data, dict) and bool(data) and all(isinstance(v, dict) for v in data.values())
            and any("class_type" in v for v in data.values()))


def _describe(data: Any) -> str:
    if isinstance(data, dict):
        keys = list(data)
        shown = ", ".join(repr(k) for k in keys[:8]) + (", ..." if len(keys) > 8 else "")
        return f"a JSON object with keys [{shown}]" if keys else "an empty JSON object"
    if isinstance(data, list):
        return f"a JSON list of {len(data)} item(s)"
    return f"a JSON {type(data).__name__} ({data!r:.40})"


def _api_titles(prompt: dict, ui: dict | None) -> dict[str, tuple]:
    """API node id → (UI node id, title).  The frontend keeps UI ids as API ids, so they line up."""
    ui_nodes = {str(n.get("id")): n for n in (ui or {}).get("nodes", []) if isinstance(n, dict)}
    titles: dict[str, tuple] = {}
    for node_id, node in prompt.items():
        meta = node.get("_meta") if isinstance(node, dict) else None
        title = meta.get("title") if isinstance(meta, dict) else None
        ui_node = ui_nodes.get(str(node_id))
        if ui_node is not None:
            titles[str(node_id)] = (ui_node["id"], ui_node.get("title") or title)
        elif title:
            titles[str(node_id)] = (node_id, title)
    return titles


def apply_overrides(prompt: Mapping[str, Any], overrides: Iterable[str]) -> dict:
    """A copy of ``prompt`` with ``"NODE_ID.INPUT=VALUE"`` items applied (the CLI's ``--set``).

    VALUE is parsed as JSON when it parses (``20``, ``7.5``, ``true``, ``["4", 0]``), else taken as a string.
    """
    result = copy.deepcopy(dict(prompt))
    for item in overrides:
        target, sep, raw = item.partition("=")
        node_id, dot, input_name = target.strip().partition(".")
        if not sep or not dot or not node_id or not input_name:
            raise WorkflowFormatError(
                f"--set {item!r}: expected NODE_ID.INPUT=VALUE, e.g. 3.seed=42 or 6.text=\"a cat\"")
        node = result.get(node_id)
        if not isinstance(node, dict):
            known = ", ".join(sorted(map(str, result), key=lambda k: (len(k), k)))
            raise WorkflowFormatError(f"--set {item!r}: the workflow has no node '{node_id}' (nodes: {known})")
        try:
            value = json.loads(raw)
            check_depth(value, f"--set {item!r}")
        except (json.JSONDecodeError, RecursionError):
            value = raw
        node.setdefault("inputs", {})[input_name] = value
    return result
