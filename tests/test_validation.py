"""Whole-graph validation: every ComfyUI error type, on the right node and input, all reported at once."""
from __future__ import annotations

import copy

import pytest

from ipadapter_nodes.runtime.validate import format_errors, types_match, validate_prompt

SAMPLERS = [f"sampler_{i}" for i in range(41)] + ["euler"]        # 42 names, like ComfyUI's list


# --------------------------------------------------------------------------------------------- fake nodes
class Loader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": (["a.safetensors", "b.safetensors"], {"tooltip": "file"})}}
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"


class EmptyLatent:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"width": ("INT", {"default": 512, "min": 16, "max": 4096})}}
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "make"


class Sampler:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**64 - 1}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 100}),
                "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0}),
                "sampler_name": (SAMPLERS,),
                "latent": ("LATENT",),
            },
            "optional": {"denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0}),
                         "tiled": ("BOOLEAN", {"default": False})},
            "hidden": {"unique_id": "UNIQUE_ID"},
        }
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"


class Decode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "vae": ("VAE",)}}
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"


class Save:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})},
                "hidden": {"prompt": "PROMPT"}}
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True


class AnyPass:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("*",)}}
    RETURN_TYPES = ("*",)
    FUNCTION = "run"


class UnionSink:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"thing": ("IMAGE,MASK",)}}
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"


class MaskMaker:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}
    RETURN_TYPES = ("MASK",)
    FUNCTION = "run"


