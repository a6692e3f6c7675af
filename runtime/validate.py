"""Whole-graph validation of an API-format prompt, as ComfyUI's ``validate_prompt`` does it.

Every error is reported at once, in ComfyUI's shape (``/prompt`` answers with the same dict):
``node_errors = {node_id: {"errors": [{type, message, details, extra_info}], "dependent_outputs": [...],
"class_type": ...}}``.  Like ComfyUI, only what some output node depends on is validated, an output whose
upstream is clean is still runnable when another output fails, widget values are coerced to their declared
type (the coerced prompt is returned for the executor), and inputs named by a node's ``VALIDATE_INPUTS``
skip the built-in min/max/combo checks.  Beyond ComfyUI, unknown classes are reported on every node at once
and link cycles are caught here rather than at execution time.  The result and its text form are in
``runtime.validation_report``.
"""
from __future__ import annotations

import copy
import difflib
import inspect
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

from .node_specs import InputSpec, input_specs, is_link, types_match
from .validation_report import ValidationResult, error_entry, format_errors

# ValidationResult and format_errors live in runtime.validation_report; re-exported here.
__all__ = ["ValidationResult", "format_errors", "validate_prompt"]

#: Widget types whose constant values are coerced; other types (MODEL, IMAGE, ...) only come by link.
_COERCE_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
_TRUE_WORDS = {"true": True, "false": False}


def _node_key(node_id: str) -> tuple:
    """Numeric ids in numeric order, then the others (e.g. subgraph ids "12:5") by text."""
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


# --------------------------------------------------------------------------------------------- validation
def validate_prompt(prompt: Any, node_classes: Mapping[str, type],
                    ui_titles: Mapping[str, tuple] | None = None) -> ValidationResult:
    """Validate an API-format prompt against the node classes; see the module docstring for the rules."""
    titles = dict(ui_titles or {})
    if not isinstance(prompt, Mapping):
        found = type(prompt).__name__
        error = error_entry("invalid_prompt", "Cannot execute because the prompt is not an object.",
                            f"expected {{node_id: {{class_type, inputs}}}}, found a {found}")
        return ValidationResult(False, error, {}, [], {}, titles)

    coerced: dict[str, Any] = {str(k): copy.deepcopy(v) for k, v in prompt.items()}
    node_errors: dict[str, dict] = {}

    def report(node_id: str, error: dict) -> None:
        node = coerced.get(node_id)
        class_type = node.get("class_type") if isinstance(node, dict) else None
        entry = node_errors.setdefault(node_id, {"errors": [], "dependent_outputs": [], "class_type": class_type})
        entry["errors"].append(error)

    classes = _resolve_classes(coerced, node_classes, report)
    prompt_errors = [e for entry in node_errors.values() for e in entry["errors"]]

    outputs = sorted((nid for nid, cls in classes.items() if getattr(cls, "OUTPUT_NODE", False) is True),
                     key=_node_key)
    upstream = {out: _upstream(out, coerced) for out in outputs}
    reachable = set().union(*upstream.values()) if upstream else set()

    spec_cache: dict[type, list[InputSpec]] = {}
    for node_id in sorted(reachable, key=_node_key):
        if node_id in classes:
            for error in _check_node(node_id, coerced, classes, spec_cache):
                report(node_id, error)
    for node_id, cycle in _cycles(reachable, coerced).items():
        report(node_id, error_entry("dependency_cycle", "Dependency cycle detected",
                                    f"node {node_id} depends on its own output through links "
                                    f"(cycle among nodes {', '.join(cycle)})", cycle=cycle))

    good_outputs = []
    for out in outputs:
        failed = [nid for nid in upstream[out] if nid in node_errors]
        for nid in failed:
            node_errors[nid]["dependent_outputs"].append(out)
        if not failed:
            good_outputs.append(out)

    error = None
    if prompt_errors:
        error = prompt_errors[0]
    elif not outputs:
        error = error_entry("prompt_no_outputs", "Prompt has no outputs",
                            "no node of the workflow is an output node (OUTPUT_NODE = True), e.g. SaveImage")
    elif not good_outputs:
        own = [f"{e['message']}: {e['details']}"
               for out in outputs for e in node_errors.get(out, {}).get("errors", [])]
        error = error_entry("prompt_outputs_failed_validation", "Prompt outputs failed validation", "\n".join(own))
    node_errors = {nid: node_errors[nid] for nid in sorted(node_errors, key=_node_key)}
    return ValidationResult(error is None, error, node_errors, good_outputs, coerced, titles)


