"""Regional IP-Adapter nodes and the two shipped example workflows (masking_two_regions, multiple_adapters).

* The nodes' declarations match the existing pack (names, widget order, defaults, outputs).
* IPAdapterRegionalConditioning x2 -> IPAdapterCombineParams -> IPAdapterFromParams gives the same MODEL
  applications, and the same sampled latent, as two IPAdapterAdvanced nodes with the same masks.
* The API twins of the shipped UI workflows (the same graph, tiny model names, small sizes) run headless on
  the tiny SD1.5 model and write PNGs.
* Confinement at the node level: one region masked to the left half, one step: the right half of the latent
  stays (nearly) the no-adapter latent, the left half changes.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter_nodes.core import folders, regional
from ipadapter_nodes.core.application import Application
from ipadapter_nodes.nodes import regional as nodes
from ipadapter_nodes.runtime.executor import Executor
from ipadapter_nodes.runtime.models import configure_folders
from ipadapter_nodes.runtime.registry import node_classes
from ipadapter_nodes.runtime.tiny_adapters import make_adapter
from ipadapter_nodes.runtime.ui_convert import widget_layout
from ipadapter_nodes.runtime.validate import validate_prompt
from ipadapter_nodes.runtime.workflow import load_workflow

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
PLUS_FACE = "tiny-ip-adapter-plus-face_sd15.safetensors"
STANDARD = "tiny-ip-adapter_sd15.safetensors"
# The shipped (real) model names -> the tiny ones of the twins.
TINY_NAMES = {
    "v1-5-pruned-emaonly.safetensors": "tiny-sd15",
    "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors": "tiny-vit-h",
    "ip-adapter-plus-face_sd15.safetensors": PLUS_FACE,
    "ip-adapter_sd15.safetensors": STANDARD,
}
WIDTH, HEIGHT = 96, 64  # the twins' output size (a non-square latent: 12 x 8)
SAMPLER = {"seed": 42, "steps": 2, "cfg": 6.5, "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0}


def _text(text: str) -> dict:
    return {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}}


# The API-format twin of workflows/masking_two_regions.json: the same nodes and links, tiny names, small sizes.
TWO_REGIONS = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15"}},
    "2": _text("two people side by side, portrait photo, soft light, detailed"),
    "3": _text("blurry, low quality, deformed, watermark"),
    "4": {"class_type": "LoadImage", "inputs": {"image": "face_left.png"}},
    "5": {"class_type": "LoadImage", "inputs": {"image": "face_right.png"}},
    "6": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": WIDTH, "height": HEIGHT}},
    "7": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": WIDTH // 2, "height": HEIGHT}},
    "8": {"class_type": "MaskComposite", "inputs": {"destination": ["6", 0], "source": ["7", 0], "x": 0, "y": 0,
                                                    "operation": "add"}},
    "9": {"class_type": "MaskComposite", "inputs": {"destination": ["6", 0], "source": ["7", 0], "x": WIDTH // 2,
                                                    "y": 0, "operation": "add"}},
    "10": {"class_type": "IPAdapterModelLoader", "inputs": {"ipadapter_file": PLUS_FACE}},
    "11": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "tiny-vit-h"}},
    "12": _text("a woman with red hair"),
    "13": _text("a man with glasses"),
    "14": {"class_type": "IPAdapterRegionalConditioning", "inputs": {
        "image": ["4", 0], "image_weight": 0.7, "prompt_weight": 1.0, "weight_type": "linear", "start_at": 0.0,
        "end_at": 1.0, "mask": ["8", 0], "positive": ["12", 0]}},
    "15": {"class_type": "IPAdapterRegionalConditioning", "inputs": {
        "image": ["5", 0], "image_weight": 0.7, "prompt_weight": 1.0, "weight_type": "linear", "start_at": 0.0,
        "end_at": 1.0, "mask": ["9", 0], "positive": ["13", 0]}},
    "16": {"class_type": "IPAdapterCombineParams", "inputs": {"params_1": ["14", 0], "params_2": ["15", 0]}},
    "17": {"class_type": "IPAdapterFromParams", "inputs": {
        "model": ["1", 0], "ipadapter": ["10", 0], "ipadapter_params": ["16", 0], "combine_embeds": "concat",
        "embeds_scaling": "V only", "clip_vision": ["11", 0]}},
    "18": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["14", 1], "conditioning_2": ["15", 1]}},
    "19": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["18", 0], "conditioning_2": ["2", 0]}},
    "20": {"class_type": "EmptyLatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}},
    "21": {"class_type": "KSampler", "inputs": {
        "model": ["17", 0], "positive": ["19", 0], "negative": ["3", 0], "latent_image": ["20", 0], **SAMPLER}},
    "22": {"class_type": "VAEDecode", "inputs": {"samples": ["21", 0], "vae": ["1", 2]}},
    "23": {"class_type": "SaveImage", "inputs": {"images": ["22", 0], "filename_prefix": "ipadapter_two_regions"}},
}
# The inputs in which the twin differs from the shipped file (names, sizes, steps), per node id.
TWO_REGIONS_TINY = {"1": {"ckpt_name"}, "6": {"width", "height"}, "7": {"width", "height"}, "9": {"x"},
                    "10": {"ipadapter_file"}, "11": {"clip_name"}, "20": {"width", "height"}, "21": {"steps"}}

# The API-format twin of workflows/multiple_adapters.json.
MULTIPLE = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15"}},
    "2": _text("portrait photo of a person in a garden, detailed"),
    "3": _text("blurry, low quality, deformed, watermark"),
    "4": {"class_type": "LoadImage", "inputs": {"image": "style_reference.png"}},
    "5": {"class_type": "LoadImage", "inputs": {"image": "face.png"}},
    "6": {"class_type": "IPAdapterModelLoader", "inputs": {"ipadapter_file": STANDARD}},
    "7": {"class_type": "IPAdapterModelLoader", "inputs": {"ipadapter_file": PLUS_FACE}},
    "8": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "tiny-vit-h"}},
    "9": {"class_type": "IPAdapterAdvanced", "inputs": {
        "model": ["1", 0], "ipadapter": ["6", 0], "image": ["4", 0], "weight": 0.6, "weight_type": "linear",
        "combine_embeds": "concat", "start_at": 0.0, "end_at": 1.0, "embeds_scaling": "V only",
        "clip_vision": ["8", 0]}},
    "10": {"class_type": "IPAdapterAdvanced", "inputs": {
        "model": ["9", 0], "ipadapter": ["7", 0], "image": ["5", 0], "weight": 0.8, "weight_type": "linear",
        "combine_embeds": "concat", "start_at": 0.0, "end_at": 1.0, "embeds_scaling": "V only",
        "clip_vision": ["8", 0]}},
    "11": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "12": {"class_type": "KSampler", "inputs": {
        "model": ["10", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["11", 0], **SAMPLER}},
    "13": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["1", 2]}},
    "14": {"class_type": "SaveImage", "inputs": {"images": ["13", 0], "filename_prefix": "ipadapter_two_adapters"}},
}
MULTIPLE_TINY = {"1": {"ckpt_name"}, "6": {"ipadapter_file"}, "7": {"ipadapter_file"}, "8": {"clip_name"},
                 "11": {"width", "height"}, "12": {"steps"}}


@pytest.fixture(scope="module")
def layout(tiny_models_dir, tmp_path_factory):
    """Tiny adapters and the four reference images the workflows load; the tiny set as extra model paths."""
    root = tmp_path_factory.mktemp("regional")
    models, io = root / "models", root / "io"
    io.mkdir()
    extra = root / "extra_model_paths.yaml"
    extra.write_text(f"tiny:\n  base_path: {tiny_models_dir}\n  checkpoints: checkpoints\n"
                     f"  clip_vision: clip_vision\n")
    make_adapter("sd15-plus-face", models / "ipadapter" / PLUS_FACE, seed=5)
    make_adapter("sd15", models / "ipadapter" / STANDARD, seed=6)
    for seed, name in enumerate(("face_left.png", "face_right.png", "style_reference.png", "face.png")):
        pixels = np.random.default_rng(seed).integers(0, 256, size=(72, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(io / name)
    previous = folders.provider()
    configure_folders(models_dir=models, input_dir=io, output_dir=io, extra_model_paths=extra)
    yield io
    folders.configure(previous)


@pytest.fixture(scope="module")
def executor(layout) -> Executor:
    return Executor(progress=False)  # shared: loaders, encoders and masks run once for the module


def _run(executor: Executor, prompt: dict):
    checked = validate_prompt(prompt, node_classes())
    assert checked.ok, checked.node_errors
    return executor.execute(prompt)


def _same(a, b) -> bool:
    """Deep equality of applications: dataclasses field by field, tensors exactly, the adapter by identity."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, Application):
        return type(b) is Application and a.adapter is b.adapter and all(
            _same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a) if f.name != "adapter")
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _with_tiny_names(prompt: dict) -> dict:
    """``prompt`` with its real model file names replaced by the tiny ones (everything else as shipped)."""
    return {node_id: {**node, "inputs": {name: TINY_NAMES.get(value, value) if isinstance(value, str) else value
                                         for name, value in node["inputs"].items()}}
            for node_id, node in prompt.items()}


