"""Node declarations, normalised: the inputs a V1 node class declares, type matching, and link shape.

Shared by validation, UI→API conversion and the executor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class InputSpec:
    """One declared input of a node class, normalised from ``INPUT_TYPES``."""

    name: str
    section: str                    # "required" or "optional"
    type: str                       # "INT", "COMBO", "MODEL", "A,B", "*", ...
    options: Mapping[str, Any]
    choices: list | None            # the combo's options, None when not a combo
    config: Any                     # the raw declaration, echoed as ``input_config`` in errors


def input_specs(node_class: type) -> list[InputSpec]:
    """Required then optional inputs of a V1 node class (hidden inputs are never values in a prompt)."""
    declared = node_class.INPUT_TYPES()
    specs: list[InputSpec] = []
    for section in ("required", "optional"):
        for name, config in (declared.get(section) or {}).items():
            specs.append(_parse_spec(name, section, config))
    return specs


def _parse_spec(name: str, section: str, config: Any) -> InputSpec:
    if isinstance(config, str):
        config = (config,)           # tolerate the bare "IMAGE" spelling some packs use
    head = config[0] if len(config) else "*"
    options = config[1] if len(config) > 1 and isinstance(config[1], Mapping) else {}
    if isinstance(head, (list, tuple)):
        return InputSpec(name, section, "COMBO", options, list(head), config)
    if head == "COMBO":
        return InputSpec(name, section, "COMBO", options, list(options.get("options", [])), config)
    return InputSpec(name, section, str(head), options, None, config)


def types_match(received: Any, expected: Any) -> bool:
    """Whether an output of type ``received`` may feed an input of type ``expected``.

    ``"*"`` on either side matches anything; ``"A,B"`` unions match when they share a member; a list
    (a combo's options used as a type) counts as ``COMBO``.
    """
    received_set, expected_set = _type_set(received), _type_set(expected)
    if "*" in received_set or "*" in expected_set:
        return True
    return bool(received_set & expected_set)


def _type_set(type_name: Any) -> set[str]:
    if isinstance(type_name, (list, tuple)):
        return {"COMBO"}
    return {part.strip() for part in str(type_name).split(",") if part.strip()}


def is_link(value: Any) -> bool:
    """A well-formed link ``[node_id, output_slot]``."""
    return (
        isinstance(value, list) and len(value) == 2
        and isinstance(value[0], (str, int)) and not isinstance(value[0], bool)
        and isinstance(value[1], int) and not isinstance(value[1], bool)
    )
