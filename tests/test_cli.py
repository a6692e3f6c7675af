"""The ``ipadapter`` command (exit codes, --set, listing, conversion) and extra_model_paths.yaml folders."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ipadapter_nodes.core import folders
from ipadapter_nodes.runtime import cli, registry
from ipadapter_nodes.runtime.models import (
    ExtraModelPathsError,
    configure_folders,
    find_extra_model_paths,
    read_extra_model_paths,
)


# --- fake nodes -------------------------------------------------------------------------------------------
class Number:
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "test"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 1, "min": 0, "max": 100})}}

    def run(self, value):
        return (value,)


class Twice:
    RETURN_TYPES = ("INT",)
    RETURN_NAMES = ("doubled",)
    FUNCTION = "run"
    CATEGORY = "test"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT",), "mode": (["plain", "loud"],)}}

    def run(self, value, mode):
        return (2 * value,)


class SaveNumber:
    """Writes its value to <output>/<prefix>.txt and reports it like SaveImage does."""

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "test"
    last_extra: object = "never ran"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT",), "prefix": ("STRING", {"default": "number"})},
                "hidden": {"extra": "EXTRA_PNGINFO"}}

    def save(self, value, prefix, extra):
        SaveNumber.last_extra = extra
        out = Path(folders.provider().get_output_directory())
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{prefix}.txt").write_text(str(value))
        return {"ui": {"images": [{"filename": f"{prefix}.txt", "subfolder": "", "type": "output"}]}}


class Boom:
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "test"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT",)}}

    def run(self, value):
        raise RuntimeError("the tensor shapes do not fit")


class CtrlC(Boom):
    def run(self, value):
        raise KeyboardInterrupt


FAKE = {cls.__name__: cls for cls in (Number, Twice, SaveNumber, Boom, CtrlC)}


@pytest.fixture(autouse=True)
def fake_registry(monkeypatch):
    monkeypatch.setattr(registry, "node_classes", lambda: dict(FAKE))
    monkeypatch.setattr(registry, "display_names", lambda: {"SaveNumber": "Save number"})
    monkeypatch.setattr(folders, "_provider", folders._provider)  # restored after each test


def api_workflow(tmp_path: Path, middle: str = "Twice", value: int = 4) -> Path:
    prompt = {
        "1": {"class_type": "Number", "inputs": {"value": value}},
        "2": {"class_type": middle, "inputs": {"value": ["1", 0], "mode": "plain"}},
        "3": {"class_type": "SaveNumber", "inputs": {"value": ["2", 0], "prefix": "result"}},
    }
    if middle != "Twice":
        del prompt["2"]["inputs"]["mode"]
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(prompt))
    return path


def run_cli(tmp_path: Path, *args: str) -> int:
    return cli.main([*args, "--output-dir", str(tmp_path / "out"), "--models-dir", str(tmp_path / "models")])


# --- run / validate ---------------------------------------------------------------------------------------
def test_run_writes_the_output_and_prints_its_path(tmp_path, capsys):
    code = run_cli(tmp_path, "run", str(api_workflow(tmp_path)))
    out, err = capsys.readouterr()
    written = tmp_path / "out" / "result.txt"
    assert code == 0
    assert out.strip() == str(written.resolve())
    assert written.read_text() == "8"
    assert "3 node(s) executed" in err


def test_set_overrides_a_widget_before_running(tmp_path, capsys):
    code = run_cli(tmp_path, "run", str(api_workflow(tmp_path)), "--set", "1.value=21", "--set", "3.prefix=other")
    assert code == 0
    assert (tmp_path / "out" / "other.txt").read_text() == "42"


def test_invalid_workflow_exits_2_with_every_error_and_no_traceback(tmp_path, capsys):
    path = api_workflow(tmp_path, value=500)  # above max=100
    code = run_cli(tmp_path, "run", str(path), "--set", "2.mode=whisper")
    out, err = capsys.readouterr()
    assert code == 2
    assert "value" in err and "whisper" in err  # both problems reported
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "result.txt").exists()


def test_a_node_failing_while_running_exits_1_naming_the_node(tmp_path, capsys):
    code = run_cli(tmp_path, "run", str(api_workflow(tmp_path, middle="Boom")))
    _, err = capsys.readouterr()
    assert code == 1
    assert "node 2 (Boom)" in err and "the tensor shapes do not fit" in err
    assert "Traceback" not in err


def test_debug_prints_the_traceback_of_a_failing_node(tmp_path, capsys):
    code = run_cli(tmp_path, "run", str(api_workflow(tmp_path, middle="Boom")), "--debug")
    _, err = capsys.readouterr()
    assert code == 1
    assert "Traceback" in err and "RuntimeError" in err


def test_ctrl_c_exits_130_with_one_line(tmp_path, capsys):
    code = run_cli(tmp_path, "run", str(api_workflow(tmp_path, middle="CtrlC")))
    _, err = capsys.readouterr()
    assert code == 130
    assert err.strip() == "interrupted"


@pytest.mark.parametrize("make_args, message", [
    (lambda p: ["run", str(p / "missing.json")], "missing.json"),
    (lambda p: ["run", str(api_workflow(p)), "--set", "99.value=1"], "99"),
    (lambda p: ["run", str(api_workflow(p)), "--set", "novalue"], "NODE_ID.INPUT=VALUE"),
    (lambda p: ["run", str(api_workflow(p)), "--set", "1.valeu=3"], "node 1 (Number) has no input 'valeu'"),
    (lambda p: ["validate", str(p / "garbage.json")], "garbage.json"),
])
def test_bad_input_exits_2_with_a_message(tmp_path, capsys, make_args, message):
    (tmp_path / "garbage.json").write_text("{not json")
    code = run_cli(tmp_path, *make_args(tmp_path))
    _, err = capsys.readouterr()
    assert code == 2
    assert message in err and "Traceback" not in err


def test_validate_reports_valid_without_running(tmp_path, capsys):
    code = run_cli(tmp_path, "validate", str(api_workflow(tmp_path)))
    out, _ = capsys.readouterr()
    assert code == 0
    assert out.startswith("valid: 3 node(s)")
    assert not (tmp_path / "out").exists()


def test_validate_exits_2_on_an_error(tmp_path, capsys):
    code = run_cli(tmp_path, "validate", str(api_workflow(tmp_path)), "--set", "2.mode=whisper")
    _, err = capsys.readouterr()
    assert code == 2 and "whisper" in err


def test_a_ui_workflow_runs_and_its_nodes_receive_it_as_extra_pnginfo(tmp_path, capsys):
    assert run_cli(tmp_path, "run", str(ui_workflow(tmp_path))) == 0
    assert (tmp_path / "out" / "seven.txt").read_text() == "7"
    assert [n["type"] for n in SaveNumber.last_extra["workflow"]["nodes"]] == ["Number", "SaveNumber"]
    assert run_cli(tmp_path, "run", str(api_workflow(tmp_path))) == 0
    assert SaveNumber.last_extra is None  # an API-format file carries no UI workflow


# --- listing and conversion ------------------------------------------------------------------------------
def test_nodes_lists_every_class_with_inputs_and_outputs(capsys):
    assert cli.main(["nodes"]) == 0
    out, _ = capsys.readouterr()
    assert "SaveNumber (Save number)  [test]  output node" in out
    assert "value: INT  default=1 min=0 max=100" in out
    assert "mode: one of [plain, loud] (2 options)" in out
    assert "-> doubled: INT" in out


def test_nodes_json_is_object_info_like(capsys):
    assert cli.main(["nodes", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert sorted(info) == sorted(FAKE)
    assert info["Twice"]["input"]["required"]["mode"] == [["plain", "loud"]]
    assert info["Twice"]["output_name"] == ["doubled"]
    assert info["SaveNumber"]["output_node"] is True
    assert info["Number"]["input_order"] == {"required": ["value"]}


def ui_workflow(tmp_path: Path) -> Path:
    """Number(7) → SaveNumber(prefix "seven") in the UI format the ComfyUI frontend saves."""
    ui = {
        "last_node_id": 2, "last_link_id": 1, "version": 0.4,
        "nodes": [
            {"id": 1, "type": "Number", "mode": 0, "inputs": [],
             "outputs": [{"name": "INT", "type": "INT", "links": [1]}], "widgets_values": [7]},
            {"id": 2, "type": "SaveNumber", "mode": 0,
             # 'value' is an INT widget converted to a socket: its slot stays in widgets_values.
             "inputs": [{"name": "value", "type": "INT", "link": 1, "widget": {"name": "value"}}],
             "outputs": [], "widgets_values": [0, "seven"]},
        ],
        "links": [[1, 1, 0, 2, 0, "INT"]],
    }
    path = tmp_path / "ui.json"
    path.write_text(json.dumps(ui))
    return path


def test_convert_prints_the_api_form_of_a_ui_workflow(tmp_path, capsys):
    assert cli.main(["convert", str(ui_workflow(tmp_path))]) == 0
    prompt = json.loads(capsys.readouterr().out)
    assert prompt["1"]["class_type"] == "Number" and prompt["1"]["inputs"] == {"value": 7}
    assert prompt["2"]["inputs"] == {"value": ["1", 0], "prefix": "seven"}


def test_models_describes_each_adapter_file(tmp_path, capsys):
    from ipadapter_nodes.runtime.tiny_adapters import make_adapter

    adapters = tmp_path / "models" / "ipadapter"
    adapters.mkdir(parents=True)
    make_adapter("sd15-plus", adapters / "renamed.safetensors")
    (adapters / "bad.bin").write_bytes(b"y")
    (adapters / "notes.txt").write_text("not a model")
    assert cli.main(["models", "--models-dir", str(tmp_path / "models")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    assert out[0].startswith("bad.bin: unrecognized: ") and "bad.bin" in out[0]
    assert out[1].startswith("renamed.safetensors: SD1.5 Plus (also Plus-Face), 16 tokens")


# --- extra_model_paths.yaml ---------------------------------------------------------------------------
YAML = """
comfyui:
    base_path: comfy/
    checkpoints: models/checkpoints
    ipadapter: |
        models/ipadapter
        /abs/adapters
    clip: models/clip