def _graph_differences(shipped: dict, twin: dict) -> dict[str, set[str]]:
    """Per node id, the inputs whose values differ; the graphs' nodes, classes and input names must agree."""
    assert set(shipped) == set(twin)
    differences = {}
    for node_id, node in shipped.items():
        assert node["class_type"] == twin[node_id]["class_type"], node_id
        assert set(node["inputs"]) == set(twin[node_id]["inputs"]), node_id
        changed = {name for name, value in node["inputs"].items() if twin[node_id]["inputs"][name] != value}
        if changed:
            differences[node_id] = changed
    return differences


# ---------------------------------------------------------------------------------------------- declarations
def test_regional_nodes_are_declared_as_in_the_existing_pack():
    classes = node_classes()
    expected = {  # class -> (widget order, outputs, names, optional inputs)
        "IPAdapterRegionalConditioning": (["image_weight", "prompt_weight", "weight_type", "start_at", "end_at"],
                                          ("IPADAPTER_PARAMS", "CONDITIONING", "CONDITIONING"),
                                          ("IPADAPTER_PARAMS", "POSITIVE", "NEGATIVE"), ["mask", "positive", "negative"]),
        "IPAdapterCombineParams": ([], ("IPADAPTER_PARAMS",), None, ["params_3", "params_4", "params_5"]),
        "IPAdapterFromParams": (["combine_embeds", "embeds_scaling"], ("MODEL",), None,
                                ["image_negative", "clip_vision"]),
    }
    for name, (widgets, outputs, names, optional) in expected.items():
        cls = classes[name]
        assert [slot.spec.name for slot in widget_layout(cls)] == widgets, name
        assert cls.RETURN_TYPES == outputs and getattr(cls, "RETURN_NAMES", None) == names, name
        assert list(cls.INPUT_TYPES()["optional"]) == optional, name
        assert cls.CATEGORY == "ipadapter/params"
    required = classes["IPAdapterRegionalConditioning"].INPUT_TYPES()["required"]
    assert required["image_weight"][1] == {"default": 1.0, "min": -1.0, "max": 3.0, "step": 0.05}
    assert required["prompt_weight"][1] == {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05}
    assert required["weight_type"][0][0] == "linear" and len(required["weight_type"][0]) == 15
    from_params = classes["IPAdapterFromParams"].INPUT_TYPES()["required"]
    assert list(from_params) == ["model", "ipadapter", "ipadapter_params", "combine_embeds", "embeds_scaling"]
    assert from_params["combine_embeds"][0] == ["concat", "add", "subtract", "average", "norm average"]
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["IPAdapterFromParams"] == "IPAdapter from Params"


