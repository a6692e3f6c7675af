"""Every issue-5 node in an API-format workflow that runs headless on the tiny SD1.5 / SDXL models.

Each workflow samples once (64 x 64, 2 steps); the MODEL each apply node returned is read back from the
executor's outputs to check what it holds.  Folders: ``runtime.models.configure_folders`` with one temporary
folder as both input and output, so saved embeds can be loaded again.
"""
from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter_nodes.core import apply as engine
from ipadapter_nodes.core import folders, weighting
from ipadapter_nodes.runtime.executor import Executor, NodeExecutionError
from ipadapter_nodes.runtime.models import configure_folders
from ipadapter_nodes.runtime.registry import node_classes
from ipadapter_nodes.runtime.tiny_adapters import make_adapter
from ipadapter_nodes.runtime.validate import validate_prompt

ENCODER_FILE = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
ADAPTERS = {  # tiny variant -> the published file name its preset finds
    "sd15": "ip-adapter_sd15.safetensors",
    "sd15-plus": "ip-adapter-plus_sd15.safetensors",
    "sdxl-plus-vit-h": "ip-adapter-plus_sdxl_vit-h.safetensors",
}
STANDARD, PLUS = "STANDARD (medium strength)", "PLUS (high strength)"
APPLY = {"start_at": 0.0, "end_at": 1.0, "embeds_scaling": "V only"}


