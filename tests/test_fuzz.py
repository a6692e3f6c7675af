"""A seeded workflow fuzzer: broken workflows end with exit 1 or 2 and a message, never a traceback.

Every shipped workflow (``workflows/*.json``, UI format, and its API conversion) is mutated at random:
dropped links, links to missing nodes or wrong slots/types, wrong value types, out-of-range values,
unknown node types, cycles, removed inputs, duplicated ids, deeply nested garbage, truncated JSON text and
random bytes.  Each mutant goes through ``ipadapter validate``; the ones that still validate are also run
with a stub registry (same declarations, functions that compute nothing), so no model is loaded.
"""
from __future__ import annotations

import copy
import json
import random
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest

from ipadapter_nodes.core import folders
from ipadapter_nodes.runtime import cli, registry
from ipadapter_nodes.runtime.workflow import load_workflow
from PIL import Image
from test_faults import discover_file_inputs

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
MUTANTS = 1200
_JUNK: tuple[Any, ...] = (None, True, -1, 0, 3.5, -1e300, 1e300, 2 ** 70, "", "x", "../../etc/passwd", "NaN",
                          [], [[]], {}, {"__value__": None}, ["1"], ["1", "0"], [1, 2, 3], ["9999", 0],
                          {"a": [1, {"b": None}]}, "\u0000\ud7ff\u202e", " " * 3)


# --------------------------------------------------------------------------------------------- folders
@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> dict[str, str]:
    """Folders where every file the shipped workflows name exists (empty placeholders: nothing is loaded)."""
    root = tmp_path_factory.mktemp("fuzz")
    models, input_dir, output_dir = root / "models", root / "input", root / "output"
    for folder in (models, input_dir, output_dir):
        folder.mkdir(parents=True)
    file_inputs = {(f.class_type, f.name): f.folder for f in discover_file_inputs(root / "discovery")}
    for path in WORKFLOWS:
        for node in load_workflow(path).prompt.values():
            for name, value in node.get("inputs", {}).items():
                folder = file_inputs.get((node.get("class_type"), name))
                if isinstance(value, str) and folder not in (None, "output", "fixed list"):
                    _placeholder(input_dir if folder == "input" else models / folder, value)
    previous = folders.provider()
    yield {"models": str(models), "input": str(input_dir), "output": str(output_dir)}
    folders.configure(previous)


def _placeholder(base: Path, name: str) -> None:
    target = base / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if name.lower().endswith(folders.IMAGE_EXTENSIONS):
        Image.new("RGB", (8, 8)).save(target, format="PNG")
    elif "." in Path(name).name:
        target.write_bytes(b"")
    else:                                    # a diffusers / transformers model folder
        target.mkdir(exist_ok=True)
        for marker in ("model_index.json", "config.json"):
            (target / marker).write_text("{}")
        (target / "diffusion_pytorch_model.safetensors").write_bytes(b"")


def _cli(kind: str, path: Path, layout: dict[str, str]) -> int:
    return cli.main([kind, str(path), "--models-dir", layout["models"], "--input-dir", layout["input"],
                     "--output-dir", layout["output"]])


# --------------------------------------------------------------------------------------------- stub registry
def _stub(cls: type) -> type:
    """Same declaration as ``cls``; its function returns one ``None`` per output and touches nothing."""
    outputs = len(getattr(cls, "RETURN_TYPES", ()) or ())

    def compute(self, **_inputs):
        return {"ui": {}, "result": (None,) * outputs} if getattr(cls, "OUTPUT_NODE", False) else (None,) * outputs

    attrs = {name: getattr(cls, name) for name in ("INPUT_TYPES", "RETURN_TYPES", "RETURN_NAMES", "OUTPUT_NODE",
                                                   "CATEGORY", "VALIDATE_INPUTS") if hasattr(cls, name)}
    attrs.update(FUNCTION="compute", compute=compute)
    return type(cls.__name__, (), attrs)


