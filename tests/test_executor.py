"""The headless executor: dependency order, classic cache, node objects, hidden inputs, errors, interrupts."""
from __future__ import annotations

import pytest

from ipadapter_nodes.runtime import executor as executor_module
from ipadapter_nodes.runtime.executor import (
    ExecutionInterrupted,
    Executor,
    NodeExecutionError,
    PromptError,
    check_interrupted,
    interrupt,
)

CALLS: list[str] = []  # node ids in the order their FUNCTION ran


class Const:
    """INT constant."""

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0})}, "hidden": {"uid": "UNIQUE_ID"}}

    def run(self, value, uid):
        CALLS.append(uid)
        return (value,)


class Add:
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("INT",), "b": ("INT",)},
                "optional": {"c": ("INT",)},
                "hidden": {"uid": "UNIQUE_ID"}}

    def run(self, a, b, uid, **optional):
        CALLS.append(uid)
        return (a + b + optional.get("c", 0),)


class Show:
    """Output node that records its value and every hidden input."""

    RETURN_TYPES = ()
    FUNCTION = "show"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT",)},
                "hidden": {"prompt": "PROMPT", "extra": "EXTRA_PNGINFO", "uid": "UNIQUE_ID"}}

    def show(self, value, prompt, extra, uid):
        CALLS.append(uid)
        return {"ui": {"value": [value], "prompt_nodes": [len(prompt)], "extra": [extra], "uid": [uid]}}


class Volatile(Const):
    @classmethod
    def IS_CHANGED(cls, value):
        return float("nan")


class Keyed(Const):
    """IS_CHANGED result follows a module-level 'file hash'."""

    stamp = "a"

    @classmethod
    def IS_CHANGED(cls, value):
        return cls.stamp


class Counter:
    """Keeps state on the instance, like LoraLoader's loaded_lora."""

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT",)}}

    def __init__(self):
        self.runs = 0

    def run(self, value):
        self.runs += 1
        return (self.runs,)


class Fail:
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT",)}}

    def run(self, value):
        raise ValueError(f"cannot use {value}")


class CtrlC:
    """Raises KeyboardInterrupt on its first run only."""

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    armed = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT",)}, "hidden": {"uid": "UNIQUE_ID"}}

    def run(self, value, uid):
        CALLS.append(uid)
        if CtrlC.armed:
            CtrlC.armed = False
            raise KeyboardInterrupt
        return (value,)


class Stepper:
    """Calls check_interrupted between 'steps' and asks for an interrupt at step 2."""

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    steps_done = 0

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT",)}}

    def run(self, value):
        for step in range(5):
            if step == 2:
                interrupt()
            check_interrupted()
            Stepper.steps_done = step + 1
        return (value,)


class ListIn(Const):
    INPUT_IS_LIST = True


class TwoValues(Const):
    def run(self, value, uid):
        return (value, value)


class Items:
    """Receives a list widget value (wrapped as {"__value__": [...]} in the prompt)."""

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"items": ("LIST",)}}

    def run(self, items):
        return (sum(items),)


CLASSES = {cls.__name__: cls for cls in
           (Const, Add, Show, Volatile, Keyed, Counter, Fail, CtrlC, Stepper, ListIn, TwoValues, Items)}


@pytest.fixture(autouse=True)
def _reset():
    CALLS.clear()
    CtrlC.armed = True
    Keyed.stamp = "a"
    Stepper.steps_done = 0
    executor_module._interrupt_requested.clear()
    yield
    executor_module._interrupt_requested.clear()


def make_executor() -> Executor:
    return Executor(CLASSES, progress=False)


def chain_prompt(a: int = 2, b: int = 3) -> dict:
    """1, 2 → 3 (Add) → 4 (Show); 5 → 6 is an unused branch (no output node depends on it)."""
    return {
        "1": {"class_type": "Const", "inputs": {"value": a}},
        "2": {"class_type": "Const", "inputs": {"value": b}},
        "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
        "4": {"class_type": "Show", "inputs": {"value": ["3", 0]}},
        "5": {"class_type": "Const", "inputs": {"value": 7}},
        "6": {"class_type": "Add", "inputs": {"a": ["5", 0], "b": ["5", 0]}},
    }