# ---------------------------------------------------------------------------------------------- node values
def test_regional_conditioning_masks_both_prompts_with_the_prompt_weight():
    image, mask = torch.rand(1, 32, 32, 3), torch.zeros(16, 24)
    positive = [[torch.ones(1, 77, 8), {"pooled_output": None}]]
    negative = [[torch.zeros(1, 77, 8), {}]]
    params, pos, neg = nodes.IPAdapterRegionalConditioning().conditioning(
        image, 0.7, 2.5, "ease in", 0.1, 0.9, mask=mask, positive=positive, negative=negative)
    assert len(params) == 1
    entry = params[0]
    assert entry.image is image and entry.attn_mask.shape == (1, 16, 24)
    assert (entry.weight, entry.weight_type, entry.start_at, entry.end_at) == (0.7, "ease in", 0.1, 0.9)
    for out, given in ((pos, positive), (neg, negative)):
        assert out[0][0] is given[0][0]
        assert out[0][1]["mask_strength"] == 2.5 and out[0][1]["set_area_to_bounds"] is False
        assert out[0][1]["mask"].shape == (1, 16, 24)
    assert "mask" not in positive[0][1]  # the input list is untouched


def test_regional_conditioning_without_mask_leaves_the_prompts_and_the_adapter_unmasked():
    positive = [[torch.ones(1, 77, 8), {}]]
    params, pos, neg = nodes.IPAdapterRegionalConditioning().conditioning(
        torch.rand(1, 8, 8, 3), 1.0, 1.0, "linear", 0.0, 1.0, positive=positive)
    assert params[0].attn_mask is None and pos is positive and neg is None


