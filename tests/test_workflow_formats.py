"""Workflow formats: UI → API conversion, file/PNG/dict loading, format errors and --set overrides."""
from __future__ import annotations

import copy
import json

import pytest
from PIL import Image, PngImagePlugin

from ipadapter_nodes.runtime.ui_convert import ui_to_api, widget_layout
from ipadapter_nodes.runtime.workflow import WorkflowFormatError, apply_overrides, load_workflow


# --------------------------------------------------------------------------------------------- fake nodes
def node_class(name, required, optional=None, returns=(), output=False):
    """A V1 node class with the given INPUT_TYPES."""
    declared = {"required": required, "optional": optional or {}, "hidden": {"unique_id": "UNIQUE_ID"}}
    return type(name, (), {"INPUT_TYPES": classmethod(lambda cls: declared), "RETURN_TYPES": tuple(returns),
                           "FUNCTION": "run", "OUTPUT_NODE": output})


CLASSES = {c.__name__: c for c in (
    node_class("CheckpointLoaderSimple", {"ckpt_name": (["tiny-sd15", "tiny-sdxl"],)}, returns=("MODEL", "CLIP", "VAE")),
    node_class("CLIPTextEncode", {"text": ("STRING", {"multiline": True}), "clip": ("CLIP",)}, returns=("CONDITIONING",)),
    node_class("EmptyLatentImage", {"width": ("INT", {"default": 512, "min": 16}), "height": ("INT", {"default": 512}),
                                    "batch_size": ("INT", {"default": 1, "min": 1})}, returns=("LATENT",)),
    node_class("KSampler", {"model": ("MODEL",), "seed": ("INT", {"default": 0}), "steps": ("INT", {"default": 20}),
                            "cfg": ("FLOAT", {"default": 8.0}), "sampler_name": (["euler", "ddim"],),
                            "scheduler": (["normal", "karras"],), "positive": ("CONDITIONING",),
                            "negative": ("CONDITIONING",), "latent_image": ("LATENT",),
                            "denoise": ("FLOAT", {"default": 1.0})}, returns=("LATENT",)),
    node_class("VAEDecode", {"samples": ("LATENT",), "vae": ("VAE",)}, returns=("IMAGE",)),
    node_class("SaveImage", {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})},
               output=True),
    node_class("PreviewImage", {"images": ("IMAGE",)}, output=True),
    node_class("LoadImage", {"image": (["face.png", "b.png"], {"image_upload": True})}, returns=("IMAGE", "MASK")),
    node_class("ModelPass", {"model": ("MODEL",), "weight": ("FLOAT", {"default": 1.0})}, returns=("MODEL",)),
    node_class("ClipThenModel", {"clip": ("CLIP",), "model": ("MODEL",)}, returns=("MODEL",)),
    node_class("ComboControl", {"choice": ("COMBO", {"options": ["a", "b"], "control_after_generate": True}),
                                "value": ("INT", {"default": 3, "control_after_generate": True}),
                                "flag": ("BOOLEAN", {"default": True})}, returns=("INT",)),
    node_class("ForceNode", {"amount": ("INT", {"forceInput": True}), "scale": ("FLOAT", {"default": 1.0})},
               optional={"tags": ("STRING", {"default": ""})}, returns=("FLOAT",)),
)}


def ui_node(node_id, kind, widgets=None, inputs=(), outputs=(), mode=0, title=None):
    node = {"id": node_id, "type": kind, "pos": [0, 0], "size": [200, 100], "flags": {}, "order": node_id,
            "mode": mode, "inputs": [dict(i) for i in inputs], "outputs": [dict(o) for o in outputs],
            "properties": {"Node name for S&R": kind}}
    if widgets is not None:
        node["widgets_values"] = widgets
    if title:
        node["title"] = title
    return node


def inp(name, kind, link, widget=False):
    entry = {"name": name, "type": kind, "link": link}
    if widget:
        entry["widget"] = {"name": name}
    return entry


def out(name, kind, links=()):
    return {"name": name, "type": kind, "links": list(links)}