# --------------------------------------------------------------------------------------------- mutations
_DEEP = "@@deeply-nested@@"    # replaced in the JSON text: json.dumps itself cannot write such depths


def _nested_garbage(rng: random.Random) -> Any:
    return _DEEP


def _deepen(text: str, rng: random.Random) -> str:
    while f'"{_DEEP}"' in text:
        depth = rng.choice((50, 400, 5000, 100_000))
        opening, closing = ("[", "]") if rng.random() < 0.5 else ('{"k": ', "}")
        text = text.replace(f'"{_DEEP}"', opening * depth + "null" + closing * depth, 1)
    return text


def _junk(rng: random.Random) -> Any:
    return _nested_garbage(rng) if rng.random() < 0.05 else copy.deepcopy(rng.choice(_JUNK))


def _list(owner: Any, key: str) -> list:
    """``owner[key]`` when it is a list (earlier mutations may have replaced it), else an empty list."""
    value = owner.get(key) if isinstance(owner, dict) else None
    return value if isinstance(value, list) else []


def _ui_mutations(rng: random.Random, ui: dict) -> None:
    nodes = [n for n in _list(ui, "nodes") if isinstance(n, dict)]
    links = _list(ui, "links")
    real_links = [l for l in links if isinstance(l, list) and len(l) > 4]
    node = rng.choice(nodes) if nodes else {}
    values, inputs = _list(node, "widgets_values"), _list(node, "inputs")
    choice = rng.randrange(14)
    if choice == 0 and links:                                    # dropped link (nodes still point at it)
        links.pop(rng.randrange(len(links)))
    elif choice == 1 and real_links:                             # link from a wrong slot / missing node
        rng.choice(real_links)[rng.choice((1, 2, 4))] = rng.choice((-1, 7, 99, "x", None, 1.5, 9999))
    elif choice == 2 and real_links and nodes:                   # link from a node of the wrong type
        link = rng.choice(real_links)
        link[1], link[2] = rng.choice(nodes).get("id"), rng.randrange(3)
    elif choice == 3 and values:                                 # wrong value type
        values[rng.randrange(len(values))] = _junk(rng)
    elif choice == 4 and values:                                 # out of range
        values[rng.randrange(len(values))] = rng.choice((-10 ** 9, 10 ** 9, -1, 1e-9, 2 ** 64, -0.5))
    elif choice == 5 and node:                                   # unknown node type
        node["type"] = rng.choice(("NoSuchNode", "", "KSampler ", "__init__", "PrimitiveNode", "Reroute"))
    elif choice == 6 and len(nodes) > 1:                         # a cycle: a consumer feeds its source
        target, source = rng.sample(nodes, 2)
        new_id = 1 + max((l[0] for l in real_links if isinstance(l[0], int)), default=0)
        links.append([new_id, target.get("id"), 0, source.get("id"), 0, "*"])
        if not isinstance(source.get("inputs"), list):
            source["inputs"] = []
        source["inputs"].append({"name": "model", "type": "*", "link": new_id})
        for entry in _list(target, "inputs"):
            if isinstance(entry, dict):
                entry["link"] = rng.choice([l[0] for l in links if isinstance(l, list) and l])
    elif choice == 7 and inputs:                                 # removed required input
        inputs.pop(rng.randrange(len(inputs)))
    elif choice == 8 and values:                                 # removed widget values
        del values[rng.randrange(len(values)):]
    elif choice == 9 and node:                                   # duplicated id
        twin = copy.deepcopy(node)
        twin["type"] = rng.choice([n.get("type") for n in nodes])
        ui["nodes"].append(twin)
    elif choice == 10 and node:                                  # deeply nested garbage in a field
        node[rng.choice(("inputs", "widgets_values", "outputs", "mode", "id", "title"))] = _nested_garbage(rng)
    elif choice == 11:                                           # top-level structure of the wrong type
        ui[rng.choice(("nodes", "links", "definitions", "extra"))] = _junk(rng)
    elif choice == 12 and node:                                  # node modes: muted / bypassed / unknown
        node["mode"] = rng.choice((2, 4, 99, "x", None))
    elif node:                                                   # an input entry of the wrong shape
        node["inputs"] = [_junk(rng)] + inputs


