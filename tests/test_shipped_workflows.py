"""Every shipped workflow (workflows/*.json) opens as a ComfyUI UI-format file, validates, converts and runs headless
on the tiny models through ``ipadapter run --model-map tiny``; and the tiny model map itself, with numbers.

The runs use the CLI entry point (``runtime.cli.main``) with the session's tiny models folder as ``--models-dir``
and an empty ``--input-dir``, so every input file comes from the generated stand-ins.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ipadapter_nodes.core import embeds_io
from ipadapter_nodes.nodes import NODE_CLASS_MAPPINGS as PACK_NODES
from ipadapter_nodes.runtime import cli, model_map, tiny_assets
from ipadapter_nodes.runtime.registry import display_names, node_classes
from ipadapter_nodes.runtime.ui_convert import widget_layout
from ipadapter_nodes.runtime.workflow import load_workflow

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
IDS = [path.stem for path in WORKFLOWS]
# Headless-only nodes: not in ComfyUI's core, so a workflow using one must say so in extra.info.
NOT_CORE = {"AnimateDiffLoader", "SaveAnimatedGIF"}
SAVERS = {"SaveImage": ".png", "SaveAnimatedWEBP": ".webp", "SaveAnimatedPNG": ".png", "SaveAnimatedGIF": ".gif"}
# The seed's examples that must each have a shipped workflow.
EXAMPLES = ("text_to_image", "image_to_image", "inpainting", "video_animatediff", "plus", "faceid", "embeds_save",
            "embeds_load", "lcm_lora", "controlnet", "instantstyle_style_only", "instantstyle_style_layout")


@pytest.fixture(scope="module")
def tiny_set(tiny_models_dir) -> Path:
    """A copy (hard links) of the session's tiny models folder with every ``--model-map tiny`` stand-in added.

    The stand-ins go into their own folder so that other tests, which list the tiny folders exactly (or rely on
    a preset finding no separate LoRA file), never see them.
    """
    mapped = tiny_models_dir.parent / (tiny_models_dir.name + "-mapped")
    if not mapped.exists():
        staging = mapped.with_name(mapped.name + ".staging")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(tiny_models_dir, staging, copy_function=os.link)
        os.replace(staging, mapped)
    return model_map.prepare_models(mapped)


def _ui(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _api(path: Path) -> dict:
    return load_workflow(path, node_classes(), display_names()).prompt


# ------------------------------------------------------------------------------------------------ the files
def test_every_example_of_the_seed_has_a_workflow():
    assert set(EXAMPLES) <= set(IDS)


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_workflow_is_in_the_ui_format_the_frontend_saves(path):
    ui = _ui(path)
    assert ui["version"] == 0.4 and isinstance(ui["links"], list) and isinstance(ui["extra"], dict)
    nodes = {node["id"]: node for node in ui["nodes"]}
    assert ui["last_node_id"] >= max(nodes) and ui["last_link_id"] >= max(link[0] for link in ui["links"])
    for link_id, source, slot, target, target_slot, kind in ui["links"]:
        assert link_id in nodes[source]["outputs"][slot]["links"]
        entry = nodes[target]["inputs"][target_slot]
        assert entry["link"] == link_id and entry["type"] == kind == nodes[source]["outputs"][slot]["type"]
    classes = node_classes()
    for node in ui["nodes"]:
        for key in ("pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties", "widgets_values"):
            assert key in node, f"node {node['id']} ({node['type']}) lacks '{key}'"
        layout = widget_layout(classes[node["type"]])
        assert len(node["widgets_values"]) == sum(1 + slot.extra_values for slot in layout), node["type"]
    assert sorted(node["order"] for node in ui["nodes"]) == list(range(len(ui["nodes"])))


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_workflow_uses_only_comfyui_core_and_pack_nodes(path):
    ui = _ui(path)
    core = set(node_classes()) - set(PACK_NODES) - NOT_CORE
    info = str(ui["extra"].get("info", ""))
    for node in ui["nodes"]:
        kind = node["type"]
        assert kind in core or kind in PACK_NODES or kind in NOT_CORE, kind
        if kind in NOT_CORE:
            assert kind in info and "not a ComfyUI core node" in info


@pytest.mark.parametrize("path", [p for p in WORKFLOWS if p.stem != "demo"], ids=[i for i in IDS if i != "demo"])
def test_workflow_names_real_model_files(path):
    """Only the demo names tiny files; every other workflow keeps the real names (--model-map maps them)."""
    for node_id, node in _api(path).items():
        for (kind, input_name), _folder in model_map.MODEL_INPUTS.items():
            value = node["inputs"].get(input_name)
            if node["class_type"] == kind and isinstance(value, str):
                assert not value.startswith("tiny"), f"node {node_id} {kind}.{input_name} = {value}"


# ------------------------------------------------------------------------------------------------ CLI runs
@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_workflow_validates_with_the_tiny_model_map(path, tiny_set, tmp_path, capsys):
    code = cli.main(["validate", str(path), "--model-map", "tiny", "--models-dir", str(tiny_set),
                     "--input-dir", str(tmp_path)])
    assert code == cli.EXIT_OK, capsys.readouterr().err
    assert capsys.readouterr().out.startswith("valid:")


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_workflow_converts_to_the_api_format(path, capsys):
    assert cli.main(["convert", str(path)]) == cli.EXIT_OK
    prompt = json.loads(capsys.readouterr().out)
    real = {str(n["id"]) for n in _ui(path)["nodes"] if n.get("mode", 0) == 0 and n["type"] not in ("Note", "Reroute")}
    assert set(prompt) == real and all("class_type" in node for node in prompt.values())


def _expected_frames(prompt: dict) -> tuple[tuple[int, int], int]:
    """((width, height), frames) of the run's images: the shrunk EmptyLatentImage, else the stand-in image size."""
    latents = {(n["inputs"]["width"], n["inputs"]["height"], n["inputs"]["batch_size"])
               for n in model_map.shrink(prompt).values() if n["class_type"] == "EmptyLatentImage"}
    assert len(latents) <= 1, f"several latent sizes: {latents}"
    if not latents:
        return (tiny_assets.IMAGE_SIZE, tiny_assets.IMAGE_SIZE), 1
    width, height, batch = latents.pop()
    return (width, height), batch


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_workflow_runs_on_the_tiny_models_and_writes_its_files(path, tiny_set, tmp_path, capsys):
    out, empty_input = tmp_path / "output", tmp_path / "input"
    empty_input.mkdir()
    code = cli.main(["run", str(path), "--model-map", "tiny", "--models-dir", str(tiny_set),
                     "--input-dir", str(empty_input), "--output-dir", str(out)])
    captured = capsys.readouterr()
    assert code == cli.EXIT_OK, captured.err
    assert list(empty_input.iterdir()) == []                      # the user's input folder is never written
    printed = {Path(line) for line in captured.out.splitlines() if line.strip()}
    written = {p for p in out.rglob("*") if p.is_file()}
    assert printed == written and written
    prompt = _api(path)
    size, frames = _expected_frames(prompt)
    for node in prompt.values():
        kind, prefix = node["class_type"], node["inputs"].get("filename_prefix")
        if kind in SAVERS:
            files = sorted(out.glob(f"{prefix}_*{SAVERS[kind]}"))
            animated = kind != "SaveImage"
            assert len(files) == (1 if animated else frames), f"{kind} '{prefix}': {files}"
            for file in files:
                with Image.open(file) as image:
                    assert image.size == size and getattr(image, "n_frames", 1) == (frames if animated else 1)
                    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
                assert pixels.std() > 0                                # an image, not a blank canvas
        elif kind == "IPAdapterSaveEmbeds":
            (file,) = out.glob(f"{prefix}_*.safetensors")
            assert embeds_io.load_embeds(file).count == 1


