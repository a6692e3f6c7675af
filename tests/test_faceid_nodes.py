"""The FaceID nodes headless, with real insightface + onnxruntime on the tiny ONNX packs.

API-format workflows on the tiny SD1.5 model (64×64, 2 steps): LoadImage (a synthetic face) →
IPAdapterUnifiedLoaderFaceID, or IPAdapterModelLoader + IPAdapterInsightFaceLoader + CLIPVisionLoader →
IPAdapterFaceID → KSampler → SaveImage, for FaceID, Plus, Plus V2 and Portrait.  Tiny adapters carry the
published file names so the presets find them; the Plus V2 preset also finds a kohya LoRA file in ``loras/``.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import installed_folders
import torch
from PIL import Image

from ipadapter_nodes.core import faceid, faceid_apply, folders
from ipadapter_nodes.core.adapter import load_adapter
from ipadapter_nodes.core.backends.diffusers import DiffusersModel
from ipadapter_nodes.nodes import faceid as faceid_nodes
from ipadapter_nodes.runtime.executor import Executor, NodeExecutionError
from ipadapter_nodes.runtime.tiny_adapters import make_adapter
from tiny_faces import blank_image, face_image

ENCODER_FILE = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
ADAPTERS = {
    "ip-adapter-faceid_sd15.bin": "faceid-sd15",
    "ip-adapter-faceid-plus_sd15.bin": "faceid-plus-sd15",
    "ip-adapter-faceid-plusv2_sd15.bin": "faceid-plusv2-sd15",
    "ip-adapter-faceid-portrait-v11_sd15.bin": "portrait-sd15",
}
LORA_FILE = "ip-adapter-faceid-plusv2_sd15_lora.safetensors"
APPLY_DEFAULTS = {"weight": 1.0, "weight_faceidv2": 1.0, "weight_type": "linear", "combine_embeds": "concat",
                  "start_at": 0.0, "end_at": 1.0, "embeds_scaling": "V only"}


def _save_png(image: torch.Tensor, path: Path) -> None:
    Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8)).save(path)


def _write_kohya_lora(adapter_path: Path, path: Path) -> None:
    """The adapter's own attention LoRA as a kohya file with diffusers module names (as the hub's SD1.5 files)."""
    from safetensors.torch import save_file

    from ipadapter_nodes.core import faceid_lora

    names = faceid_lora.attention_names("sd15")
    lora = load_adapter(adapter_path).lora
    tensors = {}
    for key, down in lora.items():
        if key.endswith("_lora.down.weight"):
            index, projection = key.split(".")[0], key.split(".")[1][: -len("_lora")]
            module = f"{names[int(index)]}.{'to_out.0' if projection == 'to_out' else projection}"
            stem = "lora_unet_" + module.replace(".", "_")
            tensors[f"{stem}.lora_down.weight"] = down.contiguous()
            tensors[f"{stem}.lora_up.weight"] = lora[key.replace(".down.", ".up.")].contiguous()
    save_file(tensors, str(path))


@pytest.fixture(scope="module")
def layout(tiny_models_dir, tiny_faces_dir, tmp_path_factory):
    """Folders: the tiny models and InsightFace packs, the tiny ViT-H under its public name, tiny FaceID
    adapters under the published names, the Plus V2 LoRA file, and face / face-free input images."""
    root = tmp_path_factory.mktemp("faceid-workflows")
    models = root / "models"
    (models / "clip_vision").mkdir(parents=True)
    shutil.copyfile(tiny_models_dir / "clip_vision" / "tiny-vit-h.safetensors", models / "clip_vision" / ENCODER_FILE)
    for seed, (name, variant) in enumerate(ADAPTERS.items()):
        make_adapter(variant, models / "ipadapter" / name, seed=seed + 40)
    (models / "loras").mkdir()
    _write_kohya_lora(models / "ipadapter" / "ip-adapter-faceid-plusv2_sd15.bin", models / "loras" / LORA_FILE)
    (root / "input").mkdir()
    _save_png(face_image(128, seed=1), root / "input" / "face.png")
    _save_png(face_image(128, seed=2), root / "input" / "face2.png")
    _save_png(blank_image(128), root / "input" / "blank.png")
    with installed_folders(root, models, tiny_models_dir):
        yield root


def _prompt(case: str | None, image: str = "face.png", on_no_face: str | None = None) -> dict:
    """API prompt; ``case`` picks the FaceID wiring (None: no adapter).  Node 9 decodes, 10 saves, 7 applies."""
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a portrait", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "LoadImage", "inputs": {"image": image}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 5, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": f"faceid_{case}"}},
    }
    if case is None:
        return prompt
    apply_inputs = {**APPLY_DEFAULTS, "image": ["5", 0]}
    if on_no_face is not None:
        apply_inputs["on_no_face"] = on_no_face
    presets = {"faceid": "FACEID", "plusv2": "FACEID PLUS V2", "portrait": "FACEID PORTRAIT (style transfer)"}
    if case in presets:
        prompt["6"] = {"class_type": "IPAdapterUnifiedLoaderFaceID", "inputs": {
            "model": ["1", 0], "preset": presets[case], "lora_strength": 0.6, "provider": "CPU"}}
        apply_inputs.update(model=["6", 0], ipadapter=["6", 1])
    else:  # the manual wiring, no LoRA: FaceID Plus, or FaceID for the no-face runs
        adapter = "ip-adapter-faceid-plus_sd15.bin" if case == "plus" else "ip-adapter-faceid_sd15.bin"
        prompt["6"] = {"class_type": "IPAdapterModelLoader", "inputs": {"ipadapter_file": adapter}}
        prompt["11"] = {"class_type": "IPAdapterInsightFaceLoader", "inputs": {"provider": "CPU",
                                                                              "model_name": "buffalo_l"}}
        prompt["12"] = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": ENCODER_FILE}}
        apply_inputs.update(model=["1", 0], ipadapter=["6", 0], insightface=["11", 0], clip_vision=["12", 0])
    if case == "portrait":  # several face images: one adapter, their tokens concatenated
        prompt["13"] = {"class_type": "LoadImage", "inputs": {"image": "face2.png"}}
        prompt["14"] = {"class_type": "ImageBatch", "inputs": {"image1": ["5", 0], "image2": ["13", 0]}}
        apply_inputs["image"] = ["14", 0]
    prompt["7"] = {"class_type": "IPAdapterFaceID", "inputs": apply_inputs}
    prompt["8"]["inputs"]["model"] = ["7", 0]
    return prompt


@pytest.fixture(scope="module")
def runs(layout):
    """run name -> ExecutionResult; every workflow runs once per module (CPU budget), on one executor."""
    executor = Executor(progress=False)
    results = {"plain": executor.execute(_prompt(None))}
    for case in ("faceid", "plus", "plusv2", "portrait"):
        results[case] = executor.execute(_prompt(case))
    results["skip"] = executor.execute(_prompt("manual", image="blank.png", on_no_face="skip"))
    return results


def _image(result) -> torch.Tensor:
    return result.node_outputs["9"][0]


@pytest.mark.parametrize("case", ["faceid", "plus", "plusv2", "portrait"])
def test_faceid_workflow_saves_an_image_changed_by_the_face(runs, layout, case):
    saved = runs[case].ui["10"]["images"]
    path = layout / "output" / saved[0].get("subfolder", "") / saved[0]["filename"]
    with Image.open(path) as png:
        assert png.size == (64, 64)
    assert (_image(runs[case]) - _image(runs["plain"])).abs().max().item() > 1e-3


@pytest.mark.parametrize("case, faces", [("faceid", 1), ("plus", 1), ("plusv2", 1), ("portrait", 2)])
def test_face_image_output_holds_the_aligned_224px_crops(runs, case, faces):
    model, crops = runs[case].node_outputs["7"]
    assert crops.shape == (faces, 224, 224, 3)
    application = model.applications[-1]
    assert application.embeds.count == faces and application.embeds.feature == "face"


def test_plus_v2_preset_uses_the_shortcut_and_the_lora_file(runs):
    model = runs["plusv2"].node_outputs["7"][0]
    assert model.applications[-1].faceid_v2_weight == 1.0
    (patch,) = runs["plusv2"].node_outputs["6"][0].patches
    assert LORA_FILE in patch.label
    assert runs["plus"].node_outputs["7"][0].applications[-1].faceid_v2_weight is None


def test_faceid_preset_without_lora_file_uses_the_lora_inside_the_adapter(runs):
    (patch,) = runs["faceid"].node_outputs["6"][0].patches
    assert "ip-adapter-faceid_sd15.bin" in patch.label
    assert all(delta.strength == pytest.approx(0.6) for items in patch.deltas.values() for delta in items)


def test_portrait_preset_adds_no_lora(runs):
    assert runs["portrait"].node_outputs["6"][0].patches == ()


def test_no_face_with_skip_gives_exactly_the_image_without_adapter(runs):
    assert torch.equal(_image(runs["skip"]), _image(runs["plain"]))
    assert runs["skip"].node_outputs["7"][0].applications == ()


def test_no_face_with_error_names_the_image_index(layout):
    with pytest.raises(NodeExecutionError, match=r"IPAdapterFaceID.*no face in image 0"):
        Executor(progress=False).execute(_prompt("manual", image="blank.png"))


def test_missing_insightface_folder_says_where_to_put_which_files(layout, tmp_path, monkeypatch):
    empty = tmp_path / "models"
    empty.mkdir()
    monkeypatch.setattr(folders, "_provider", folders.FolderLayout(models_dirs=[str(empty)]))
    with pytest.raises(faceid.InsightFaceModelNotFoundError) as error:
        faceid_nodes.IPAdapterInsightFaceLoader().load_insightface("CPU", "buffalo_l")
    message = str(error.value)
    assert str(empty / "insightface" / "models" / "buffalo_l") in message
    assert "det_10g.onnx" in message and "w600k_r50.onnx" in message and "Nothing is downloaded" in message


# ---- declarations: the existing pack's inputs, widget order and outputs -----------------------------------

def _widgets(node_class, section):
    return [name for name, spec in node_class.INPUT_TYPES().get(section, {}).items()
            if isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN")]


@pytest.mark.parametrize("key", ["IPAdapterFaceID", "IPAAdapterFaceIDBatch"])
def test_faceid_apply_nodes_keep_the_existing_widget_order_and_append_face_options(key):
    from ipadapter_nodes.nodes import NODE_CLASS_MAPPINGS

    node = NODE_CLASS_MAPPINGS[key]
    assert list(node.INPUT_TYPES()["required"]) == ["model", "ipadapter", "image", "weight", "weight_faceidv2",
                                                    "weight_type", "combine_embeds", "start_at", "end_at",
                                                    "embeds_scaling"]
    assert list(node.INPUT_TYPES()["optional"]) == ["image_negative", "attn_mask", "clip_vision", "insightface",
                                                    "face_index", "on_no_face"]
    assert _widgets(node, "optional") == ["face_index", "on_no_face"]
    assert node.RETURN_TYPES == ("MODEL", "IMAGE") and node.RETURN_NAMES[1] == "face_image"


def test_loader_nodes_keep_the_existing_inputs():
    from ipadapter_nodes.core import presets

    unified = faceid_nodes.IPAdapterUnifiedLoaderFaceID.INPUT_TYPES()
    assert _widgets(faceid_nodes.IPAdapterUnifiedLoaderFaceID, "required") == ["preset", "lora_strength", "provider"]
    assert unified["required"]["lora_strength"][1]["default"] == 0.6
    assert unified["required"]["preset"][0] == presets.presets_for("IPAdapterUnifiedLoaderFaceID")
    assert len(unified["required"]["preset"][0]) == 5
    insight = faceid_nodes.IPAdapterInsightFaceLoader.INPUT_TYPES()["required"]
    assert list(insight) == ["provider", "model_name"] and insight["model_name"][0] == ["buffalo_l", "antelopev2"]


def test_an_old_ui_workflow_without_face_options_loads_with_the_old_behaviour():
    from ipadapter_nodes.nodes import NODE_CLASS_MAPPINGS
    from ipadapter_nodes.runtime.ui_convert import ui_to_api

    ui = {"nodes": [{"id": 7, "type": "IPAdapterFaceID", "inputs": [], "outputs": [],
                     "widgets_values": [0.8, 2.0, "linear", "concat", 0.0, 1.0, "V only"]}], "links": []}
    api, _ = ui_to_api(ui, NODE_CLASS_MAPPINGS)
    inputs = api["7"]["inputs"]
    assert inputs["weight"] == 0.8 and inputs["weight_faceidv2"] == 2.0 and inputs["embeds_scaling"] == "V only"
    assert inputs.get("face_index", -1) == -1 and inputs.get("on_no_face", "error") == "error"


# ---- the encoder and the batch node -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def insightface(tiny_faces_dir):
    return faceid.load_insightface("buffalo_l", root=tiny_faces_dir, provider="CPU")


def test_encoder_gives_pos_and_neg_embeds_that_save_and_load(layout, insightface, tmp_path):
    from ipadapter_nodes.core.embeds_io import load_embeds, save_embeds
    from ipadapter_nodes.core.encode import load_clip_vision

    adapter = load_adapter(layout / "models" / "ipadapter" / "ip-adapter-faceid-plusv2_sd15.bin")
    clip_vision = load_clip_vision(layout / "models" / "clip_vision" / ENCODER_FILE)
    image = face_image(128, seed=1)
    pos, neg, crops = faceid_nodes.IPAdapterFaceIDEncoder().encode(adapter, image, weight=0.5,
                                                                   clip_vision=clip_vision, insightface=insightface)
    direct = faceid_apply.encode_faces(adapter, insightface, image, clip_vision=clip_vision).embeds
    assert torch.allclose(pos.cond, 0.5 * direct.cond) and torch.allclose(pos.clip_cond, 0.5 * direct.clip_cond)
    assert torch.equal(neg.cond, torch.zeros(1, 512)) and torch.equal(neg.clip_cond, direct.clip_uncond)
    assert crops.shape == (1, 224, 224, 3)
    loaded = load_embeds(save_embeds(pos, tmp_path / "face.safetensors"))
    loaded = getattr(loaded, "embeds", loaded)
    assert torch.equal(loaded.cond, pos.cond) and torch.equal(loaded.clip_cond, pos.clip_cond)


def test_batch_node_keeps_one_row_per_image_and_skips_the_face_free_one(layout, insightface, tiny_models_dir):
    adapter = load_adapter(layout / "models" / "ipadapter" / "ip-adapter-faceid_sd15.bin")
    faces = faceid_apply.encode_faces(adapter, insightface, torch.cat([face_image(128, seed=1), blank_image(128)]),
                                      on_no_face="skip", keep_rows=True)
    assert faces.found == (True, False)
    assert faces.embeds.count == 2 and faces.face_image.shape[0] == 1
    assert faces.embeds.cond[0].abs().sum() > 0 and torch.equal(faces.embeds.cond[1], torch.zeros(512))
    assert faceid_apply._per_image_weights(0.7, faces.found) == [0.7, 0.0]


def test_a_non_faceid_adapter_is_refused_by_name(layout, insightface, tmp_path):
    path = make_adapter("sd15", tmp_path / "ip-adapter_sd15.safetensors")
    with pytest.raises(ValueError, match=r"IPAdapterFaceID: IP-Adapter 'ip-adapter_sd15.safetensors' is a base"):
        faceid_apply.encode_faces(load_adapter(path), insightface, face_image(128))


def test_faceid_plus_without_clip_vision_says_what_to_connect(layout, insightface):
    adapter = load_adapter(layout / "models" / "ipadapter" / "ip-adapter-faceid-plus_sd15.bin")
    with pytest.raises(ValueError, match="clip_vision"):
        faceid_apply.encode_faces(adapter, insightface, face_image(128))


def test_faceid_without_insightface_says_what_to_connect(layout):
    adapter = load_adapter(layout / "models" / "ipadapter" / "ip-adapter-faceid_sd15.bin")
    model = DiffusersModel(None, "sd15", {})
    with pytest.raises(ValueError, match="IPAdapterInsightFaceLoader"):
        faceid_nodes.IPAdapterFaceID().apply_ipadapter(model, adapter, face_image(64))


def test_batch_node_gives_the_face_free_frame_weight_zero(layout, insightface):
    adapter = load_adapter(layout / "models" / "ipadapter" / "ip-adapter-faceid_sd15.bin")
    images = torch.cat([face_image(128, seed=1), blank_image(128), face_image(128, seed=2)])
    model, crops = faceid_nodes.IPAAdapterFaceIDBatch().apply_ipadapter(
        DiffusersModel(None, "sd15", {}), adapter, images, weight=0.7, insightface=insightface, on_no_face="skip")
    (application,) = model.applications
    assert application.unfold_batch and application.embeds.count == 3 and crops.shape[0] == 2
    frames = application.frame_layer_weights
    assert [set(frame) for frame in frames] == [{0.7}, {0.0}, {0.7}]


@pytest.mark.parametrize("case", ["faceid", "plus", "plusv2", "portrait"])
def test_faceid_workflows_pass_validation_with_the_face_options(layout, case):
    from ipadapter_nodes.runtime.registry import node_classes
    from ipadapter_nodes.runtime.validate import validate_prompt

    prompt = _prompt(case, on_no_face="skip")
    prompt["7"]["inputs"]["face_index"] = 0
    result = validate_prompt(prompt, node_classes())
    assert result.ok, result.node_errors
    assert result.coerced["7"]["inputs"]["face_index"] == 0


@pytest.mark.parametrize("name", ["ip-adapter-faceid_sd15.bin", "ip-adapter-faceid-plus_sd15.bin"])
def test_encoder_embeds_through_ipadapter_embeds_equal_the_faceid_node(layout, insightface, name):
    from ipadapter_nodes.core.encode import load_clip_vision
    from ipadapter_nodes.nodes import NODE_CLASS_MAPPINGS

    adapter = load_adapter(layout / "models" / "ipadapter" / name)
    clip_vision = load_clip_vision(layout / "models" / "clip_vision" / ENCODER_FILE)
    image, model = face_image(128, seed=1), DiffusersModel(None, "sd15", {})
    pos, neg, _ = faceid_nodes.IPAdapterFaceIDEncoder().encode(adapter, image, clip_vision=clip_vision,
                                                               insightface=insightface)
    (via_embeds,) = NODE_CLASS_MAPPINGS["IPAdapterEmbeds"]().apply_ipadapter(model, adapter, pos, neg_embed=neg,
                                                                              clip_vision=clip_vision)
    direct, _ = faceid_nodes.IPAdapterFaceID().apply_ipadapter(model, adapter, image, clip_vision=clip_vision,
                                                               insightface=insightface)
    ours, theirs = via_embeds.applications[-1].embeds, direct.applications[-1].embeds
    for field in ("cond", "uncond", "clip_cond", "clip_uncond"):
        a, b = getattr(ours, field), getattr(theirs, field)
        assert (a is None and b is None) or torch.equal(a, b), field