def _resolve_classes(prompt: dict, node_classes: Mapping[str, type], report) -> dict[str, type]:
    """Node id → class for every well-formed node; prompt-level errors for the others (all of them)."""
    classes: dict[str, type] = {}
    for node_id, node in prompt.items():
        where = f"Node ID '#{node_id}'"
        if not isinstance(node, dict):
            report(node_id, error_entry("invalid_prompt", "Cannot execute because a node is not an object.",
                                        f"{where}: expected {{class_type, inputs}}, found {type(node).__name__}",
                                        node_id=node_id))
            continue
        class_type = node.get("class_type")
        if not isinstance(class_type, str) or not class_type:
            report(node_id, error_entry("invalid_prompt",
                                        "Cannot execute because a node is missing the class_type property.",
                                        where, node_id=node_id))
        elif class_type not in node_classes:
            report(node_id, error_entry("invalid_prompt", f"Cannot execute because node {class_type} does not exist.",
                                        f"{where}: no installed node class is named '{class_type}'",
                                        node_id=node_id, class_type=class_type))
        elif not isinstance(node.get("inputs", {}), dict):
            report(node_id, error_entry("invalid_prompt", "Cannot execute because a node's inputs are not an object.",
                                        f"{where}: 'inputs' is a {type(node['inputs']).__name__}", node_id=node_id))
        else:
            node.setdefault("inputs", {})
            classes[node_id] = node_classes[class_type]
    return classes


def _links_of(node: Any) -> list[tuple[str, str]]:
    """(input name, source node id) of every well-formed link of a node."""
    inputs = node.get("inputs") if isinstance(node, dict) else None
    if not isinstance(inputs, dict):
        return []
    return [(name, str(value[0])) for name, value in inputs.items() if is_link(value)]


def _upstream(output_id: str, prompt: dict, within: set[str] | None = None) -> set[str]:
    """The node and every existing node it depends on through links (iterative, cycle-safe)."""
    seen, stack = {output_id}, [output_id]
    while stack:
        for _, source in _links_of(prompt[stack.pop()]):
            if source in prompt and source not in seen and (within is None or source in within):
                seen.add(source)
                stack.append(source)
    return seen


def _cycles(nodes: set[str], prompt: dict) -> dict[str, list[str]]:
    """Node id → the nodes of its cycle, for each node among ``nodes`` that depends on itself.

    A node is on a cycle when one of its sources depends on it; its cycle is every node it depends on that
    also depends on it.  Quadratic, which is fine for workflows of hundreds of nodes.
    """
    depends = {node_id: _upstream(node_id, prompt, nodes) for node_id in nodes}
    found: dict[str, list[str]] = {}
    for node_id in nodes:
        sources = {src for _, src in _links_of(prompt[node_id]) if src in nodes}
        if any(node_id in depends[src] for src in sources):
            found[node_id] = sorted((n for n in depends[node_id] if node_id in depends[n]), key=_node_key)
    return found