def test_runs_upstream_first_and_computes_the_value():
    result = make_executor().execute(chain_prompt(2, 3))
    assert result.executed == ["1", "2", "3", "4"]
    assert CALLS == ["1", "2", "3", "4"]
    assert result.ui["4"]["value"] == [5]
    assert result.node_outputs["3"] == (5,)


def test_progress_bar_counts_the_nodes_to_execute(capsys):
    ex = Executor(CLASSES, progress=True)
    ex.execute(chain_prompt(2, 3))
    err = capsys.readouterr().err
    assert "0/4" in err and "3 Add" in err and "4 Show" in err  # the unused branch is not counted
    ex.execute(chain_prompt(2, 9))
    err = capsys.readouterr().err
    assert "0/3" in err and "1 Const" not in err  # cached nodes are neither counted nor shown


def test_nodes_no_output_depends_on_are_not_executed():
    result = make_executor().execute(chain_prompt())
    assert "5" not in result.executed and "6" not in result.executed
    assert "5" not in CALLS and "6" not in CALLS


def test_rerunning_the_same_prompt_executes_nothing_and_reports_cached_ui():
    ex = make_executor()
    ex.execute(chain_prompt())
    CALLS.clear()
    again = ex.execute(chain_prompt())
    assert again.executed == []
    assert again.cached == ["1", "2", "3", "4"]
    assert CALLS == []
    assert again.ui["4"]["value"] == [5]


def test_changing_one_widget_reruns_exactly_that_node_and_its_dependents():
    ex = make_executor()
    ex.execute(chain_prompt(2, 3))
    changed = ex.execute(chain_prompt(2, 10))
    assert changed.executed == ["2", "3", "4"]
    assert changed.cached == ["1"]
    assert changed.ui["4"]["value"] == [12]


def test_an_identical_subgraph_under_other_ids_is_reused():
    prompt = chain_prompt(2, 3)
    prompt["7"] = {"class_type": "Const", "inputs": {"value": 2}}  # same as node 1
    prompt["8"] = {"class_type": "Show", "inputs": {"value": ["7", 0]}}
    result = make_executor().execute(prompt)
    # Const declares UNIQUE_ID, so (as in ComfyUI) its id is part of its key: 7 runs itself ...
    assert "7" in result.executed
    # ... while a node without UNIQUE_ID/NOT_IDEMPOTENT is shared across ids.
    prompt2 = {
        "1": {"class_type": "Counter", "inputs": {"value": 1}},
        "2": {"class_type": "Counter", "inputs": {"value": 1}},
        "3": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
        "4": {"class_type": "Show", "inputs": {"value": ["2", 0]}},
    }
    result2 = make_executor().execute(prompt2)
    assert result2.executed == ["1", "3", "4"]
    assert result2.cached == ["2"]
    assert result2.node_outputs["2"] == result2.node_outputs["1"] == (1,)


def test_is_changed_nan_reruns_the_node_and_its_dependents_every_time():
    ex = make_executor()
    prompt = {
        "1": {"class_type": "Volatile", "inputs": {"value": 4}},
        "2": {"class_type": "Const", "inputs": {"value": 1}},
        "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
        "4": {"class_type": "Show", "inputs": {"value": ["3", 0]}},
    }
    ex.execute(prompt)
    second = ex.execute(prompt)
    assert second.executed == ["1", "3", "4"]
    assert second.cached == ["2"]


