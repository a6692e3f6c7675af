"""What validation reports, in ComfyUI's shape, and the same report as text for people.

A :class:`ValidationResult` carries ``error`` (the prompt-level error or None) and ``node_errors``
(``{node_id: {"errors": [...], "dependent_outputs": [...], "class_type": ...}}``), each error built by
:func:`error_entry`; :func:`format_errors` turns it into one line per error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass
class ValidationResult:
    """The outcome of ``runtime.validate.validate_prompt``.

    ``ok`` mirrors a 200 answer from ComfyUI: no prompt-level error and at least one output that can run
    (``outputs``); ``node_errors`` may still hold errors of other outputs.  ``coerced`` is a copy of the
    prompt (string node ids and link ids) with widget values converted to their declared types; list
    constants keep their ``{"__value__": [...]}`` wrapper because a bare list means a link.
    """

    ok: bool
    error: dict | None
    node_errors: dict
    outputs: list[str]
    coerced: dict = field(default_factory=dict)
    ui_titles: dict = field(default_factory=dict)


def error_entry(kind: str, message: str, details: str, input_name: str | None = None,
                input_config: Any = None, received_value: Any = None, **extra: Any) -> dict:
    """One error as ComfyUI reports it: ``{type, message, details, extra_info}``.

    ``extra_info`` holds ``input_name``, ``input_config`` and ``received_value`` when the error is about an
    input, plus any ``extra`` entries (e.g. ``hint``, which :func:`format_errors` prints).
    """
    info: dict[str, Any] = {}
    if input_name is not None:
        info = {"input_name": input_name, "input_config": input_config, "received_value": received_value}
    info.update(extra)
    return {"type": kind, "message": message, "details": details, "extra_info": info}


def format_errors(result: ValidationResult, ui_titles: Mapping[str, tuple] | None = None) -> str:
    """A human-readable report: one line per error naming node, UI node/title, class, input and message."""
    titles = dict(result.ui_titles)
    titles.update(ui_titles or {})
    lines: list[str] = []
    if result.error is not None:
        lines.append(f"Workflow failed validation: {result.error['message']}")
        if result.error["type"] == "prompt_no_outputs":
            lines.append(f"  {result.error['details']}")
    for node_id, entry in result.node_errors.items():
        where = f"node {node_id}"
        class_type = entry.get("class_type") or "?"
        if node_id in titles:
            ui_id, title = titles[node_id]
            named = title and title != class_type      # a default title would only repeat the class
            where += f" (UI node #{ui_id} '{title}')" if named else f" (UI node #{ui_id})"
        for error in entry["errors"]:
            input_name = error.get("extra_info", {}).get("input_name")
            subject = f"{where} {class_type}" + (f", input '{input_name}'" if input_name else "")
            details = error["details"].replace("\n", "; ")
            hint = error.get("extra_info", {}).get("hint")
            details += f" ({hint})" if hint else ""
            lines.append(f"  {subject}: {error['message']} [{error['type']}] {details}".rstrip())
    if result.ok and result.node_errors:
        lines.insert(0, f"Some outputs failed validation; running only: {', '.join(result.outputs)}")
    return "\n".join(lines)