def test_combine_params_concatenates_in_order_and_reads_the_existing_packs_dict_form():
    make = nodes.IPAdapterRegionalConditioning().conditioning
    one, two, three = (make(torch.full((1, 4, 4, 3), v), v, 1.0, "linear", 0.0, 1.0)[0] for v in (0.1, 0.2, 0.3))
    pack_form = {"image": [torch.rand(1, 4, 4, 3)], "attn_mask": [None], "weight": [0.4], "weight_type": ["linear"],
                 "start_at": [0.0], "end_at": [0.5]}
    combined = nodes.IPAdapterCombineParams().combine(one, two, params_4=three, params_5=pack_form)[0]
    assert [entry.weight for entry in combined] == [0.1, 0.2, 0.3, 0.4]
    assert combined[3].end_at == 0.5 and combined[3].image is pack_form["image"][0]
    with pytest.raises(ValueError, match="differ in length"):
        regional.as_params({**pack_form, "weight": [0.4, 0.5]})


def test_from_params_refuses_an_empty_params_list():
    with pytest.raises(ValueError, match="IPAdapterFromParams: 'ipadapter_params' holds no region"):
        regional.apply_params(object(), object(), object(), [])


def test_regional_conditioning_names_itself_in_errors():
    with pytest.raises(ValueError, match="IPAdapterRegionalConditioning: need 0 <= start_at <= end_at"):
        nodes.IPAdapterRegionalConditioning().conditioning(torch.rand(1, 8, 8, 3), 1.0, 1.0, "linear", 0.8, 0.2)


# ---------------------------------------------------------------------------------------------- workflows
def test_shipped_two_region_workflow_is_the_twin_with_real_model_names(layout):
    shipped = load_workflow(WORKFLOWS / "masking_two_regions.json")
    checked = validate_prompt(_with_tiny_names(shipped.prompt), node_classes())  # every shipped widget value
    assert checked.ok, checked.node_errors
    assert shipped.ui is not None and shipped.ui["version"] == 0.4  # saved in the frontend's UI format
    assert _graph_differences(shipped.prompt, TWO_REGIONS) == TWO_REGIONS_TINY
    for node_id, names in TWO_REGIONS_TINY.items():
        for name in names & {"ckpt_name", "ipadapter_file", "clip_name"}:
            assert TINY_NAMES[shipped.prompt[node_id]["inputs"][name]] == TWO_REGIONS[node_id]["inputs"][name]
    inputs = shipped.prompt
    # the masks split the 768 x 512 output into its two halves
    assert (inputs["6"]["inputs"]["width"], inputs["7"]["inputs"]["width"], inputs["9"]["inputs"]["x"]) == (768, 384, 384)
    assert (inputs["20"]["inputs"]["width"], inputs["20"]["inputs"]["height"]) == (768, 512)