def _check_node(node_id: str, prompt: dict, classes: Mapping[str, type],
                spec_cache: dict[type, list[InputSpec]]) -> list[dict]:
    """All input errors of one node; rewrites its inputs in ``prompt`` with the coerced values."""
    node_class = classes[node_id]
    inputs = prompt[node_id]["inputs"]
    try:
        if node_class not in spec_cache:
            spec_cache[node_class] = input_specs(node_class)
    except Exception as exc:  # a broken INPUT_TYPES must not hide the other nodes' errors
        return [error_entry("exception_during_validation", "Exception when validating node",
                            f"INPUT_TYPES() raised {type(exc).__name__}: {exc}", exception_type=type(exc).__name__)]
    specs = spec_cache[node_class]

    custom = _custom_validator(node_class)
    skip_builtin = (lambda name: custom is not None and (custom.has_kwargs or name in custom.names))
    errors: list[dict] = []
    received_types: dict[str, Any] = {}
    for name, value in inputs.items():
        if is_link(value):
            inputs[name] = [str(value[0]), value[1]]
    for spec in specs:
        if spec.name not in inputs:
            if spec.section == "required":
                errors.append(error_entry("required_input_missing", "Required input is missing", spec.name,
                                          spec.name, spec.config, None))
            continue
        value = inputs[spec.name]
        if isinstance(value, list):
            error, received = _check_link(spec, value, prompt, classes,
                                          type_check=custom is None or "input_types" not in custom.names)
            if error:
                errors.append(error)
            elif received is not None:
                received_types[spec.name] = received
            continue
        error, value = _check_constant(spec, value, skip_builtin(spec.name))
        if error:
            errors.append(error)
        else:
            inputs[spec.name] = value
    failed = {e["extra_info"].get("input_name") for e in errors}
    # Not called when an input it judges is already broken: its verdict would only repeat that error.
    if custom is not None and not any(skip_builtin(name) for name in failed if name):
        errors.extend(_run_custom(node_class, prompt[node_id]["class_type"], custom, specs, inputs,
                                  received_types))
    return errors