def test_is_changed_value_is_part_of_the_cache_key():
    ex = make_executor()
    prompt = {"1": {"class_type": "Keyed", "inputs": {"value": 4}},
              "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    ex.execute(prompt)
    assert ex.execute(prompt).executed == []
    Keyed.stamp = "b"  # e.g. the file LoadImage reads changed on disk
    assert ex.execute(prompt).executed == ["1", "2"]


def test_node_objects_persist_between_runs():
    ex = make_executor()
    prompt = {"1": {"class_type": "Counter", "inputs": {"value": 0}},
              "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    assert ex.execute(prompt).ui["2"]["value"] == [1]
    prompt["1"]["inputs"]["value"] = 5  # new key → re-run, same object
    assert ex.execute(prompt).ui["2"]["value"] == [2]


def test_only_entries_of_the_last_prompt_are_kept():
    ex = make_executor()
    ex.execute(chain_prompt(2, 3))
    ex.execute(chain_prompt(20, 30))
    back = ex.execute(chain_prompt(2, 3))
    assert back.executed == ["1", "2", "3", "4"]


def test_hidden_inputs_receive_prompt_extra_pnginfo_and_the_node_id():
    prompt = chain_prompt()
    result = make_executor().execute(prompt, extra_pnginfo={"workflow": {"nodes": []}})
    assert result.ui["4"]["prompt_nodes"] == [6]
    assert result.ui["4"]["extra"] == [{"workflow": {"nodes": []}}]
    assert result.ui["4"]["uid"] == ["4"]


def test_optional_inputs_are_absent_unless_given():
    prompt = chain_prompt(2, 3)
    assert make_executor().execute(prompt).ui["4"]["value"] == [5]
    prompt["3"]["inputs"]["c"] = ["1", 0]
    assert make_executor().execute(prompt).ui["4"]["value"] == [7]


def test_list_widget_values_are_unwrapped():
    prompt = {"1": {"class_type": "Items", "inputs": {"items": {"__value__": [1, 2, 3]}}},
              "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    assert make_executor().execute(prompt).ui["2"]["value"] == [6]


def test_outputs_argument_selects_which_output_nodes_run():
    prompt = chain_prompt()
    prompt["7"] = {"class_type": "Show", "inputs": {"value": ["5", 0]}}
    result = make_executor().execute(prompt, outputs=["7"])
    assert result.executed == ["5", "7"]


def test_a_failing_node_raises_node_execution_error_naming_it():
    prompt = chain_prompt()
    prompt["3"] = {"class_type": "Fail", "inputs": {"value": ["1", 0]}}
    ex = make_executor()
    with pytest.raises(NodeExecutionError) as info:
        ex.execute(prompt, ui_titles={"3": ("3", "My failing node")})
    err = info.value
    assert (err.node_id, err.class_type) == ("3", "Fail")
    assert "node 3 'My failing node' (Fail)" in str(err)
    assert "ValueError: cannot use 2" in str(err)
    assert isinstance(err.__cause__, ValueError)
    # Upstream work is kept; the failed node is not cached and runs again.
    CALLS.clear()
    with pytest.raises(NodeExecutionError):
        ex.execute(prompt)
    assert CALLS == []


def test_keyboard_interrupt_propagates_and_the_interrupted_node_is_not_cached():
    prompt = {"1": {"class_type": "Const", "inputs": {"value": 9}},
              "2": {"class_type": "CtrlC", "inputs": {"value": ["1", 0]}},
              "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    ex = make_executor()
    with pytest.raises(KeyboardInterrupt):
        ex.execute(prompt)
    resumed = ex.execute(prompt)
    assert resumed.cached == ["1"]
    assert resumed.executed == ["2", "3"]
    assert resumed.ui["3"]["value"] == [9]


def test_interrupt_stops_a_node_at_its_next_check():
    prompt = {"1": {"class_type": "Stepper", "inputs": {"value": 1}},
              "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    with pytest.raises(ExecutionInterrupted):
        make_executor().execute(prompt)
    assert Stepper.steps_done == 2
    check_interrupted()  # the request was consumed: nothing pending


def test_list_nodes_are_refused_with_a_clear_error():
    prompt = {"1": {"class_type": "ListIn", "inputs": {"value": 1}},
              "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    with pytest.raises(NodeExecutionError, match="INPUT_IS_LIST"):
        make_executor().execute(prompt)


def test_returning_the_wrong_number_of_values_is_an_error():
    prompt = {"1": {"class_type": "TwoValues", "inputs": {"value": 1}},
              "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    with pytest.raises(NodeExecutionError, match="returned 2 value.*RETURN_TYPES declares 1"):
        make_executor().execute(prompt)


@pytest.mark.parametrize("prompt, message", [
    ({"1": {"class_type": "Const", "inputs": {"value": 1}}}, "no output node"),
    ({"1": {"class_type": "Nope", "inputs": {}}}, "unknown node type 'Nope'"),
    ({"1": {"class_type": "Show", "inputs": {"value": ["9", 0]}}}, "linked to node 9"),
    ({"1": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": ["2", 0]}},
      "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["1", 0]}},
      "3": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}, "cycle"),
])
def test_unexecutable_prompts_raise_prompt_error(prompt, message):
    with pytest.raises(PromptError, match=message):
        make_executor().execute(prompt)