def test_shipped_multiple_adapters_workflow_is_the_twin_with_real_model_names(layout):
    loaded = load_workflow(WORKFLOWS / "multiple_adapters.json")
    checked = validate_prompt(_with_tiny_names(loaded.prompt), node_classes())
    assert checked.ok, checked.node_errors
    assert loaded.ui is not None and loaded.ui["version"] == 0.4
    shipped = loaded.prompt
    assert _graph_differences(shipped, MULTIPLE) == MULTIPLE_TINY
    assert [TINY_NAMES[shipped[i]["inputs"]["ipadapter_file"]] for i in ("6", "7")] == [STANDARD, PLUS_FACE]


@pytest.fixture(scope="module")
def two_regions(executor):
    """The two-region twin, plus the same two regions as two chained IPAdapterAdvanced nodes (nodes 30-34)."""
    prompt = dict(TWO_REGIONS)
    advanced = {"ipadapter": ["10", 0], "weight": 0.7, "weight_type": "linear", "combine_embeds": "concat",
                "start_at": 0.0, "end_at": 1.0, "embeds_scaling": "V only", "clip_vision": ["11", 0]}
    prompt.update({
        "30": {"class_type": "IPAdapterAdvanced", "inputs": {
            "model": ["1", 0], "image": ["4", 0], "attn_mask": ["8", 0], **advanced}},
        "31": {"class_type": "IPAdapterAdvanced", "inputs": {
            "model": ["30", 0], "image": ["5", 0], "attn_mask": ["9", 0], **advanced}},
        "32": {"class_type": "KSampler", "inputs": {**TWO_REGIONS["21"]["inputs"], "model": ["31", 0]}},
        "33": {"class_type": "VAEDecode", "inputs": {"samples": ["32", 0], "vae": ["1", 2]}},
        "34": {"class_type": "PreviewImage", "inputs": {"images": ["33", 0]}},
    })
    return _run(executor, prompt)


def test_two_region_workflow_writes_a_png(two_regions, layout):
    saved = two_regions.ui["23"]["images"]
    assert len(saved) == 1
    path = layout / saved[0].get("subfolder", "") / saved[0]["filename"]
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (WIDTH, HEIGHT)


