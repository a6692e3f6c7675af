"""Headless executor: runs an API-format prompt with ComfyUI's node-class semantics and its classic cache.

What it does, as ComfyUI does it:

* only nodes that an output node (``OUTPUT_NODE = True``) depends on run, upstream first;
* one node object per ``(node id, class_type)``, kept between runs, so ``__init__`` state persists;
* ``getattr(obj, cls.FUNCTION)(**inputs)`` with links replaced by the upstream outputs, optional inputs
  absent when not given, hidden inputs ``PROMPT`` / ``EXTRA_PNGINFO`` / ``UNIQUE_ID`` filled in;
* results are a tuple matching ``RETURN_TYPES`` or ``{"ui": ..., "result": (...)}``;
* outputs are cached under an *input signature* (class, ``IS_CHANGED``, constant inputs, upstream
  signatures; see ``runtime.cache``), so an identical re-run executes nothing and a changed widget
  re-runs only that node and what depends on it.  Only the entries the last prompt used are kept.

Not supported (a clear error at execution): ``INPUT_IS_LIST``, ``OUTPUT_IS_LIST``, node expansion.
The prompt is expected to be validated already (``runtime.validate``); structural problems that would
make execution impossible still raise :class:`PromptError`.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from tqdm.auto import tqdm

from .cache import CacheEntry, input_signatures
from .node_inputs import NodeSpec, hidden_kind, is_linked, read_spec, unwrap


class PromptError(ValueError):
    """The prompt cannot be executed as given (unknown class, dangling link, cycle, no outputs)."""


class NodeExecutionError(RuntimeError):
    """A node raised while running.  The original exception is ``__cause__``."""

    def __init__(self, node_id: str, class_type: str, message: str, title: Any = None) -> None:
        self.node_id = node_id
        self.class_type = class_type
        self.title = title
        self.original_message = message
        super().__init__(f"{describe_node(node_id, class_type, title)} failed: {message}")


class ExecutionInterrupted(Exception):
    """The run was interrupted on request (:func:`interrupt`) between nodes or sampler steps."""


# --- interruption -----------------------------------------------------------------------------------
# A process-wide flag, like ComfyUI's: a signal handler or another thread sets it, long-running code
# (the sampler, between steps) calls check_interrupted().
_interrupt_requested = threading.Event()


def interrupt() -> None:
    """Ask the running prompt to stop at the next :func:`check_interrupted` (between nodes or steps)."""
    _interrupt_requested.set()


def check_interrupted() -> None:
    """Raise :class:`ExecutionInterrupted` if :func:`interrupt` was called; clears the request."""
    if _interrupt_requested.is_set():
        _interrupt_requested.clear()
        raise ExecutionInterrupted("execution was interrupted")


# --- helpers ------------------------------------------------------------------------------------------
def describe_node(node_id: str, class_type: str, title: Any = None) -> str:
    """``node 5 'My sampler' (KSampler)`` — how messages name a node.

    ``title`` is the UI title, or ``(ui_node_id, title)`` as ``runtime.workflow`` records it.
    """
    ui_id = None
    if isinstance(title, (tuple, list)):
        ui_id, title = (tuple(title) + (None, None))[:2]
    where = f"node {node_id}"
    if ui_id is not None and str(ui_id) != str(node_id):
        where += f" (UI node #{ui_id})"
    if title and title != class_type:
        where += f" '{title}'"
    return f"{where} ({class_type})"


def _id_sort_key(node_id: str) -> tuple:
    # "10" after "9"; subgraph ids like "12:5" sort by their parts.
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in str(node_id).split(":"))


# --- results ------------------------------------------------------------------------------------------
@dataclass
class ExecutionResult:
    """What one :meth:`Executor.execute` call did.

    ``executed``/``cached``: node ids run / reused from the cache, in execution order.
    ``ui``: node id → the ``ui`` dict it returned (re-reported from the cache for cached nodes).
    ``node_outputs``: node id → its output tuple, for every node the outputs needed.
    """

    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    ui: dict[str, dict[str, Any]] = field(default_factory=dict)
    node_outputs: dict[str, tuple] = field(default_factory=dict)


# --- executor -----------------------------------------------------------------------------------------
class Executor:
    """Runs prompts; holds the output cache and the node objects between runs (one per process)."""

    def __init__(self, node_classes: Mapping[str, type] | None = None, progress: bool | None = None) -> None:
        """``node_classes``: class_type → class (default: ``registry.node_classes()``).
        ``progress``: show the node progress bar (True/False; None = only on a terminal)."""
        if node_classes is None:
            from .registry import node_classes as registered

            node_classes = registered()
        self.node_classes: dict[str, type] = dict(node_classes)
        self.progress = progress
        self._cache: dict[str, CacheEntry] = {}
        self._objects: dict[tuple[str, str], Any] = {}
        # INPUT_TYPES may list model folders: read once per class per execute() call.
        self._specs: dict[type, NodeSpec] = {}

    def _spec(self, cls: type) -> NodeSpec:
        spec = self._specs.get(cls)
        if spec is None:
            spec = self._specs[cls] = read_spec(cls)
        return spec

    # -- public ---------------------------------------------------------------------------------------
    def execute(
        self,
        prompt: Mapping[str, Mapping[str, Any]],
        extra_pnginfo: Mapping[str, Any] | None = None,
        outputs: Sequence[str] | None = None,
        ui_titles: Mapping[str, Any] | None = None,
    ) -> ExecutionResult:
        """Run the nodes ``outputs`` (default: every output node) depend on and return what happened.

        Raises :class:`NodeExecutionError` when a node fails (original exception as ``__cause__``),
        :class:`ExecutionInterrupted` after :func:`interrupt`, :class:`PromptError` for an
        unexecutable prompt; ``KeyboardInterrupt`` propagates.  A node that did not finish is not cached.
        """
        titles = {str(k): v for k, v in (ui_titles or {}).items()}
        prompt = {str(k): v for k, v in prompt.items()}  # ids are strings, as in links and UNIQUE_ID
        self._specs = {}
        _interrupt_requested.clear()
        targets = self._output_ids(prompt, outputs)
        order = self._dependency_order(prompt, targets)
        signatures = input_signatures(prompt, order, lambda node_id: self._class_of(prompt, node_id), self._spec)
        result = ExecutionResult()

        # Nodes that will really run: not in the cache and not a duplicate of an earlier node this run.
        seen: set[str] = set(self._cache)
        to_run = 0
        for node_id in order:
            if signatures[node_id] not in seen:
                to_run += 1
                seen.add(signatures[node_id])

        bar = tqdm(total=to_run, unit="node", disable=self._bar_disabled(), leave=False)
        try:
            for node_id in order:
                check_interrupted()
                node = prompt[node_id]
                entry = self._cache.get(signatures[node_id])
                if entry is None:
                    bar.set_description(f"{node_id} {node['class_type']}")
                    entry = self._run_node(node_id, node, prompt, extra_pnginfo, result, titles)
                    self._cache[signatures[node_id]] = entry
                    result.executed.append(node_id)
                    bar.update(1)
                else:
                    result.cached.append(node_id)
                result.node_outputs[node_id] = entry.outputs
                if entry.ui is not None:
                    result.ui[node_id] = entry.ui
        finally:
            bar.close()
            self._forget_unused(prompt, set(signatures.values()))
        return result

    def clear_cache(self) -> None:
        """Drop every cached output and node object (e.g. to free memory between unrelated runs)."""
        self._cache.clear()
        self._objects.clear()

    # -- planning -------------------------------------------------------------------------------------
    def _class_of(self, prompt: Mapping[str, Mapping[str, Any]], node_id: str) -> type:
        node = prompt.get(node_id)
        if not isinstance(node, Mapping) or "class_type" not in node:
            raise PromptError(f"node {node_id} has no 'class_type'; the prompt is not in API format")
        cls = self.node_classes.get(node["class_type"])
        if cls is None:
            raise PromptError(
                f"node {node_id}: unknown node type '{node['class_type']}'; run 'ipadapter nodes' for the "
                f"known types, or install the pack that provides it"
            )
        return cls

    def _output_ids(self, prompt: Mapping[str, Mapping[str, Any]], outputs: Sequence[str] | None) -> list[str]:
        if outputs is not None:
            ids = [str(o) for o in outputs]
            missing = [o for o in ids if o not in prompt]
            if missing:
                raise PromptError(f"output node(s) {', '.join(missing)} are not in the prompt")
        else:
            ids = [nid for nid in prompt if getattr(self._class_of(prompt, nid), "OUTPUT_NODE", False)]
        if not ids:
            raise PromptError("the prompt has no output node (e.g. SaveImage or PreviewImage); nothing to run")
        return sorted(ids, key=_id_sort_key)

    def _links(self, prompt: Mapping[str, Mapping[str, Any]], node_id: str) -> list[tuple[str, str, int]]:
        """(input name, source id, slot) for the node's linked inputs, in input order."""
        links = []
        for name, value in (prompt[node_id].get("inputs") or {}).items():
            if is_linked(self._spec(self._class_of(prompt, node_id)), name, value):
                source, slot = str(value[0]), value[1]
                if source not in prompt:
                    raise PromptError(
                        f"{describe_node(node_id, prompt[node_id]['class_type'])}: input '{name}' is linked to "
                        f"node {source}, which is not in the prompt"
                    )
                links.append((name, source, slot))
        return links

    def _dependency_order(self, prompt: Mapping[str, Mapping[str, Any]], targets: list[str]) -> list[str]:
        """Upstream-first order of every node the targets need (iterative DFS; cycles are errors)."""
        state: dict[str, int] = {}  # 1 = on the current path, 2 = placed
        order: list[str] = []
        for target in targets:
            if state.get(target) == 2:
                continue
            self._class_of(prompt, target)
            stack = [(target, iter(self._links(prompt, target)))]
            state[target] = 1
            while stack:
                node_id, deps = stack[-1]
                for _, source, _slot in deps:
                    if state.get(source) == 1:
                        raise PromptError(f"the prompt has a cycle through node {source} and node {node_id}")
                    if state.get(source) is None:
                        self._class_of(prompt, source)
                        state[source] = 1
                        stack.append((source, iter(self._links(prompt, source))))
                        break
                else:
                    stack.pop()
                    state[node_id] = 2
                    order.append(node_id)
        return order

    def _bar_disabled(self) -> bool | None:
        return None if self.progress is None else not self.progress

    # -- running --------------------------------------------------------------------------------------
    def _run_node(
        self,
        node_id: str,
        node: Mapping[str, Any],
        prompt: Mapping[str, Mapping[str, Any]],
        extra_pnginfo: Mapping[str, Any] | None,
        result: ExecutionResult,
        titles: dict[str, Any],
    ) -> CacheEntry:
        class_type = node["class_type"]
        cls = self._class_of(prompt, node_id)
        title = titles.get(node_id)
        if getattr(cls, "INPUT_IS_LIST", False) or any(getattr(cls, "OUTPUT_IS_LIST", None) or ()):
            raise NodeExecutionError(
                node_id, class_type,
                "INPUT_IS_LIST / OUTPUT_IS_LIST nodes are not supported by the headless runner; run this "
                "workflow inside ComfyUI",
                title,
            )
        kwargs = self._inputs_for(node_id, node, cls, prompt, extra_pnginfo, result, title)
        try:
            obj = self._objects.get((node_id, class_type))
            if obj is None:
                obj = cls()
                self._objects[(node_id, class_type)] = obj
            returned = getattr(obj, cls.FUNCTION)(**kwargs)
        except (KeyboardInterrupt, ExecutionInterrupted):
            raise
        except Exception as exc:
            raise NodeExecutionError(node_id, class_type, f"{type(exc).__name__}: {exc}", title) from exc
        return self._entry_from(returned, cls, node_id, class_type, title)

    def _inputs_for(
        self,
        node_id: str,
        node: Mapping[str, Any],
        cls: type,
        prompt: Mapping[str, Mapping[str, Any]],
        extra_pnginfo: Mapping[str, Any] | None,
        result: ExecutionResult,
        title: Any,
    ) -> dict[str, Any]:
        spec = self._spec(cls)
        declared = set(spec["required"]) | set(spec["optional"])
        kwargs: dict[str, Any] = {}
        for name, value in (node.get("inputs") or {}).items():
            if is_linked(spec, name, value):
                source, slot = str(value[0]), value[1]
                upstream = result.node_outputs[source]
                if not 0 <= slot < len(upstream):
                    raise NodeExecutionError(
                        node_id, node["class_type"],
                        f"input '{name}' is linked to output {slot} of node {source}, which has "
                        f"{len(upstream)} output(s)",
                        title,
                    )
                kwargs[name] = upstream[slot]
            elif name in declared:
                # Like ComfyUI: constants the class does not declare are dropped.
                kwargs[name] = unwrap(value)
        for name, entry in spec["hidden"].items():
            kind = hidden_kind(entry)
            if kind == "PROMPT":
                kwargs[name] = prompt
            elif kind == "EXTRA_PNGINFO":
                kwargs[name] = extra_pnginfo
            elif kind == "UNIQUE_ID":
                kwargs[name] = node_id
            else:
                kwargs[name] = None  # DYNPROMPT, API keys, ...: not available headless
        return kwargs

    @staticmethod
    def _entry_from(returned: Any, cls: type, node_id: str, class_type: str, title: Any) -> CacheEntry:
        ui = None
        if isinstance(returned, dict):
            if "expand" in returned:
                raise NodeExecutionError(node_id, class_type, "node expansion is not supported headless", title)
            ui = returned.get("ui")
            returned = returned.get("result", ())
        if returned is None:
            returned = ()
        if not isinstance(returned, (tuple, list)):
            raise NodeExecutionError(
                node_id, class_type,
                f"returned {type(returned).__name__}; expected a tuple matching RETURN_TYPES or a dict "
                f"with 'ui'/'result'",
                title,
            )
        expected = len(getattr(cls, "RETURN_TYPES", ()) or ())
        if len(returned) != expected and not (ui is not None and len(returned) == 0):
            raise NodeExecutionError(
                node_id, class_type,
                f"returned {len(returned)} value(s) but RETURN_TYPES declares {expected}", title,
            )
        return CacheEntry(tuple(returned), ui)

    def _forget_unused(self, prompt: Mapping[str, Mapping[str, Any]], keep: set[str]) -> None:
        # Classic cache: keep what the last prompt used, so memory stays bounded by one prompt.
        for signature in [s for s in self._cache if s not in keep]:
            del self._cache[signature]
        present = {(nid, n.get("class_type")) for nid, n in prompt.items() if isinstance(n, Mapping)}
        for key in [k for k in self._objects if k not in present]:
            del self._objects[key]