def _api_mutations(rng: random.Random, prompt: dict) -> None:
    ids = list(prompt)
    node_id = rng.choice(ids) if ids else "1"
    node = prompt.get(node_id) if isinstance(prompt.get(node_id), dict) else {}
    inputs = node.get("inputs") if isinstance(node.get("inputs"), dict) else {}
    linked = [name for name, value in inputs.items() if isinstance(value, list)]
    constant = [name for name, value in inputs.items() if not isinstance(value, list)]
    choice = rng.randrange(12)
    if choice == 0 and inputs:                                   # removed input (dropped link or widget)
        inputs.pop(rng.choice(list(inputs)))
    elif choice == 1 and linked:                                 # link to a wrong slot / missing node / bad shape
        name = rng.choice(linked)
        inputs[name] = rng.choice(([inputs[name][0], 17], [inputs[name][0], -1], ["404", 0], [inputs[name][0]],
                                   [inputs[name][0], "0"], [None, 0], [inputs[name][0], 0, 0], [True, 0]))
    elif choice == 2 and linked:                                 # link to a node of another type
        inputs[rng.choice(linked)] = [rng.choice(ids), rng.randrange(3)]
    elif choice == 3 and constant:                               # wrong value type
        inputs[rng.choice(constant)] = _junk(rng)
    elif choice == 4 and constant:                               # out of range
        inputs[rng.choice(constant)] = rng.choice((-10 ** 9, 10 ** 9, 2 ** 64, -1, 1e308, -0.5))
    elif choice == 5:                                            # unknown class
        node["class_type"] = rng.choice(("NoSuchNode", "", None, 5, ["KSampler"], "ksampler"))
    elif choice == 6 and len(ids) > 1:                           # a cycle
        a, b = rng.sample(ids, 2)
        for first, second in ((a, b), (b, a)):
            target = prompt[first].get("inputs") if isinstance(prompt[first], dict) else None
            if isinstance(target, dict):
                target[rng.choice(list(target) or ["x"])] = [second, 0]
    elif choice == 7:                                            # node of the wrong shape
        prompt[node_id] = rng.choice(({}, [], "KSampler", None, {"class_type": "KSampler", "inputs": []},
                                      {"inputs": inputs}))
    elif choice == 8:                                            # deeply nested garbage
        inputs[rng.choice(list(inputs) or ["x"])] = _nested_garbage(rng)
    elif choice == 9:                                            # an extra unknown input
        inputs[rng.choice(("zzz", "", "__value__"))] = _junk(rng)
    elif choice == 10 and node_id in prompt:                     # another id for a node (links now dangle)
        prompt[rng.choice(("0", "-1", "1:2", "x", node_id + "0"))] = prompt.pop(node_id)
    else:                                                        # the whole prompt replaced
        prompt.clear()
        prompt.update(rng.choice(({}, {"1": None}, {"prompt": {}}, {"nodes": [], "links": None})))


def _text_mutation(rng: random.Random, text: str) -> bytes:
    data = text.encode()
    choice = rng.randrange(5)
    if choice == 0:                                              # truncated JSON
        return data[: rng.randrange(len(data))]
    if choice == 1:                                              # random bytes
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
    if choice == 2:                                              # a few bytes overwritten
        mutable = bytearray(data)
        for _ in range(rng.randrange(1, 6)):
            mutable[rng.randrange(len(mutable))] = rng.randrange(256)
        return bytes(mutable)
    if choice == 3:                                              # duplicated ids (JSON keeps the last)
        start = text.index("{", 1)
        return (text[:start] + text[start:].replace('"1": {', '"1": {"class_type": "Nope"}, "1": {', 1)).encode()
    return ("[" * rng.choice((10, 100_000)) + "]" * rng.randrange(2)).encode()   # deep nesting