# ------------------------------------------------------------------------------------------------ the map
def test_shrink_scales_latents_to_64px_and_caps_steps():
    prompt = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1536, "batch_size": 16}},
        "2": {"class_type": "KSampler", "inputs": {"steps": 30, "seed": 3}},
        "3": {"class_type": "KSamplerAdvanced", "inputs": {"steps": 30, "start_at_step": 15, "end_at_step": 10000}},
        "4": {"class_type": "KSampler", "inputs": {"steps": 1}},
    }
    small = model_map.shrink(prompt)
    assert small["1"]["inputs"] == {"width": 64, "height": 128, "batch_size": 16}
    assert small["2"]["inputs"] == {"steps": 2, "seed": 3}
    assert small["3"]["inputs"] == {"steps": 2, "start_at_step": 1, "end_at_step": 10000}
    assert small["4"]["inputs"]["steps"] == 1
    assert prompt["1"]["inputs"]["width"] == 1024                     # the input prompt is not changed


def test_rename_maps_real_names_onto_the_tiny_set_and_keeps_tiny_names(tiny_set):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "2": {"class_type": "IPAdapterModelLoader", "inputs": {"ipadapter_file": "ip-adapter-plus-face_sd15.bin"}},
        "3": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "tiny-vit-h"}},
        "4": {"class_type": "LoraLoader", "inputs": {"lora_name": "ip-adapter-faceid-plusv2_sd15_lora.safetensors"}},
        "5": {"class_type": "AnimateDiffLoader", "inputs": {"motion_module": "mm_sd_v15_v2.ckpt", "model": ["1", 0]}},
        "6": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd-v1-5-inpainting.ckpt"}},
    }
    mapped = model_map.rename(prompt, tiny_set)
    assert mapped["1"]["inputs"]["ckpt_name"] == "tiny-sdxl"
    assert mapped["2"]["inputs"]["ipadapter_file"] == "tiny-ip-adapter-plus-face_sd15.safetensors"
    assert mapped["3"]["inputs"]["clip_name"] == "tiny-vit-h"
    assert mapped["4"]["inputs"]["lora_name"] == "tiny-ip-adapter-faceid-plusv2_sd15_lora.safetensors"
    assert mapped["5"]["inputs"] == {"motion_module": "tiny-motion-sd15", "model": ["1", 0]}
    assert mapped["6"]["inputs"]["ckpt_name"] == "tiny-sd15-inpaint"
    for node in mapped.values():                                      # every stand-in exists
        for (kind, name), folder in model_map.MODEL_INPUTS.items():
            if node["class_type"] == kind:
                assert (tiny_set / folder / node["inputs"][name]).exists()