a1111:
    is_default: true
    base_path: ~/webui
    checkpoints: models/Stable-diffusion
loose:
    ipadapter: shared/ipa
empty:
"""


def test_extra_model_paths_are_read_like_comfyui(tmp_path):
    path = tmp_path / "extra_model_paths.yaml"
    path.write_text(YAML)
    paths = read_extra_model_paths(path)
    comfy = tmp_path / "comfy" / "models"
    home = os.path.expanduser("~/webui")
    # is_default sections come first within a folder.
    assert paths["checkpoints"] == [os.path.join(home, "models", "Stable-diffusion"), str(comfy / "checkpoints")]
    assert paths["ipadapter"] == [str(comfy / "ipadapter"), "/abs/adapters", str(tmp_path / "shared" / "ipa")]
    assert paths["text_encoders"] == [str(comfy / "clip")]  # legacy name mapped
    assert "base_path" not in paths and "is_default" not in paths


def test_is_default_sections_are_searched_before_the_models_folder(tmp_path):
    yaml_path = tmp_path / "extra_model_paths.yaml"
    yaml_path.write_text("main:\n    is_default: true\n    ipadapter: preferred\nmore:\n    ipadapter: later\n")
    for folder in ("preferred", "later", "models/ipadapter"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "same.safetensors").write_bytes(folder.encode())
    layout = configure_folders(models_dir=tmp_path / "models", extra_model_paths=yaml_path)
    assert layout.get_folder_paths("ipadapter") == [
        str(tmp_path / "preferred"), str(tmp_path / "models" / "ipadapter"), str(tmp_path / "later")]
    # the first folder holding the name wins, as in ComfyUI
    assert layout.get_full_path("ipadapter", "same.safetensors") == str(tmp_path / "preferred" / "same.safetensors")


def test_configure_folders_finds_the_yaml_next_to_the_models_folder(tmp_path):
    (tmp_path / "extra_model_paths.yaml").write_text("more:\n    ipadapter: elsewhere\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.safetensors").write_bytes(b"")
    (tmp_path / "models" / "ipadapter").mkdir(parents=True)
    (tmp_path / "models" / "ipadapter" / "y.bin").write_bytes(b"")
    assert find_extra_model_paths(tmp_path / "models") == tmp_path / "extra_model_paths.yaml"
    layout = configure_folders(models_dir=tmp_path / "models", output_dir=tmp_path / "o")
    assert folders.provider() is layout
    assert folders.get_filename_list("ipadapter") == ["x.safetensors", "y.bin"]
    assert folders.get_full_path("ipadapter", "x.safetensors") == str(tmp_path / "elsewhere" / "x.safetensors")
    assert folders.provider().get_output_directory() == str(tmp_path / "o")


def test_configure_folders_defaults_to_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    layout = configure_folders()
    resolved = tmp_path.resolve()
    assert layout.models_dirs == [str(resolved / "models")]
    assert (layout.input_dir, layout.output_dir, layout.temp_dir) == tuple(
        str(resolved / d) for d in ("input", "output", "temp"))


@pytest.mark.parametrize("text, message", [
    ("a: [1, 2", "not valid YAML"),
    ("- just\n- a list\n", "expected sections"),
    ("s:\n    ipadapter: 5\n", "'ipadapter' in section 's'"),
])
def test_bad_extra_model_paths_name_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / "extra.yaml"
    path.write_text(text)
    with pytest.raises(ExtraModelPathsError, match=message):
        read_extra_model_paths(path)


def test_cli_reports_a_bad_extra_model_paths_file_with_exit_2(tmp_path, capsys):
    (tmp_path / "extra.yaml").write_text("a: [1, 2")
    code = run_cli(tmp_path, "validate", str(api_workflow(tmp_path)), "--extra-model-paths",
                   str(tmp_path / "extra.yaml"))
    assert code == 2 and "not valid YAML" in capsys.readouterr().err