def _check_link(spec: InputSpec, value: list, prompt: dict, classes: Mapping[str, type],
                type_check: bool) -> tuple[dict | None, Any]:
    """(error or None, the linked output's type or None when unknown) for a list-valued input."""
    if not is_link(value):
        return error_entry("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                           f"{spec.name}: got {value!r}", spec.name, spec.config, value), None
    source, slot = str(value[0]), value[1]
    if source not in prompt:
        return error_entry("bad_linked_input", f"Bad linked input: node '{source}' does not exist",
                           f"{spec.name}: linked to output {slot} of node '{source}', which is not in the workflow",
                           spec.name, spec.config, value), None
    source_class = classes.get(source)
    if source_class is None:
        return None, None            # the source node carries its own invalid_prompt error
    return_types = tuple(getattr(source_class, "RETURN_TYPES", ()))
    if not 0 <= slot < len(return_types):
        class_type = prompt[source].get("class_type")
        return error_entry("bad_linked_input", "Bad linked input: output slot out of range",
                           f"{spec.name}: node {source} ({class_type}) has {len(return_types)} output(s) "
                           f"(slots 0..{len(return_types) - 1}), the link asks for slot {slot}",
                           spec.name, spec.config, value), None
    received = return_types[slot]
    if type_check and not types_match(received, spec.type):
        return error_entry("return_type_mismatch", "Return type mismatch between linked nodes",
                           f"{spec.name}, received_type({received}) mismatch input_type({spec.type})",
                           spec.name, spec.config, value, received_type=received, linked_node=value), received
    return None, received


def _check_constant(spec: InputSpec, value: Any, skip_builtin: bool) -> tuple[dict | None, Any]:
    """(error or None, coerced value) for a constant (widget) input."""
    wrapped = isinstance(value, dict) and "__value__" in value
    raw = value["__value__"] if wrapped else value
    if isinstance(raw, list):
        return None, {"__value__": raw}      # list constants stay wrapped: a bare list is a link
    if spec.type in _COERCE_TYPES:
        try:
            raw = _coerce(raw, spec.type)
        except (TypeError, ValueError, OverflowError) as exc:
            return error_entry("invalid_input_type", f"Failed to convert an input value to a {spec.type} value",
                               f"{spec.name}, {raw!r}, {exc}", spec.name, spec.config, raw,
                               exception_message=str(exc)), value
    if skip_builtin:
        return None, raw
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        low, high = spec.options.get("min"), spec.options.get("max")
        if low is not None and raw < low:
            return error_entry("value_smaller_than_min", f"Value {raw} smaller than min of {low}", spec.name,
                               spec.name, spec.config, raw), raw
        if high is not None and raw > high:
            return error_entry("value_bigger_than_max", f"Value {raw} bigger than max of {high}", spec.name,
                               spec.name, spec.config, raw), raw
    if spec.choices is not None and raw not in spec.choices:
        # Huge lists (every model file) are summarised, as ComfyUI does.
        listed = str(spec.choices) if len(spec.choices) <= 20 else f"(list of length {len(spec.choices)})"
        config = spec.config if len(spec.choices) <= 20 else None
        return error_entry("value_not_in_list", "Value not in list", f"{spec.name}: '{raw}' not in {listed}",
                           spec.name, config, raw, **_hint(_not_in_list_hint(raw, spec.choices))), raw
    return None, raw


def _hint(text: str | None) -> dict:
    return {"hint": text} if text else {}


def _not_in_list_hint(value: Any, choices: list) -> str | None:
    """What to do about a value that is not an option: a path rule, a near miss, or where files go.

    None when the details already show every option (a short list) and the value is no path.
    """
    text = str(value)
    if os.path.isabs(text) or ".." in text.replace("\\", "/").split("/"):
        return ("names are relative to their folder: '..' and absolute paths are refused; put the file in the "
                "folder and pick its name")
    if 0 < len(choices) <= 20:
        return None
    close = difflib.get_close_matches(text, [str(c) for c in choices], n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
    if not choices:
        return "there is nothing to choose from: put the file in the node's folder ('ipadapter nodes' lists them)"
    return "pick one of the listed options, or put the missing file in the node's folder ('ipadapter nodes' lists them)"


def _coerce(value: Any, type_name: str) -> Any:
    if type_name == "INT":
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"cannot convert {value} to an integer")
        return int(value)            # ComfyUI's int(): "3" and 3.0 pass, "3.5" does not
    if type_name == "FLOAT":
        return float(value)
    if type_name == "STRING":
        if value is None:
            raise TypeError("None is not a string")
        return str(value)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS:
        return _TRUE_WORDS[value.strip().lower()]
    # bool("false") would be True: refuse anything that is not clearly a boolean.
    raise ValueError(f"{value!r} is not a boolean (use true/false)")


@dataclass(frozen=True)
class _CustomValidator:
    names: frozenset[str]
    has_kwargs: bool


def _custom_validator(node_class: type) -> _CustomValidator | None:
    function = getattr(node_class, "VALIDATE_INPUTS", None)
    if function is None:
        return None
    parameters = inspect.signature(function).parameters.values()
    names = frozenset(p.name for p in parameters
                      if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return _CustomValidator(names, any(p.kind == p.VAR_KEYWORD for p in parameters))


def _run_custom(node_class: type, class_type: str, custom: _CustomValidator, specs: list[InputSpec],
                inputs: dict, received_types: dict) -> list[dict]:
    """Call ``VALIDATE_INPUTS`` like ComfyUI: the inputs it names (all with ``**kwargs``), links as None."""
    declared = {spec.name: spec for spec in specs}
    arguments = {}
    for name, value in inputs.items():
        if name in declared and (custom.has_kwargs or name in custom.names):
            if isinstance(value, dict) and "__value__" in value:
                value = value["__value__"]
            arguments[name] = None if is_link(value) else value
    if "input_types" in custom.names:
        arguments["input_types"] = dict(received_types)
    named = [name for name in custom.names if name in declared]
    input_name = named[0] if len(named) == 1 else None
    spec = declared.get(input_name) if input_name else None
    received = arguments.get(input_name) if input_name else None
    try:
        verdict = node_class.VALIDATE_INPUTS(**arguments)
    except Exception as exc:
        return [error_entry("exception_during_validation", "Exception when validating node",
                            f"{class_type}.VALIDATE_INPUTS raised {type(exc).__name__}: {exc}",
                            input_name, spec.config if spec else None, received, exception_type=type(exc).__name__)]
    if verdict is True:
        return []
    details = class_type if verdict is False else f"{class_type} - {verdict}"
    return [error_entry("custom_validation_failed", "Custom validation failed for node", details,
                        input_name, spec.config if spec else None, received)]