class PngLoader:
    """Custom validation of `name` (so its combo check is skipped); `strength` keeps the built-in checks."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": ("COMBO", {"options": ["x.png"]}),
                             "strength": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0})}}
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "load"

    @classmethod
    def VALIDATE_INPUTS(cls, name):
        if name == "refuse":
            return False
        return True if name.endswith(".png") else f"'{name}' is not a PNG file"


class KwargsNode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"count": ("INT", {"default": 1, "min": 1, "max": 4}), "mode": (["a", "b"],)}}
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    @classmethod
    def VALIDATE_INPUTS(cls, **kwargs):
        return True


class TypeAware:
    seen: list = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"source": ("IMAGE",)}}
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    @classmethod
    def VALIDATE_INPUTS(cls, source, input_types):
        cls.seen.append((source, input_types))
        return True


CLASSES = {c.__name__: c for c in (Loader, EmptyLatent, Sampler, Decode, Save, AnyPass, UnionSink, MaskMaker,
                                   PngLoader, KwargsNode, TypeAware)}


def base_prompt() -> dict:
    """A valid five-node txt2img graph; tests break one thing at a time."""
    return {
        "1": {"class_type": "Loader", "inputs": {"ckpt_name": "a.safetensors"}},
        "2": {"class_type": "EmptyLatent", "inputs": {"width": 64}},
        "3": {"class_type": "Sampler", "inputs": {"model": ["1", 0], "seed": 5, "steps": 2, "cfg": 7.0,
                                                  "sampler_name": "euler", "latent": ["2", 0]}},
        "4": {"class_type": "Decode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}},
        "5": {"class_type": "Save", "inputs": {"images": ["4", 0], "filename_prefix": "x"}},
    }


def only_error(result, node_id: str) -> dict:
    errors = result.node_errors[node_id]["errors"]
    assert len(errors) == 1, errors
    return errors[0]


# --------------------------------------------------------------------------------------------- valid graphs
def test_valid_prompt_passes_with_its_output():
    result = validate_prompt(base_prompt(), CLASSES)
    assert result.ok and result.error is None and result.node_errors == {}
    assert result.outputs == ["5"]
    assert result.coerced == base_prompt()


def test_widget_values_are_coerced_like_comfyui_without_touching_the_input():
    prompt = base_prompt()
    prompt["3"]["inputs"].update(steps="3", cfg=7, seed=5.0, tiled="true")
    prompt["5"]["inputs"]["filename_prefix"] = 12
    prompt["4"]["inputs"]["vae"] = [1, 2]                       # integer node id in a link
    before = copy.deepcopy(prompt)
    result = validate_prompt(prompt, CLASSES)
    assert result.ok
    sampler = result.coerced["3"]["inputs"]
    assert (sampler["steps"], sampler["cfg"], sampler["seed"], sampler["tiled"]) == (3, 7.0, 5, True)
    assert type(sampler["cfg"]) is float and type(sampler["steps"]) is int
    assert result.coerced["5"]["inputs"]["filename_prefix"] == "12"
    assert result.coerced["4"]["inputs"]["vae"] == ["1", 2]
    assert prompt == before


def test_wrapped_values_are_unwrapped_and_list_constants_stay_wrapped():
    prompt = base_prompt()
    prompt["5"]["inputs"]["filename_prefix"] = {"__value__": "wrapped"}
    prompt["3"]["inputs"]["denoise"] = {"__value__": 0.5}
    prompt["3"]["inputs"]["cfg"] = {"__value__": [1.0, 2.0]}
    result = validate_prompt(prompt, CLASSES)
    assert result.ok
    assert result.coerced["5"]["inputs"]["filename_prefix"] == "wrapped"
    assert result.coerced["3"]["inputs"]["denoise"] == 0.5
    assert result.coerced["3"]["inputs"]["cfg"] == {"__value__": [1.0, 2.0]}


def test_wildcard_and_union_types_match():
    assert types_match("MODEL", "*") and types_match("*", "LATENT")
    assert types_match("MASK", "IMAGE,MASK") and types_match("IMAGE, LATENT", "LATENT")
    assert not types_match("CLIP", "MODEL") and not types_match("MASK,LATENT", "IMAGE")
    prompt = base_prompt()
    prompt["6"] = {"class_type": "AnyPass", "inputs": {"value": ["1", 0]}}
    prompt["3"]["inputs"]["model"] = ["6", 0]
    prompt["7"] = {"class_type": "MaskMaker", "inputs": {}}
    prompt["8"] = {"class_type": "UnionSink", "inputs": {"thing": ["7", 0]}}
    prompt["9"] = {"class_type": "Save", "inputs": {"images": ["8", 0], "filename_prefix": "u"}}
    result = validate_prompt(prompt, CLASSES)
    assert result.ok and result.node_errors == {} and result.outputs == ["5", "9"]


def test_only_nodes_an_output_depends_on_are_validated():
    prompt = base_prompt()
    prompt["6"] = {"class_type": "EmptyLatent", "inputs": {"width": 1}}      # below min, but unused
    result = validate_prompt(prompt, CLASSES)
    assert result.ok and result.node_errors == {}


# --------------------------------------------------------------------------------------------- broken graphs
def test_unknown_class_is_a_prompt_error_even_when_unconnected_and_other_errors_still_show():
    prompt = base_prompt()
    prompt["6"] = {"class_type": "Nope", "inputs": {}}
    prompt["3"]["inputs"]["steps"] = 0
    result = validate_prompt(prompt, CLASSES)
    assert not result.ok
    assert result.error["type"] == "invalid_prompt"
    assert result.error["message"] == "Cannot execute because node Nope does not exist."
    assert "'#6'" in result.error["details"]
    assert only_error(result, "6")["type"] == "invalid_prompt"
    assert result.node_errors["6"]["class_type"] == "Nope"
    assert only_error(result, "3")["type"] == "value_smaller_than_min"


def test_unknown_upstream_class_fails_the_output_that_uses_it():
    prompt = base_prompt()
    prompt["1"]["class_type"] = "GoneLoader"
    result = validate_prompt(prompt, CLASSES)
    assert not result.ok and result.outputs == []
    assert result.node_errors["1"]["dependent_outputs"] == ["5"]
    assert "3" not in result.node_errors                 # its link to the unknown node is not a second error


def test_missing_class_type():
    prompt = base_prompt()
    del prompt["2"]["class_type"]
    result = validate_prompt(prompt, CLASSES)
    error = only_error(result, "2")
    assert error["type"] == "invalid_prompt" and "missing the class_type" in error["message"]
    assert result.error["type"] == "invalid_prompt"


def test_required_input_missing():
    prompt = base_prompt()
    del prompt["3"]["inputs"]["steps"]
    result = validate_prompt(prompt, CLASSES)
    error = only_error(result, "3")
    assert error["type"] == "required_input_missing" and error["extra_info"]["input_name"] == "steps"
    assert result.node_errors["3"]["dependent_outputs"] == ["5"]
    assert result.node_errors["3"]["class_type"] == "Sampler"
    assert result.error["type"] == "prompt_outputs_failed_validation" and result.outputs == []


@pytest.mark.parametrize("link, fragment", [
    (["99", 0], "node '99' does not exist"),
    (["1"], "must be a length-2 list"),
    (["1", "zero"], "must be a length-2 list"),
    (["1", 3], "slot out of range"),
])
def test_bad_linked_input(link, fragment):
    prompt = base_prompt()
    prompt["4"]["inputs"]["vae"] = link
    result = validate_prompt(prompt, CLASSES)
    error = only_error(result, "4")
    assert error["type"] == "bad_linked_input" and fragment in error["message"]
    assert error["extra_info"]["input_name"] == "vae" and error["extra_info"]["received_value"] == link


def test_slot_out_of_range_names_the_number_of_outputs():
    prompt = base_prompt()
    prompt["4"]["inputs"]["vae"] = ["1", 3]
    details = only_error(validate_prompt(prompt, CLASSES), "4")["details"]
    assert details == "vae: node 1 (Loader) has 3 output(s) (slots 0..2), the link asks for slot 3"


def test_return_type_mismatch():
    prompt = base_prompt()
    prompt["3"]["inputs"]["model"] = ["1", 1]            # CLIP into MODEL
    error = only_error(validate_prompt(prompt, CLASSES), "3")
    assert error["type"] == "return_type_mismatch"
    assert error["details"] == "model, received_type(CLIP) mismatch input_type(MODEL)"
    assert error["extra_info"]["received_type"] == "CLIP"


@pytest.mark.parametrize("name, value", [("steps", "many"), ("cfg", "high"), ("seed", None),
                                         ("tiled", "maybe"), ("tiled", 2)])
def test_invalid_input_type(name, value):
    prompt = base_prompt()
    prompt["3"]["inputs"][name] = value
    error = only_error(validate_prompt(prompt, CLASSES), "3")
    assert error["type"] == "invalid_input_type" and error["extra_info"]["input_name"] == name
    assert error["extra_info"]["received_value"] == value


def test_value_below_min_and_above_max():
    prompt = base_prompt()
    prompt["3"]["inputs"]["steps"] = 0
    prompt["3"]["inputs"]["denoise"] = 1.5
    result = validate_prompt(prompt, CLASSES)
    low, high = result.node_errors["3"]["errors"]
    assert (low["type"], low["message"], low["details"]) == \
        ("value_smaller_than_min", "Value 0 smaller than min of 1", "steps")
    assert (high["type"], high["message"], high["details"]) == \
        ("value_bigger_than_max", "Value 1.5 bigger than max of 1.0", "denoise")


def test_value_not_in_short_and_long_lists():
    prompt = base_prompt()
    prompt["1"]["inputs"]["ckpt_name"] = "z.safetensors"
    prompt["3"]["inputs"]["sampler_name"] = "nope"
    result = validate_prompt(prompt, CLASSES)
    short = only_error(result, "1")
    assert short["type"] == "value_not_in_list"
    assert short["details"] == "ckpt_name: 'z.safetensors' not in ['a.safetensors', 'b.safetensors']"
    assert short["extra_info"]["input_config"] == (["a.safetensors", "b.safetensors"], {"tooltip": "file"})
    long = only_error(result, "3")
    assert long["details"] == "sampler_name: 'nope' not in (list of length 42)"
    assert long["extra_info"]["input_config"] is None


def graph_with(node: dict) -> dict:
    return {"1": node, "2": {"class_type": "Save", "inputs": {"images": ["1", 0], "filename_prefix": "p"}}}


def test_custom_validation_replaces_the_combo_check_of_the_inputs_it_names():
    accepted = validate_prompt(graph_with({"class_type": "PngLoader",
                                           "inputs": {"name": "not_listed.png", "strength": 0.5}}), CLASSES)
    assert accepted.ok
    refused = validate_prompt(graph_with({"class_type": "PngLoader",
                                          "inputs": {"name": "x.txt", "strength": 0.5}}), CLASSES)
    error = only_error(refused, "1")
    assert error["type"] == "custom_validation_failed"
    assert error["details"] == "PngLoader - 'x.txt' is not a PNG file"
    assert error["extra_info"]["input_name"] == "name"
    false = validate_prompt(graph_with({"class_type": "PngLoader", "inputs": {"name": "refuse", "strength": 0.5}}),
                            CLASSES)
    assert only_error(false, "1")["details"] == "PngLoader"


def test_inputs_not_named_by_custom_validation_keep_their_min_max_check():
    result = validate_prompt(graph_with({"class_type": "PngLoader", "inputs": {"name": "x.png", "strength": 2.0}}),
                             CLASSES)
    assert only_error(result, "1")["type"] == "value_bigger_than_max"


def test_custom_validation_with_kwargs_skips_every_builtin_check_but_still_coerces():
    result = validate_prompt(graph_with({"class_type": "KwargsNode", "inputs": {"count": "9", "mode": "zzz"}}),
                             CLASSES)
    assert result.ok
    assert result.coerced["1"]["inputs"] == {"count": 9, "mode": "zzz"}


def test_input_types_parameter_receives_linked_types_and_disables_the_type_check():
    TypeAware.seen.clear()
    prompt = base_prompt()
    prompt["6"] = {"class_type": "TypeAware", "inputs": {"source": ["2", 0]}}       # LATENT into IMAGE
    prompt["5"]["inputs"]["images"] = ["6", 0]
    result = validate_prompt(prompt, CLASSES)
    assert result.ok
    assert TypeAware.seen == [(None, {"source": "LATENT"})]


def test_dependency_cycle_is_reported_on_every_node_of_the_cycle():
    prompt = base_prompt()
    prompt["6"] = {"class_type": "AnyPass", "inputs": {"value": ["7", 0]}}
    prompt["7"] = {"class_type": "AnyPass", "inputs": {"value": ["6", 0]}}
    prompt["4"]["inputs"]["samples"] = ["6", 0]
    result = validate_prompt(prompt, CLASSES)
    assert not result.ok
    for node_id in ("6", "7"):
        error = only_error(result, node_id)
        assert error["type"] == "dependency_cycle" and error["extra_info"]["cycle"] == ["6", "7"]
        assert result.node_errors[node_id]["dependent_outputs"] == ["5"]
    assert set(result.node_errors) == {"6", "7"}


def test_a_longer_cycle_names_all_its_nodes_but_not_the_nodes_that_merely_use_it():
    prompt = base_prompt()
    prompt["6"] = {"class_type": "AnyPass", "inputs": {"value": ["8", 0]}}
    prompt["7"] = {"class_type": "AnyPass", "inputs": {"value": ["6", 0]}}
    prompt["8"] = {"class_type": "AnyPass", "inputs": {"value": ["7", 0]}}
    prompt["4"]["inputs"]["samples"] = ["7", 0]
    result = validate_prompt(prompt, CLASSES)
    assert set(result.node_errors) == {"6", "7", "8"}
    assert only_error(result, "8")["extra_info"]["cycle"] == ["6", "7", "8"]


def test_self_loop_is_a_cycle():
    prompt = base_prompt()
    prompt["6"] = {"class_type": "AnyPass", "inputs": {"value": ["6", 0]}}
    prompt["4"]["inputs"]["samples"] = ["6", 0]
    details = only_error(validate_prompt(prompt, CLASSES), "6")["details"]
    assert details == "node 6 depends on its own output through links (cycle among nodes 6)"


def test_prompt_without_output_node():
    prompt = base_prompt()
    del prompt["5"]
    result = validate_prompt(prompt, CLASSES)
    assert not result.ok and result.error["type"] == "prompt_no_outputs" and result.outputs == []


def test_a_broken_output_does_not_block_a_good_one():
    prompt = base_prompt()
    prompt["6"] = {"class_type": "Decode", "inputs": {"samples": ["3", 0]}}              # vae missing
    prompt["7"] = {"class_type": "Save", "inputs": {"images": ["6", 0], "filename_prefix": "y"}}
    result = validate_prompt(prompt, CLASSES)
    assert result.ok and result.error is None and result.outputs == ["5"]
    assert result.node_errors["6"]["dependent_outputs"] == ["7"]


def test_every_error_of_a_workflow_is_reported_at_once():
    prompt = base_prompt()
    prompt["1"]["inputs"]["ckpt_name"] = "z.safetensors"
    prompt["2"]["inputs"]["width"] = 8192
    prompt["3"]["inputs"].update(steps="x", cfg=-1.0)
    del prompt["4"]["inputs"]["vae"]
    prompt["5"]["inputs"]["images"] = ["3", 0]                                           # LATENT into IMAGE
    result = validate_prompt(prompt, CLASSES)
    kinds = {nid: [e["type"] for e in entry["errors"]] for nid, entry in result.node_errors.items()}
    assert kinds == {"1": ["value_not_in_list"], "2": ["value_bigger_than_max"],
                     "3": ["invalid_input_type", "value_smaller_than_min"], "5": ["return_type_mismatch"]}
    assert result.error["type"] == "prompt_outputs_failed_validation"
    assert result.error["details"] == "Return type mismatch between linked nodes: images, received_type(LATENT) " \
                                      "mismatch input_type(IMAGE)"


def test_format_errors_names_node_ui_title_class_and_input_on_one_line_each():
    prompt = base_prompt()
    prompt["3"]["inputs"]["steps"] = 0
    prompt["1"]["inputs"]["ckpt_name"] = "z.safetensors"
    result = validate_prompt(prompt, CLASSES, ui_titles={"3": (3, "My sampler")})
    text = format_errors(result)
    lines = text.splitlines()
    assert lines[0] == "Workflow failed validation: Prompt outputs failed validation"
    assert lines[1] == ("  node 1 Loader, input 'ckpt_name': Value not in list [value_not_in_list] "
                        "ckpt_name: 'z.safetensors' not in ['a.safetensors', 'b.safetensors']")
    assert lines[2] == ("  node 3 (UI node #3 'My sampler') Sampler, input 'steps': "
                        "Value 0 smaller than min of 1 [value_smaller_than_min] steps")
    assert len(lines) == 3 and "Traceback" not in text
    assert format_errors(validate_prompt(base_prompt(), CLASSES)) == ""


class Raises:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"path": ("STRING", {"default": ""})}}
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    @classmethod
    def VALIDATE_INPUTS(cls, path):
        raise OSError(f"cannot stat {path}")


class BrokenDeclaration:
    @classmethod
    def INPUT_TYPES(cls):
        raise RuntimeError("models folder missing")
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"


def test_exceptions_in_node_declarations_become_errors_on_that_node():
    classes = dict(CLASSES, Raises=Raises, BrokenDeclaration=BrokenDeclaration)
    raised = validate_prompt(graph_with({"class_type": "Raises", "inputs": {"path": "a.png"}}), classes)
    error = only_error(raised, "1")
    assert error["type"] == "exception_during_validation"
    assert error["details"] == "Raises.VALIDATE_INPUTS raised OSError: cannot stat a.png"
    broken = validate_prompt(graph_with({"class_type": "BrokenDeclaration", "inputs": {}}), classes)
    assert only_error(broken, "1")["details"] == "INPUT_TYPES() raised RuntimeError: models folder missing"


def test_a_prompt_that_is_not_an_object():
    result = validate_prompt(["1", "2"], CLASSES)
    assert not result.ok and result.error["type"] == "invalid_prompt" and "found a list" in result.error["details"]
