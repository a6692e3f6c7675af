"""The listing commands of ``ipadapter``: node classes (``nodes``), IP-Adapter files (``models``) and the
shipped workflows (``workflows``).

Each prints to stdout; the caller (``runtime.cli``) configures the folders first.  Heavy modules are
imported only when a command runs, so ``ipadapter --help`` stays fast.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

WORKFLOWS_DIR = Path(__file__).resolve().parent.parent / "workflows"


def print_nodes(classes: Mapping[str, type], display_names: Mapping[str, str], as_json: bool = False) -> None:
    """Every node class with its inputs and outputs: a text block each, or ``/object_info``-like JSON."""
    info = {class_type: object_info(class_type, cls, display_names.get(class_type))
            for class_type, cls in sorted(classes.items())}
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return
    for entry in info.values():
        print(format_node(entry))


def print_ipadapter_files() -> None:
    """One line per file in the ``ipadapter`` folders: its name and what it is (or why it is not recognised)."""
    from ..core import folders
    from ..core.adapter import describe_file

    names = folders.filter_extensions(folders.get_filename_list("ipadapter"), folders.MODEL_EXTENSIONS)
    if not names:
        where = ", ".join(folders.get_folder_paths("ipadapter"))
        print(f"no IP-Adapter files in {where}")
        return
    for name in names:
        path = folders.get_full_path("ipadapter", name)
        try:
            text = describe_file(path)
        except Exception as exc:  # noqa: BLE001 - one bad file must not hide the others
            text = f"unrecognized: {exc}"
        print(f"{name}: {text}")


def print_workflows(folder: Path = WORKFLOWS_DIR) -> None:
    """Each shipped workflow's path and the description in its ``extra.info``."""
    for path in sorted(folder.glob("*.json")):
        try:
            info = (json.loads(path.read_text(encoding="utf-8")).get("extra") or {}).get("info") or {}
        except (OSError, ValueError) as exc:
            print(f"{path}: unreadable ({exc})")
            continue
        about = (info.get("description") or info.get("title") or "") if isinstance(info, dict) else str(info)
        print(f"{path}\n    {about}" if about else str(path))


def object_info(class_type: str, cls: type, display_name: str | None = None) -> dict[str, Any]:
    """One class described the way ComfyUI's ``/object_info`` does."""
    spec = cls.INPUT_TYPES()
    returns = list(getattr(cls, "RETURN_TYPES", ()) or ())
    return {
        "input": {k: dict(spec[k]) for k in ("required", "optional", "hidden") if spec.get(k)},
        "input_order": {k: list(spec[k]) for k in ("required", "optional", "hidden") if spec.get(k)},
        "output": returns,
        "output_is_list": list(getattr(cls, "OUTPUT_IS_LIST", None) or [False] * len(returns)),
        "output_name": list(getattr(cls, "RETURN_NAMES", None) or returns),
        "name": class_type,
        "display_name": display_name or class_type,
        "description": getattr(cls, "DESCRIPTION", "") or "",
        "python_module": cls.__module__,
        "category": getattr(cls, "CATEGORY", "sd"),
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
    }


def format_node(info: dict[str, Any]) -> str:
    """Human-readable block for one class: inputs (type, default, range or options) and outputs."""
    title = info["name"] if info["display_name"] == info["name"] else f"{info['name']} ({info['display_name']})"
    lines = [f"{title}  [{info['category']}]" + ("  output node" if info["output_node"] else "")]
    for section in ("required", "optional"):
        for name, entry in info["input"].get(section, {}).items():
            marker = "" if section == "required" else " (optional)"
            lines.append(f"    {name}{marker}: {_describe_input(entry)}")
    for name, kind in zip(info["output_name"], info["output"]):
        lines.append(f"  -> {name}: {kind}")
    return "\n".join(lines)


def _describe_input(entry: Any) -> str:
    kind = entry[0] if isinstance(entry, (tuple, list)) and entry else entry
    options = entry[1] if isinstance(entry, (tuple, list)) and len(entry) > 1 and isinstance(entry[1], dict) else {}
    choices = kind if isinstance(kind, (list, tuple)) else options.get("options") if kind == "COMBO" else None
    if choices is not None:
        shown = ", ".join(map(str, list(choices)[:8])) + (", ..." if len(choices) > 8 else "")
        text = f"one of [{shown}] ({len(choices)} option{'s' if len(choices) != 1 else ''})"
    else:
        text = str(kind)
    details = [f"{key}={options[key]!r}" for key in ("default", "min", "max", "step") if key in options]
    return text + (f"  {' '.join(details)}" if details else "")