def test_from_params_gives_the_applications_of_two_masked_advanced_nodes(two_regions):
    regional_model = two_regions.node_outputs["17"][0]
    advanced_model = two_regions.node_outputs["31"][0]
    assert len(regional_model.applications) == 2
    assert _same(regional_model.applications, advanced_model.applications)
    left, right = (app.attn_mask for app in regional_model.applications)
    assert left[0, :, : WIDTH // 2].eq(1).all() and left[0, :, WIDTH // 2:].eq(0).all()
    assert torch.equal(left + right, torch.ones(1, HEIGHT, WIDTH))
    assert [app.weight for app in regional_model.applications] == [0.7, 0.7]


def test_from_params_samples_the_same_latent_as_two_masked_advanced_nodes(two_regions):
    ours = two_regions.node_outputs["21"][0]["samples"]
    assert torch.equal(ours, two_regions.node_outputs["32"][0]["samples"])


def test_the_regions_prompts_reach_the_sampler_masked(two_regions):
    positive = two_regions.node_outputs["19"][0]
    assert len(positive) == 3  # left prompt, right prompt, the whole-image prompt
    assert [entry[1].get("mask_strength") for entry in positive] == [1.0, 1.0, None]
    assert torch.equal(positive[0][1]["mask"], two_regions.node_outputs["8"][0])


def test_multiple_adapters_workflow_stacks_two_adapters_and_writes_a_png(executor, layout):
    result = _run(executor, MULTIPLE)
    first, second = result.node_outputs["10"][0].applications
    assert (first.weight, second.weight) == (0.6, 0.8)
    assert first.adapter is result.node_outputs["6"][0] and second.adapter is result.node_outputs["7"][0]
    assert first.adapter.spec.kind != second.adapter.spec.kind
    assert (first.attn_mask, second.attn_mask) == (None, None)
    saved = result.ui["14"]["images"]
    with Image.open(layout / saved[0].get("subfolder", "") / saved[0]["filename"]) as png:
        assert png.format == "PNG" and png.size == (64, 64)


# ---------------------------------------------------------------------------------------------- confinement
ONE_STEP = {**SAMPLER, "steps": 1, "sampler_name": "euler", "scheduler": "normal"}


def _masked_region(image: str, mask: str, node: str) -> dict:
    """IPAdapterRegionalConditioning (weight 1, no prompts) -> IPAdapterFromParams, as nodes ``node``/``node+1``."""
    return {
        node: {"class_type": "IPAdapterRegionalConditioning", "inputs": {
            "image": [image, 0], "image_weight": 1.0, "prompt_weight": 1.0, "weight_type": "linear",
            "start_at": 0.0, "end_at": 1.0, "mask": [mask, 0]}},
        str(int(node) + 1): {"class_type": "IPAdapterFromParams", "inputs": {
            "model": ["1", 0], "ipadapter": ["10", 0], "ipadapter_params": [node, 0], "combine_embeds": "concat",
            "embeds_scaling": "V only", "clip_vision": ["11", 0]}},
    }


def _one_step(model: str, node: str) -> dict:
    """A one-step KSampler on ``model`` (node ``node``), decoded and previewed so that it runs."""
    decode, preview = str(int(node) + 1), str(int(node) + 2)
    return {
        node: {"class_type": "KSampler", "inputs": {
            "model": [model, 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["20", 0], **ONE_STEP}},
        decode: {"class_type": "VAEDecode", "inputs": {"samples": [node, 0], "vae": ["1", 2]}},
        preview: {"class_type": "PreviewImage", "inputs": {"images": [decode, 0]}},
    }


@pytest.fixture(scope="module")
def one_step_runs(executor):
    """One denoising step without adapter (50), with one region masked to the left half (40, 41 -> 53) and
    with one region whose mask is all zeros (44, 45 -> 56)."""
    prompt = {key: TWO_REGIONS[key] for key in ("1", "2", "3", "4", "6", "7", "8", "10", "11", "20")}
    prompt.update({**_masked_region("4", "8", "40"), **_masked_region("4", "6", "44")})
    prompt.update({**_one_step("1", "50"), **_one_step("41", "53"), **_one_step("45", "56")})
    return _run(executor, prompt)


def test_a_region_with_an_empty_mask_leaves_the_latent_exactly_as_without_adapter(one_step_runs):
    plain = one_step_runs.node_outputs["50"][0]["samples"]
    assert torch.equal(one_step_runs.node_outputs["56"][0]["samples"], plain)
    left_only = one_step_runs.node_outputs["53"][0]["samples"]
    assert (left_only - plain)[..., : plain.shape[-1] // 2].abs().mean().item() > 1e-2


def test_a_region_masked_to_the_left_half_changes_only_the_left_tokens_of_the_first_attention(one_step_runs):
    """The nodes' MODEL in a real one-step KSampler run: the first cross-attention layer (its input is the
    same with and without adapter) returns the no-adapter output exactly on the right half of its token
    grid and a different one on the left half."""
    outputs = one_step_runs.node_outputs
    masked_model, plain_model = outputs["41"][0], outputs["1"][0]
    first = plain_model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    assert masked_model.unet is plain_model.unet  # the applications patch the same UNet while sampling
    recorded: list[torch.Tensor] = []
    handle = first.register_forward_hook(lambda module, args, out: recorded.append(out.detach().clone()))
    try:
        sampler = node_classes()["KSampler"]()
        runs = []
        for model in (masked_model, plain_model):
            recorded.clear()
            sampler.sample(model, positive=outputs["2"][0], negative=outputs["3"][0], latent_image=outputs["20"][0],
                           **ONE_STEP)
            runs.append(list(recorded))
    finally:
        handle.remove()
    latent_h, latent_w = HEIGHT // 8, WIDTH // 8
    assert len(runs[0]) == len(runs[1]) >= 1
    for masked, plain in zip(*runs):
        assert masked.shape[1] == latent_h * latent_w
        masked = masked.reshape(masked.shape[0], latent_h, latent_w, -1)
        plain = plain.reshape(plain.shape[0], latent_h, latent_w, -1)
        half = latent_w // 2
        torch.testing.assert_close(masked[:, :, half:], plain[:, :, half:], rtol=0, atol=1e-6)
        assert (masked[:, :, :half] - plain[:, :, :half]).abs().max().item() > 1e-3