@pytest.fixture(scope="module")
def layout(tiny_models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("issue5")
    models, io = root / "models", root / "io"
    (models / "clip_vision").mkdir(parents=True)
    io.mkdir()
    # the shared tiny model set stays read-only: its folders are reached as extra model paths
    extra = root / "extra_model_paths.yaml"
    extra.write_text(f"tiny:\n  base_path: {tiny_models_dir}\n  checkpoints: checkpoints\n"
                     f"  clip_vision: clip_vision\n")
    shutil.copyfile(tiny_models_dir / "clip_vision" / "tiny-vit-h.safetensors", models / "clip_vision" / ENCODER_FILE)
    for variant, file_name in ADAPTERS.items():
        make_adapter(variant, models / "ipadapter" / file_name, seed=7)
    for name, (h, w), seed in (("style.png", (80, 96), 3), ("layout.png", (96, 64), 4), ("other.png", (64, 64), 5)):
        pixels = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(io / name)
    previous = folders.provider()
    configure_folders(models_dir=models, input_dir=io, output_dir=io, extra_model_paths=extra)
    yield io
    folders.configure(previous)


def _base(checkpoint: str, model: list, batch: int | list = 1, text: str | list = "a red house") -> dict:
    """Checkpoint (node 1), prompts (2, 3), latent (4), references (5 style, 6 layout, 7 other), sampler (8),
    decode (9), save (10); ``model`` is the link the sampler takes."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "5": {"class_type": "LoadImage", "inputs": {"image": "style.png"}},
        "6": {"class_type": "LoadImage", "inputs": {"image": "layout.png"}},
        "7": {"class_type": "LoadImage", "inputs": {"image": "other.png"}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": model, "seed": 11, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "issue5"}},
    }


def _loader(preset: str) -> dict:
    return {"class_type": "IPAdapterUnifiedLoader", "inputs": {"model": ["1", 0], "preset": preset}}


def _run(executor: Executor, prompt: dict):
    checked = validate_prompt(prompt, node_classes())
    assert checked.ok, checked.node_errors
    return executor.execute(prompt)


def _style_chain(family: str) -> dict:
    """SD1.5: every single-batch style/tiled/enhancer node chained; SDXL: style & composition, InstantStyle."""
    checkpoint = {"sd15": "tiny-sd15", "sdxl": "tiny-sdxl"}[family]
    ip = ["20", 1]
    nodes = {
        "20": _loader(STANDARD if family == "sd15" else PLUS),
        "21": {"class_type": "IPAdapterStyleComposition", "inputs": {
            "model": ["20", 0], "ipadapter": ip, "image_style": ["5", 0], "image_composition": ["6", 0],
            "weight_style": 1.2, "weight_composition": 0.8, "expand_style": False, "combine_embeds": "average",
            **APPLY}},
        "22": {"class_type": "IPAdapterInstantStyle", "inputs": {
            "model": ["21", 0], "ipadapter": ip, "image": ["5", 0],
            "block_scales": '{"up": {"block_1": 0.5}}' if family == "sd15" else '{"up": {"block_0": [0.0, 1.0, 0.0]}}',
            **APPLY}},
    }
    last = "22"
    if family == "sd15":
        nodes.update({
            "23": {"class_type": "IPAdapterPreciseStyleTransfer", "inputs": {
                "model": ["22", 0], "ipadapter": ip, "image": ["5", 0], "weight": 0.7, "style_boost": 1.5,
                "combine_embeds": "concat", **APPLY}},
            "24": {"class_type": "IPAdapterPreciseComposition", "inputs": {
                "model": ["23", 0], "ipadapter": ip, "image": ["6", 0], "weight": 0.8, "composition_boost": 0.0,
                "combine_embeds": "concat", **APPLY}},
            "25": {"class_type": "IPAdapterMS", "inputs": {
                "model": ["24", 0], "ipadapter": ip, "image": ["5", 0], "weight": 0.5, "weight_faceidv2": 1.0,
                "weight_type": "style transfer precise", "combine_embeds": "concat", "layer_weights": "0:1.0, 4:2, 6:0.5",
                **APPLY}},
            "26": {"class_type": "IPAdapterTiled", "inputs": {
                "model": ["25", 0], "ipadapter": ip, "image": ["5", 0], "weight": 0.6, "weight_type": "ease in",
                "combine_embeds": "concat", "sharpening": 0.2, **APPLY}},
            "27": {"class_type": "IPAdapterNoise", "inputs": {"type": "blur", "strength": 0.5, "blur": 3,
                                                               "image_optional": ["5", 0]}},
            "28": {"class_type": "IPAdapterClipVisionEnhancer", "inputs": {
                "model": ["26", 0], "ipadapter": ip, "image": ["7", 0], "weight": 0.5, "weight_type": "linear",
                "combine_embeds": "average", "enhance_tiles": 2, "enhance_ratio": 0.5,
                "image_negative": ["27", 0], **APPLY}},
        })
        last = "28"
    return {**_base(checkpoint, [last, 0]), **nodes}


@pytest.fixture(scope="module")
def style_runs(layout):
    done = {}

    def get(family: str):
        if family not in done:
            done[family] = _run(Executor(progress=False), _style_chain(family))
        return done[family]

    return get


def _encode(result, image_node: str):
    pipeline = result.node_outputs["20"][1]
    return engine.encode_images(pipeline["ipadapter"]["model"], pipeline["clipvision"]["model"],
                                result.node_outputs[image_node][0])


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_style_composition_uses_the_composition_image_only_at_the_composition_layers(style_runs, family):
    result = style_runs(family)
    style_app, comp_app = result.node_outputs["21"][0].applications
    composition = set(weighting.composition_layers(family))
    assert {i for i, w in enumerate(comp_app.layer_weights) if w != 0} == composition
    assert all(style_app.layer_weights[i] == 0 for i in composition)
    assert any(w != 0 for w in style_app.layer_weights)
    expected = weighting.style_composition_weights(family, 1.2, 0.8)
    assert comp_app.layer_weights == pytest.approx(expected[1].cond)
    assert style_app.layer_weights == pytest.approx(expected[0].cond)
    assert torch.equal(comp_app.embeds.cond, _encode(result, "6").cond)
    assert torch.equal(style_app.embeds.cond, _encode(result, "5").cond)
    assert result.ui["10"]["images"]  # the workflow sampled and saved


def test_instant_style_block_scales_become_the_layer_weights(style_runs):
    app = style_runs("sdxl").node_outputs["22"][0].applications[-1]
    expected = weighting.block_scales_to_layer_weights({"up": {"block_0": [0.0, 1.0, 0.0]}}, "sdxl")
    assert app.layer_weights == pytest.approx(expected)
    assert {i for i, w in enumerate(app.layer_weights) if w} == set(range(34, 44))


def test_precise_and_mad_scientist_nodes_carry_their_weight_maps(style_runs):
    outputs = style_runs("sd15").node_outputs
    precise_style = outputs["23"][0].applications[-1]
    expected = weighting.layer_weights("style transfer precise", 0.7, "sd15", boost=1.5)
    assert precise_style.layer_weights == pytest.approx(expected.cond)
    assert precise_style.uncond_layer_weights == pytest.approx(expected.uncond)
    precise_layout = outputs["24"][0].applications[-1]  # boost 0: only the composition layers act
    assert {i for i, w in enumerate(precise_layout.layer_weights) if w} == {4, 5}
    mad = outputs["25"][0].applications[-1]
    custom = weighting.parse_layer_weights("0:1.0, 4:2, 6:0.5", "sd15")
    expected = weighting.layer_weights("style transfer precise", 0.5, "sd15", custom=custom)
    assert mad.layer_weights == pytest.approx(expected.cond)
    assert mad.uncond_layer_weights == pytest.approx(expected.uncond)


def test_tiled_node_applies_one_masked_adapter_per_tile(style_runs):
    outputs = style_runs("sd15").node_outputs
    model, tiles, masks = outputs["26"]
    apps = model.applications[len(outputs["25"][0].applications):]
    assert tiles.shape == (4, 256, 256, 3) and masks.shape == (4, 512, 512)
    assert len(apps) == 4 and all(a.attn_mask is not None for a in apps)
    assert torch.equal(masks.sum(0), torch.ones(512, 512))  # 2 x 2 tiles: they cover all, without overlap
    assert apps[0].layer_weights == pytest.approx(weighting.layer_weights("ease in", 0.6, "sd15").cond)


def test_enhancer_node_applies_the_merged_tile_features(style_runs):
    result = style_runs("sd15")
    app = result.node_outputs["28"][0].applications[-1]
    whole = _encode(result, "7").cond
    assert app.embeds.cond.shape == whole.shape  # one reference: [0.5 * whole, merged] averaged to one row
    assert not torch.allclose(app.embeds.cond, whole)
    noise = result.node_outputs["27"][0]
    assert noise.shape == (1, 224, 224, 3)


# ---- batch: unfold_batch, per-frame weights ---------------------------------------------------------------

def _batch_chain() -> dict:
    ip = ["20", 1]
    nodes = {
        "20": _loader(STANDARD),
        "11": {"class_type": "ImageBatch", "inputs": {"image1": ["5", 0], "image2": ["6", 0]}},
        "30": {"class_type": "IPAdapterWeights", "inputs": {
            "weights": "1.0", "timing": "custom", "frames": 0, "start_frame": 0, "end_frame": 9999,
            "add_starting_frames": 0, "add_ending_frames": 0, "method": "full batch"}},
        "31": {"class_type": "IPAdapterWeightsFromStrategy", "inputs": {"weights_strategy": ["30", 5]}},
        "32": {"class_type": "IPAdapterCombineWeights", "inputs": {"weights_1": ["31", 0], "weights_2": 0.5}},
        "33": {"class_type": "IPAdapterWeights", "inputs": {
            "weights": "0, 1", "timing": "linear", "frames": 2, "start_frame": 0, "end_frame": 9999,
            "add_starting_frames": 0, "add_ending_frames": 0, "method": "full batch", "image": ["11", 0]}},
        "34": {"class_type": "IPAdapterPromptScheduleFromWeightsStrategy", "inputs": {
            "weights_strategy": ["33", 5], "prompt": "a red house\na blue boat"}},
        "40": {"class_type": "IPAdapterBatch", "inputs": {
            "model": ["20", 0], "ipadapter": ip, "image": ["11", 0], "weight": ["32", 0], "weight_type": "linear",
            "encode_batch_size": 1, **APPLY}},
        "41": {"class_type": "IPAdapterStyleCompositionBatch", "inputs": {
            "model": ["40", 0], "ipadapter": ip, "image_style": ["11", 0], "image_composition": ["11", 0],
            "weight_style": 0.5, "weight_composition": 0.5, "expand_style": True, **APPLY}},
        "42": {"class_type": "IPAdapterPreciseStyleTransferBatch", "inputs": {
            "model": ["41", 0], "ipadapter": ip, "image": ["11", 0], "weight": 0.3, "style_boost": 1.0,
            "combine_embeds": "concat", **APPLY}},
        "43": {"class_type": "IPAdapterPreciseCompositionBatch", "inputs": {
            "model": ["42", 0], "ipadapter": ip, "image": ["11", 0], "weight": 0.3, "composition_boost": 0.2,
            "combine_embeds": "concat", **APPLY}},
        "44": {"class_type": "IPAdapterTiledBatch", "inputs": {
            "model": ["43", 0], "ipadapter": ip, "image": ["11", 0], "weight": 0.3, "weight_type": "linear",
            "sharpening": 0.0, "encode_batch_size": 0, **APPLY}},
        "45": {"class_type": "IPAdapterClipVisionEnhancerBatch", "inputs": {
            "model": ["44", 0], "ipadapter": ip, "image": ["11", 0], "weight": 0.3, "weight_type": "linear",
            "enhance_tiles": 2, "enhance_ratio": 0.5, "encode_batch_size": 0, **APPLY}},
        "46": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}},
        "47": {"class_type": "IPAdapterEncoder", "inputs": {"ipadapter": ip, "image": ["11", 0], "weight": 1.0,
                                                            "mask": ["46", 0]}},
        "48": {"class_type": "IPAdapterEmbedsBatch", "inputs": {
            "model": ["45", 0], "ipadapter": ip, "pos_embed": ["47", 0], "neg_embed": ["47", 1], "weight": 0.3,
            "weight_type": "linear", **APPLY}},
    }
    prompt = {**_base("tiny-sd15", ["48", 0], batch=["32", 1], text=["34", 0]), **nodes}
    return prompt


def test_batch_nodes_unfold_the_batch_with_per_frame_weights(layout):
    result = _run(Executor(progress=False), _batch_chain())
    outputs = result.node_outputs
    assert outputs["32"] == ([1.0, 0.5], 2)
    assert outputs["34"][0] == '"0": "a red house",\n"2": "a blue boat",\n'
    assert outputs["9"][0].shape[0] == 2  # the latent batch size came from the weights' count
    apps = outputs["48"][0].applications
    assert all(a.unfold_batch for a in apps)
    batch_app = apps[0]
    assert [row[0] for row in batch_app.frame_layer_weights] == [1.0, 0.5]
    assert batch_app.embeds.count == 2


def _mapping_prompt(second: str) -> dict:
    nodes = {
        "20": _loader(STANDARD),
        "11": {"class_type": "ImageBatch", "inputs": {"image1": ["5", 0], "image2": [second, 0]}},
        "40": {"class_type": "IPAdapterBatch", "inputs": {
            "model": ["20", 0], "ipadapter": ["20", 1], "image": ["11", 0], "weight": 1.0, "weight_type": "linear",
            "encode_batch_size": 0, **APPLY}},
    }
    return {**_base("tiny-sd15", ["40", 0], batch=2), **nodes}


def test_batch_reference_i_drives_latent_i_only(layout):
    executor = Executor(progress=False)
    first = _run(executor, _mapping_prompt("6")).node_outputs["9"][0]
    second = _run(executor, _mapping_prompt("7")).node_outputs["9"][0]
    assert torch.allclose(first[0], second[0], atol=1e-5)         # same reference 0, same latent 0
    assert (first[1] - second[1]).abs().max().item() > 1e-3       # reference 1 changed, latent 1 changed


# ---- embeds: encode, save, load, legacy and malicious files ------------------------------------------------

def _embeds_prompt(source: dict, pos: list) -> dict:
    nodes = {
        "20": _loader(PLUS),
        "50": {"class_type": "IPAdapterEmbeds", "inputs": {
            "model": ["20", 0], "ipadapter": ["20", 1], "pos_embed": pos, "weight": 1.0, "weight_type": "linear",
            **APPLY}},
        **source,
    }
    return {**_base("tiny-sd15", ["50", 0]), **nodes}


ENCODE = {
    "51": {"class_type": "IPAdapterEncoder", "inputs": {"ipadapter": ["20", 1], "image": ["5", 0], "weight": 1.0}},
    "52": {"class_type": "IPAdapterCombineEmbeds", "inputs": {"embed1": ["51", 0], "method": "concat"}},
    "53": {"class_type": "IPAdapterSaveEmbeds", "inputs": {"embeds": ["52", 0], "filename_prefix": "roundtrip"}},
}


@pytest.fixture(scope="module")
def embeds_runs(layout):
    executor = Executor(progress=False)
    direct = _run(executor, _embeds_prompt(ENCODE, ["51", 0]))
    saved = direct.ui["53"]["embeds"][0]["filename"]
    loaded = _run(executor, _embeds_prompt(
        {"54": {"class_type": "IPAdapterLoadEmbeds", "inputs": {"embeds": saved}}}, ["54", 0]))
    # the existing pack's current single-side file: pos features only, saved with torch.save
    torch.save(direct.node_outputs["51"][0].cond.clone(), layout / "legacy.ipadpt")
    legacy = _run(executor, _embeds_prompt(
        {"54": {"class_type": "IPAdapterLoadEmbeds", "inputs": {"embeds": "legacy.ipadpt"}}}, ["54", 0]))
    return {"direct": direct, "loaded": loaded, "legacy": legacy, "saved": saved, "executor": executor}


def test_saved_and_loaded_embeds_give_bit_identical_images(embeds_runs, layout):
    assert embeds_runs["saved"] == "roundtrip_00001_.safetensors" and (layout / embeds_runs["saved"]).is_file()
    assert torch.equal(embeds_runs["loaded"].node_outputs["9"][0], embeds_runs["direct"].node_outputs["9"][0])


def test_a_legacy_single_side_file_gets_the_black_image_uncond(embeds_runs):
    loaded = embeds_runs["legacy"].node_outputs["54"][0]
    assert not loaded.uncond.any()  # the file holds no uncond side
    applied = embeds_runs["legacy"].node_outputs["50"][0].applications[-1].embeds
    assert torch.equal(applied.uncond, embeds_runs["direct"].node_outputs["51"][0].uncond)
    assert torch.equal(embeds_runs["legacy"].node_outputs["9"][0], embeds_runs["direct"].node_outputs["9"][0])


class _RunsCode:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_a_malicious_embeds_file_is_refused_without_running_code(embeds_runs, layout, monkeypatch):
    monkeypatch.chdir(layout)
    torch.save({"cond": _RunsCode()}, layout / "evil.ipadpt")
    with open(layout / "evil2.ipadpt", "wb") as handle:
        pickle.dump(_RunsCode(), handle, protocol=2)
    for name in ("evil.ipadpt", "evil2.ipadpt"):
        prompt = _embeds_prompt({"54": {"class_type": "IPAdapterLoadEmbeds", "inputs": {"embeds": name}}},
                                ["54", 0])
        with pytest.raises(NodeExecutionError, match="refused") as error:
            embeds_runs["executor"].execute(prompt)
        assert error.value.args and "54" in str(error.value)
    assert not (layout / "PWNED").exists()