def hand_written_ui() -> dict:
    """A UI-format (0.4) txt2img workflow exercising every conversion rule, written to the documented schema."""
    nodes = [
        ui_node(4, "CheckpointLoaderSimple", ["tiny-sd15"],
                outputs=[out("MODEL", "MODEL", [1]), out("CLIP", "CLIP", [2, 3]), out("VAE", "VAE", [4])]),
        # Two bypassed nodes in a row; the second picks its MODEL input, not its first (CLIP) input.
        ui_node(18, "ModelPass", [0.5], inputs=[inp("model", "MODEL", 1)], outputs=[out("MODEL", "MODEL", [5])],
                mode=4),
        ui_node(10, "ClipThenModel", None, inputs=[inp("clip", "CLIP", 3), inp("model", "MODEL", 5)],
                outputs=[out("MODEL", "MODEL", [6])], mode=4),
        # The positive prompt text is a converted widget fed by a PrimitiveNode; CLIP comes through two Reroutes.
        ui_node(30, "Reroute", None, inputs=[inp("", "*", 2)], outputs=[out("", "CLIP", [7])]),
        ui_node(31, "Reroute", None, inputs=[inp("", "*", 7)], outputs=[out("", "CLIP", [8])]),
        ui_node(20, "PrimitiveNode", ["a cat"], outputs=[out("STRING", "STRING", [9])], title="Prompt"),
        ui_node(6, "CLIPTextEncode", ["stale text"], title="Positive",
                inputs=[inp("clip", "CLIP", 8), inp("text", "STRING", 9, widget=True)],
                outputs=[out("CONDITIONING", "CONDITIONING", [10])]),
        ui_node(7, "CLIPTextEncode", ["blurry"], inputs=[inp("clip", "CLIP", None)],
                outputs=[out("CONDITIONING", "CONDITIONING", [11])]),
        # An older save: batch_size was not stored yet.
        ui_node(5, "EmptyLatentImage", [64, 64], outputs=[out("LATENT", "LATENT", [12])]),
        ui_node(21, "PrimitiveNode", [7, "fixed"], outputs=[out("INT", "INT", [13])]),
        ui_node(3, "KSampler", [42, "randomize", 2, 7.5, "ddim", "karras", 1.0],
                inputs=[inp("model", "MODEL", 6), inp("positive", "CONDITIONING", 10),
                        inp("negative", "CONDITIONING", 11), inp("latent_image", "LATENT", 12),
                        inp("seed", "INT", 13, widget=True), inp("steps", "INT", None, widget=True)],
                outputs=[out("LATENT", "LATENT", [14])]),
        ui_node(8, "VAEDecode", None, inputs=[inp("samples", "LATENT", 14), inp("vae", "VAE", 4)],
                outputs=[out("IMAGE", "IMAGE", [15, 16])]),
        ui_node(9, "SaveImage", ["demo"], inputs=[inp("images", "IMAGE", 15)]),
        ui_node(11, "PreviewImage", None, inputs=[inp("images", "IMAGE", 16)], mode=2),
        ui_node(12, "Note", ["remember the milk"]),
        ui_node(13, "LoadImage", ["face.png", "image"], outputs=[out("IMAGE", "IMAGE", [17]), out("MASK", "MASK")]),
        ui_node(14, "ComboControl", ["b", "fixed", "", 5, "increment", False]),
        ui_node(15, "MysteryNode", [1, 2], inputs=[inp("image", "IMAGE", 17)]),
        ui_node(16, "ForceNode", [0.5, "x"]),
        ui_node(17, "ForceNode", [0, 0.25, "old"]),         # an old save that kept a slot for forceInput
        ui_node(19, "ModelPass", [2.0], inputs=[inp("model", "MODEL", 18)]),     # fed by the muted node below
        ui_node(22, "CheckpointLoaderSimple", ["tiny-sdxl"], mode=2, outputs=[out("MODEL", "MODEL", [18])]),
    ]
    links = [
        [1, 4, 0, 18, 0, "MODEL"], [2, 4, 1, 30, 0, "CLIP"], [3, 4, 1, 10, 0, "CLIP"], [4, 4, 2, 8, 1, "VAE"],
        [5, 18, 0, 10, 1, "MODEL"], [6, 10, 0, 3, 0, "MODEL"], [7, 30, 0, 31, 0, "CLIP"], [8, 31, 0, 6, 0, "CLIP"],
        [9, 20, 0, 6, 1, "STRING"], [10, 6, 0, 3, 1, "CONDITIONING"], [11, 7, 0, 3, 2, "CONDITIONING"],
        [12, 5, 0, 3, 3, "LATENT"], [13, 21, 0, 3, 4, "INT"], [14, 3, 0, 8, 0, "LATENT"], [15, 8, 0, 9, 0, "IMAGE"],
        [16, 8, 0, 11, 0, "IMAGE"], [17, 13, 0, 15, 0, "IMAGE"], [18, 22, 0, 19, 0, "MODEL"],
    ]
    return {"id": "0b6c1f", "revision": 0, "last_node_id": 31, "last_link_id": 18, "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 1, "offset": [0, 0]}}, "version": 0.4}


EXPECTED_API = {
    "3": {"class_type": "KSampler", "_meta": {"title": "KSampler"},
          "inputs": {"seed": 7, "steps": 2, "cfg": 7.5, "sampler_name": "ddim", "scheduler": "karras", "denoise": 1.0,
                     "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "_meta": {"title": "CheckpointLoaderSimple"},
          "inputs": {"ckpt_name": "tiny-sd15"}},
    "5": {"class_type": "EmptyLatentImage", "_meta": {"title": "EmptyLatentImage"},
          "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "_meta": {"title": "Positive"},
          "inputs": {"text": "a cat", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "_meta": {"title": "CLIPTextEncode"}, "inputs": {"text": "blurry"}},
    "8": {"class_type": "VAEDecode", "_meta": {"title": "VAEDecode"}, "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "_meta": {"title": "SaveImage"},
          "inputs": {"filename_prefix": "demo", "images": ["8", 0]}},
    "13": {"class_type": "LoadImage", "_meta": {"title": "LoadImage"}, "inputs": {"image": "face.png"}},
    "14": {"class_type": "ComboControl", "_meta": {"title": "ComboControl"},
           "inputs": {"choice": "b", "value": 5, "flag": False}},
    "15": {"class_type": "MysteryNode", "_meta": {"title": "MysteryNode"}, "inputs": {"image": ["13", 0]}},
    "16": {"class_type": "ForceNode", "_meta": {"title": "ForceNode"}, "inputs": {"scale": 0.5, "tags": "x"}},
    "17": {"class_type": "ForceNode", "_meta": {"title": "ForceNode"}, "inputs": {"scale": 0.25, "tags": "old"}},
    "19": {"class_type": "ModelPass", "_meta": {"title": "ModelPass"}, "inputs": {"weight": 2.0}},
}


# --------------------------------------------------------------------------------------------- UI → API
def test_hand_written_ui_workflow_converts_to_the_expected_api_prompt():
    prompt, titles = ui_to_api(hand_written_ui(), CLASSES)
    assert prompt == EXPECTED_API
    assert titles["6"] == (6, "Positive") and titles["3"] == (3, "KSampler")
    assert set(titles) == set(EXPECTED_API)


def test_display_names_give_the_default_titles():
    prompt, titles = ui_to_api(hand_written_ui(), CLASSES, {"KSampler": "KSampler (Advanced-ish)"})
    assert prompt["3"]["_meta"]["title"] == "KSampler (Advanced-ish)" and titles["3"] == (3, "KSampler (Advanced-ish)")


def test_widget_layout_counts_frontend_only_values():
    layout = [(slot.spec.name, slot.extra_values) for slot in widget_layout(CLASSES["KSampler"])]
    assert layout == [("seed", 1), ("steps", 0), ("cfg", 0), ("sampler_name", 0), ("scheduler", 0), ("denoise", 0)]
    assert [(s.spec.name, s.extra_values) for s in widget_layout(CLASSES["ComboControl"])] == \
        [("choice", 2), ("value", 1), ("flag", 0)]
    assert [(s.spec.name, s.extra_values) for s in widget_layout(CLASSES["LoadImage"])] == [("image", 1)]


def test_list_widget_values_are_wrapped_and_missing_combo_values_take_the_first_option():
    ui = {"nodes": [ui_node(1, "KSampler", [[1, 2], "fixed", 3])], "links": []}
    inputs = ui_to_api(ui, CLASSES)[0]["1"]["inputs"]
    assert inputs == {"seed": {"__value__": [1, 2]}, "steps": 3, "cfg": 8.0, "sampler_name": "euler",
                      "scheduler": "normal", "denoise": 1.0}


def test_widgets_saved_by_name_are_read_by_name():
    ui = {"nodes": [ui_node(1, "EmptyLatentImage", {"height": 96, "width": 80})], "links": []}
    assert ui_to_api(ui, CLASSES)[0]["1"]["inputs"] == {"width": 80, "height": 96, "batch_size": 1}


def test_bypassed_node_without_matching_input_drops_the_link():
    ui = {"nodes": [ui_node(1, "CheckpointLoaderSimple", ["tiny-sd15"]),
                    ui_node(2, "ClipThenModel", None, inputs=[inp("clip", "CLIP", 1), inp("model", "MODEL", None)],
                            outputs=[out("MODEL", "MODEL", [2])], mode=4),
                    ui_node(3, "ModelPass", [1.0], inputs=[inp("model", "MODEL", 2)])],
          "links": [[1, 1, 1, 2, 0, "CLIP"], [2, 2, 0, 3, 0, "MODEL"]]}
    assert ui_to_api(ui, CLASSES)[0]["3"]["inputs"] == {"weight": 1.0}


def test_subgraphs_are_refused_with_a_clear_message():
    ui = {"nodes": [ui_node(1, "5d3c-uuid")], "links": [],
          "definitions": {"subgraphs": [{"id": "5d3c-uuid", "nodes": [], "links": []}]}}
    with pytest.raises(WorkflowFormatError, match="node #1 is a subgraph .*not supported yet"):
        ui_to_api(ui, CLASSES)


def test_malformed_links_and_group_nodes_are_format_errors():
    with pytest.raises(WorkflowFormatError, match=r"a link must be \[link_id, from_node.*found \[1, 2\]"):
        ui_to_api({"nodes": [], "links": [[1, 2]]}, CLASSES)
    with pytest.raises(WorkflowFormatError, match="node #3 is a group node"):
        ui_to_api({"nodes": [ui_node(3, "workflow>MyGroup")], "links": []}, CLASSES)


# --------------------------------------------------------------------------------------------- loading
def write(path, content):
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_load_api_json(tmp_path):
    loaded = load_workflow(write(tmp_path / "api.json", EXPECTED_API), CLASSES)
    assert loaded.prompt == EXPECTED_API and loaded.ui is None
    assert loaded.origin == str(tmp_path / "api.json")
    assert loaded.ui_titles["6"] == ("6", "Positive")


def test_load_ui_json_converts_and_keeps_the_ui(tmp_path):
    ui = hand_written_ui()
    loaded = load_workflow(write(tmp_path / "ui.json", ui), CLASSES)
    assert loaded.prompt == EXPECTED_API and loaded.ui == ui
    assert loaded.extra_pnginfo == {"workflow": ui}
    assert loaded.ui_titles["6"] == (6, "Positive")


def test_load_prompt_body_wrapper_with_its_workflow():
    ui = hand_written_ui()
    body = {"client_id": "x", "prompt": EXPECTED_API, "extra_data": {"extra_pnginfo": {"workflow": ui}}}
    loaded = load_workflow(body)
    assert loaded.prompt == EXPECTED_API and loaded.ui == ui and loaded.origin == "<dict>"


def test_loading_a_dict_copies_it():
    source = copy.deepcopy(EXPECTED_API)
    loaded = load_workflow(source)
    loaded.prompt["3"]["inputs"]["steps"] = 99
    assert source == EXPECTED_API


def save_png(path, chunks):
    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path, pnginfo=info)
    return path


def test_png_prefers_the_prompt_chunk_and_keeps_the_workflow(tmp_path):
    prompt = copy.deepcopy(EXPECTED_API)
    prompt["3"]["inputs"]["steps"] = 11                  # differs from what converting the UI would give
    loaded = load_workflow(save_png(tmp_path / "out.png", {"prompt": prompt, "workflow": hand_written_ui()}),
                           CLASSES)
    assert loaded.prompt == prompt and loaded.ui == hand_written_ui()
    assert loaded.ui_titles["6"] == (6, "Positive")


def test_png_with_only_a_workflow_chunk_is_converted(tmp_path):
    loaded = load_workflow(save_png(tmp_path / "ui.png", {"workflow": hand_written_ui()}), CLASSES)
    assert loaded.prompt == EXPECTED_API


def test_png_with_only_a_prompt_chunk(tmp_path):
    loaded = load_workflow(save_png(tmp_path / "p.png", {"prompt": EXPECTED_API}))
    assert loaded.prompt == EXPECTED_API and loaded.ui is None


@pytest.mark.parametrize("content, fragment", [
    ("", "the file is empty"),
    ("hello there", "not valid JSON: Expecting value at line 1, column 1"),
    ('{\n  "3": {"class_type": "KSampler",\n  "inputs": {', "line 3, column 14 (the file looks truncated)"),
    ("[1, 2, 3]", "found a JSON list of 3 item(s)"),
    ('{"nodes_": [], "foo": 1}', "found a JSON object with keys ['nodes_', 'foo']"),
    ("{}", "found an empty JSON object"),
    ('"just text"', "found a JSON str"),
])
def test_bad_json_files_raise_a_format_error_naming_the_file(tmp_path, content, fragment):
    path = write(tmp_path / "bad.json", content)
    with pytest.raises(WorkflowFormatError) as caught:
        load_workflow(path, CLASSES)
    message = str(caught.value)
    assert message.startswith(str(path)) and fragment in message


def test_png_without_workflow_chunks(tmp_path):
    path = save_png(tmp_path / "plain.png", {"Software": "paint"})
    with pytest.raises(WorkflowFormatError, match=r"no workflow: expected a 'prompt' or 'workflow' text chunk.*"
                                                  r"found text chunks: Software"):
        load_workflow(path)


def test_png_with_a_broken_prompt_chunk(tmp_path):
    path = save_png(tmp_path / "broken.png", {"prompt": '{"3": {'})
    with pytest.raises(WorkflowFormatError, match=r"\('prompt' chunk\): not valid JSON.*line 1, column 8"):
        load_workflow(path)


def test_missing_file(tmp_path):
    with pytest.raises(WorkflowFormatError, match="no such file"):
        load_workflow(tmp_path / "nope.json")


# --------------------------------------------------------------------------------------------- overrides
def test_overrides_parse_json_values_and_fall_back_to_strings():
    result = apply_overrides(EXPECTED_API, ["3.steps=30", "3.cfg=4.5", "9.filename_prefix=out/cat",
                                            "6.text=a dog", "3.model=[\"4\", 0]", "14.flag=true", "5.width = 96"])
    assert result["3"]["inputs"]["steps"] == 30 and result["3"]["inputs"]["cfg"] == 4.5
    assert result["9"]["inputs"]["filename_prefix"] == "out/cat" and result["6"]["inputs"]["text"] == "a dog"
    assert result["3"]["inputs"]["model"] == ["4", 0] and result["14"]["inputs"]["flag"] is True
    assert result["5"]["inputs"]["width"] == 96
    assert EXPECTED_API["3"]["inputs"]["steps"] == 2                     # the input is not mutated


@pytest.mark.parametrize("item, fragment", [
    ("42.steps=3", "the workflow has no node '42'"),
    ("3steps=3", "expected NODE_ID.INPUT=VALUE"),
    ("3.steps", "expected NODE_ID.INPUT=VALUE"),
    (".steps=3", "expected NODE_ID.INPUT=VALUE"),
])
def test_bad_overrides_are_named(item, fragment):
    with pytest.raises(WorkflowFormatError) as caught:
        apply_overrides(EXPECTED_API, [item])
    assert repr(item) in str(caught.value) and fragment in str(caught.value)


def test_the_upload_button_value_follows_the_last_required_widget():
    """ComfyUI saves LoadImageMask as ["mask.png", "alpha", "image"]: the button comes after every widget."""
    from ipadapter_nodes.runtime.registry import node_classes
    from ipadapter_nodes.runtime.ui_convert import widget_inputs

    classes = node_classes()
    assert widget_inputs(classes["LoadImageMask"], ["mask.png", "alpha", "image"]) == {
        "image": "mask.png", "channel": "alpha"}
    assert widget_inputs(classes["LoadImage"], ["ref.png", "image"]) == {"image": "ref.png"}