def test_every_adapter_rule_names_a_built_adapter_of_the_matching_variant(tiny_set):
    from ipadapter_nodes.core.adapter import load_adapter
    from ipadapter_nodes.runtime.tiny_adapters import VARIANTS

    for published, variant in tiny_assets.ADAPTER_FILES.items():
        entry = model_map.tiny_entry("ipadapter", published)
        assert entry == tiny_assets.tiny_name(published)               # each published name maps to its own file
        spec = load_adapter(tiny_set / "ipadapter" / entry).spec
        assert (spec.family, spec.kind) == (VARIANTS[variant].family, VARIANTS[variant].kind), published


def test_a_file_without_a_stand_in_is_refused_with_the_node_named(tiny_set):
    prompt = {"7": {"class_type": "CheckpointLoaderSimple",
                    "inputs": {"ckpt_name": "sd_xl_base_1.0_inpainting.safetensors"}}}
    with pytest.raises(model_map.ModelMapError, match=r"node 7 \(CheckpointLoaderSimple\).*sd_xl_base_1.0_inpainting"):
        model_map.rename(prompt, tiny_set)


def test_inputs_come_from_the_user_folder_when_it_has_them_all(tiny_set, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "reference.png")
    plan = model_map.provide_inputs(["reference.png"], tmp_path, tiny_set)
    assert plan.input_dir == tmp_path and plan.notes == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reference.png"]


def test_stand_in_mask_reads_the_same_from_the_red_channel_and_from_alpha(tiny_set, tmp_path):
    from ipadapter_nodes.runtime.standard_nodes.masks import load_mask_file

    path = tiny_assets.ensure_input(tmp_path, "mask_left.png", tiny_set)
    red, alpha = load_mask_file(path, "red"), load_mask_file(path, "alpha")
    assert np.array_equal(red.numpy(), alpha.numpy())
    half = tiny_assets.IMAGE_SIZE // 2
    assert red[..., :half].min() == 1.0 and red[..., half:].max() == 0.0   # "left": the left half


def test_stand_in_face_is_found_by_the_tiny_face_detector(tiny_set, tmp_path):
    from ipadapter_nodes.core import faceid
    from ipadapter_nodes.runtime.standard_nodes.image import load_image_file

    path = tiny_assets.ensure_input(tmp_path, "face.png", tiny_set)
    image, _ = load_image_file(path)
    analyzer = faceid.load_insightface("buffalo_l", root=tiny_set / "insightface", provider="CPU")
    analysis = faceid.analyze_faces(analyzer, image, on_no_face="skip")
    assert list(analysis.found) == [True]