def _mutants(sources: dict[str, Any]) -> list[tuple[int, str, Callable[[random.Random], bytes]]]:
    """(seed, description, make) for every mutant; ``make`` builds its file content from its own seed."""
    out = []
    names = sorted(sources)
    for seed in range(MUTANTS):
        name = names[seed % len(names)]
        kind, base = sources[name]

        def make(rng: random.Random, kind=kind, base=base) -> bytes:
            if rng.random() < 0.2:
                return _text_mutation(rng, json.dumps(base, indent=1))
            data = copy.deepcopy(base)
            for _ in range(rng.choice((1, 1, 2, 3))):
                (_ui_mutations if kind == "ui" else _api_mutations)(rng, data)
            return _deepen(json.dumps(data), rng).encode()

        out.append((seed, name, make))
    return out


def _sources() -> dict[str, tuple[str, Any]]:
    sources: dict[str, tuple[str, Any]] = {}
    for path in WORKFLOWS:
        ui = json.loads(path.read_text())
        sources[f"{path.name} (UI)"] = ("ui", ui)
        sources[f"{path.name} (API)"] = ("api", load_workflow(path).prompt)
    return sources


# --------------------------------------------------------------------------------------------- tests
def test_the_shipped_workflows_validate_before_mutation(layout, tmp_path, capsys):
    assert WORKFLOWS, "no shipped workflows found in workflows/"
    for path in WORKFLOWS:
        assert _cli("validate", path, layout) == 0, capsys.readouterr().err
        api = tmp_path / f"{path.stem}.api.json"
        api.write_text(json.dumps(load_workflow(path).prompt))
        assert _cli("validate", api, layout) == 0, capsys.readouterr().err


def test_every_mutant_ends_with_an_exit_code_and_a_message_never_a_traceback(layout, tmp_path, capsys,
                                                                             monkeypatch):
    real = registry.node_classes()
    stubs = {name: _stub(cls) for name, cls in real.items()}
    sources = _sources()
    path = tmp_path / "mutant.json"
    failures: list[str] = []
    counts = {0: 0, 1: 0, 2: 0}
    for seed, name, make in _mutants(sources):
        path.write_bytes(make(random.Random(seed)))
        where = f"seed {seed} ({name})"
        try:
            code = _cli("validate", path, layout)
            err = capsys.readouterr().err
            if code == 0:
                # Still valid: run it on stubs (the executor and CLI see the mutant, no model loads).
                monkeypatch.setattr(registry, "node_classes", lambda: dict(stubs))
                try:
                    code = _cli("run", path, layout)
                finally:
                    monkeypatch.setattr(registry, "node_classes", lambda: dict(real))
                err = capsys.readouterr().err
        except BaseException as exc:  # noqa: BLE001 - every escape is a finding, reported with its seed
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            failures.append(f"{where}: {type(exc).__name__} escaped cli.main: {str(exc)[:200]} "
                            f"({Path(frame.filename).name}:{frame.lineno})")
            capsys.readouterr()
            continue
        counts[code] = counts.get(code, 0) + 1
        if "Traceback" in err:
            failures.append(f"{where}: traceback on stderr:\n{err[-1500:]}")
        elif code not in (0, 1, 2):
            failures.append(f"{where}: exit code {code}")
        elif code != 0 and not err.strip():
            failures.append(f"{where}: exit {code} without a message")
    assert not failures, f"{len(failures)} of {MUTANTS} mutants failed:\n" + "\n".join(failures[:15])
    assert sum(counts.values()) == MUTANTS >= 1000
    # The mutations really break things: most mutants are refused (exit 2), and only by messages.
    assert counts[2] >= MUTANTS * 0.6, counts
