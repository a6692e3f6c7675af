"""The v1 node names (IPAdapterApply & co.) on today's engine, headless on the tiny SD1.5 model.

The expected INPUT_TYPES below are the v1 pack's layouts (last v1 commit 6a411dc, see
shared/reference/anchor-node-pack.md §1.4): old UI saves map their ``widgets_values`` by that order.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter_nodes.core import faceid, folders, legacy, noise, prep_image
from ipadapter_nodes.nodes import legacy as legacy_nodes
from ipadapter_nodes.runtime import registry
from ipadapter_nodes.runtime.executor import Executor
from ipadapter_nodes.runtime.models import configure_folders
from ipadapter_nodes.runtime.tiny_adapters import make_adapter
from ipadapter_nodes.runtime.validate import validate_prompt
from ipadapter_nodes.runtime.workflow import load_workflow
from tiny_faces import face_image

REPO = Path(__file__).resolve().parent.parent
ENCODER = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
ADAPTER = "ip-adapter_sd15.safetensors"
PLUS_ADAPTER = "ip-adapter-plus_sd15.safetensors"
FACE_ADAPTER = "ip-adapter-faceid-plus_sd15.bin"
CLASSES = registry.node_classes()

_F = "FLOAT"
_START = (_F, {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001})
_END = (_F, {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001})
_WEIGHT = (_F, {"default": 1.0, "min": -1, "max": 3, "step": 0.05})
_NOISE = (_F, {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01})
_TYPES = (["original", "linear", "channel penalty"],)
_UNFOLD = ("BOOLEAN", {"default": False})
V1_LAYOUTS = {
    "IPAdapterApply": ({"required": {
        "ipadapter": ("IPADAPTER",), "clip_vision": ("CLIP_VISION",), "image": ("IMAGE",), "model": ("MODEL",),
        "weight": _WEIGHT, "noise": _NOISE, "weight_type": _TYPES, "start_at": _START, "end_at": _END,
        "unfold_batch": _UNFOLD}, "optional": {"attn_mask": ("MASK",)}}, ("MODEL",)),
    "IPAdapterApplyFaceID": ({"required": {
        "ipadapter": ("IPADAPTER",), "clip_vision": ("CLIP_VISION",), "insightface": ("INSIGHTFACE",),
        "image": ("IMAGE",), "model": ("MODEL",), "weight": _WEIGHT, "noise": _NOISE, "weight_type": _TYPES,
        "start_at": _START, "end_at": _END, "faceid_v2": ("BOOLEAN", {"default": False}), "weight_v2": _WEIGHT,
        "unfold_batch": _UNFOLD}, "optional": {"attn_mask": ("MASK",)}}, ("MODEL",)),
    "IPAdapterApplyEncoded": ({"required": {
        "ipadapter": ("IPADAPTER",), "embeds": ("EMBEDS",), "model": ("MODEL",), "weight": _WEIGHT,
        "weight_type": _TYPES, "start_at": _START, "end_at": _END, "unfold_batch": _UNFOLD},
        "optional": {"attn_mask": ("MASK",)}}, ("MODEL",)),
    "IPAdapterTilesMasked": ({"required": {
        "ipadapter": ("IPADAPTER",), "clip_vision": ("CLIP_VISION",), "image": ("IMAGE",), "model": ("MODEL",),
        "weight": (_F, {"default": 0.7, "min": -1, "max": 3, "step": 0.05}), "noise": _NOISE,
        "weight_type": _TYPES, "start_at": _START, "end_at": _END,
        "short_side_tiles": ("INT", {"default": 1, "min": 0, "max": 12, "step": 1}),
        "tile_weight": (_F, {"default": 0.6, "min": 0.0, "max": 1.0, "step": 0.05})}}, ("MODEL",)),
    "IPAdapterBatchEmbeds": ({"required": {"embed1": ("EMBEDS",), "embed2": ("EMBEDS",)}}, ("EMBEDS",)),
    "InsightFaceLoader": ({"required": {"provider": (["CPU", "CUDA", "ROCM"],)}}, ("INSIGHTFACE",)),
    "PrepImageForInsightFace": ({"required": {
        "image": ("IMAGE",), "crop_position": (["center", "top", "bottom", "left", "right"],),
        "sharpening": (_F, {"default": 0.0, "min": 0, "max": 1, "step": 0.05}),
        "pad_around": ("BOOLEAN", {"default": True})}}, ("IMAGE",)),
}


def _layout(spec: dict) -> list:
    """INPUT_TYPES as ordered (section, name, declaration) rows: order is part of the v1 file format."""
    return [(section, name, declaration) for section in ("required", "optional")
            for name, declaration in spec.get(section, {}).items()]


@pytest.mark.parametrize("class_type", sorted(V1_LAYOUTS))
def test_legacy_node_declares_the_v1_inputs_in_v1_order_and_v1_outputs(class_type):
    cls = CLASSES[class_type]
    spec, returns = V1_LAYOUTS[class_type]
    assert _layout(cls.INPUT_TYPES()) == _layout(spec)
    assert cls.RETURN_TYPES == returns
    assert cls.CATEGORY == "ipadapter/legacy" and cls.DEPRECATED is True
    assert legacy_nodes.NODE_DISPLAY_NAME_MAPPINGS[class_type].endswith(" (legacy)")


# ---- folders and models ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def layout(tiny_models_dir, tiny_faces_dir, tmp_path_factory):
    """models/ holds tiny adapters under published names and the tiny ViT-H as the real encoder file; the
    tiny checkpoints and InsightFace packs come in through an extra_model_paths.yaml."""
    root = tmp_path_factory.mktemp("legacy")
    models = root / "models"
    (models / "clip_vision").mkdir(parents=True)
    shutil.copyfile(tiny_models_dir / "clip_vision" / "tiny-vit-h.safetensors", models / "clip_vision" / ENCODER)
    make_adapter("sd15", models / "ipadapter" / ADAPTER, seed=21)
    make_adapter("sd15-plus", models / "ipadapter" / PLUS_ADAPTER, seed=22)
    make_adapter("faceid-plus-sd15", models / "ipadapter" / FACE_ADAPTER, seed=23)
    (root / "input").mkdir()
    pixels = np.random.default_rng(5).integers(0, 256, size=(72, 88, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "input" / "reference.png")
    extra = root / "extra_model_paths.yaml"
    extra.write_text(f"tiny:\n  base_path: {tiny_models_dir}\n  checkpoints: checkpoints\n"
                     f"  insightface: {tiny_faces_dir}\n")
    previous = folders.provider()
    configure_folders(models, root / "input", root / "output", extra, root / "temp")
    yield root
    folders.configure(previous)


def _node(class_type: str, **inputs):
    cls = CLASSES[class_type]
    return getattr(cls(), cls.FUNCTION)(**inputs)


@pytest.fixture(scope="module")
def parts(layout):
    """The loaded tiny model, encoder, adapters and a reference image, shared by the node-level tests."""
    model = _node("CheckpointLoaderSimple", ckpt_name="tiny-sd15")[0]
    return {
        "model": model,
        "clip_vision": _node("CLIPVisionLoader", clip_name=ENCODER)[0],
        "adapter": _node("IPAdapterModelLoader", ipadapter_file=ADAPTER)[0],
        "plus": _node("IPAdapterModelLoader", ipadapter_file=PLUS_ADAPTER)[0],
        "face": _node("IPAdapterModelLoader", ipadapter_file=FACE_ADAPTER)[0],
        "image": _node("LoadImage", image="reference.png")[0],
    }


def _only_application(model):
    assert len(model.applications) == 1
    return model.applications[0]


def _same_application(a, b) -> None:
    for field in ("weight", "layer_weights", "uncond_layer_weights", "start_at", "end_at", "embeds_scaling",
                  "unfold_batch", "faceid_v2_weight", "mask_method"):
        assert getattr(a, field) == getattr(b, field), field
    assert a.adapter is b.adapter
    for field in ("cond", "uncond", "clip_cond", "clip_uncond"):
        x, y = getattr(a.embeds, field), getattr(b.embeds, field)
        assert (x is None and y is None) or torch.equal(x, y), field
    assert (a.attn_mask is None and b.attn_mask is None) or torch.equal(a.attn_mask, b.attn_mask)


def _legacy_apply(parts, adapter="adapter", **widgets):
    inputs = {"weight": 0.8, "noise": 0.0, "weight_type": "original", "start_at": 0.1, "end_at": 0.9,
              "unfold_batch": False, **widgets}
    return _node("IPAdapterApply", ipadapter=parts[adapter], clip_vision=parts["clip_vision"],
                 image=parts["image"], model=parts["model"], **inputs)[0]


@pytest.mark.parametrize("weight_type", ["original", "linear", "channel penalty"])
def test_old_weight_type_is_the_embeds_scaling_of_ipadapter_advanced(parts, weight_type):
    expected_scaling = {"original": "V only", "linear": "K+V", "channel penalty": "K+mean(V) w/ C penalty"}
    old = _only_application(_legacy_apply(parts, weight_type=weight_type))
    new = _only_application(_node(
        "IPAdapterAdvanced", model=parts["model"], ipadapter=parts["adapter"], image=parts["image"], weight=0.8,
        weight_type="linear", combine_embeds="concat", start_at=0.1, end_at=0.9,
        embeds_scaling=expected_scaling[weight_type], clip_vision=parts["clip_vision"])[0])
    assert old.embeds_scaling == expected_scaling[weight_type]
    _same_application(old, new)


def test_unknown_old_weight_type_names_the_node_and_the_choices(parts):
    with pytest.raises(ValueError, match=r"IPAdapterApply: weight_type 'ease in'.*original, linear, channel penalty"):
        _legacy_apply(parts, weight_type="ease in")


def test_unfold_batch_is_ipadapter_batch(parts):
    old = _only_application(_legacy_apply(parts, unfold_batch=True, weight_type="linear"))
    new = _only_application(_node(
        "IPAdapterBatch", model=parts["model"], ipadapter=parts["adapter"], image=parts["image"], weight=0.8,
        weight_type="linear", start_at=0.1, end_at=0.9, embeds_scaling="K+V", encode_batch_size=0,
        clip_vision=parts["clip_vision"])[0])
    assert old.unfold_batch is True
    _same_application(old, new)


# ---- noise ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter", ["adapter", "plus"])
def test_noise_is_a_scrambled_reference_as_the_negative_image(parts, adapter):
    noisy = _only_application(_legacy_apply(parts, adapter=adapter, noise=0.4))
    again = _only_application(_legacy_apply(parts, adapter=adapter, noise=0.4))
    plain = _only_application(_legacy_apply(parts, adapter=adapter, noise=0.0))
    negative = noise.make_noise("shuffle", 0.6, 0, image=parts["image"], size=(224, 224), seed=0)
    expected = _only_application(_node(
        "IPAdapterAdvanced", model=parts["model"], ipadapter=parts[adapter], image=parts["image"], weight=0.8,
        weight_type="linear", combine_embeds="concat", start_at=0.1, end_at=0.9, embeds_scaling="V only",
        image_negative=negative, clip_vision=parts["clip_vision"])[0])
    _same_application(noisy, expected)
    assert torch.equal(noisy.embeds.uncond, again.embeds.uncond)          # deterministic
    assert torch.equal(noisy.embeds.cond, plain.embeds.cond)              # only the uncond side changes
    assert (noisy.embeds.uncond - plain.embeds.uncond).abs().max() > 1e-3


def test_more_noise_means_a_negative_closer_to_the_reference_as_in_v1():
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(2))
    base = torch.nn.functional.interpolate(image.movedim(-1, 1), size=(224, 224), mode="bicubic",
                                           antialias=True).clamp(0, 1).movedim(1, -1)
    distances = [(legacy.noise_negative(image, amount) - base).abs().mean().item() for amount in (0.05, 0.5, 1.0)]
    assert legacy.noise_negative(image, 0.0) is None
    assert distances[0] > distances[1] > distances[2]
    assert distances[2] < 1e-6  # noise 1.0: the unscrambled crop


# ---- whole workflows: API and UI format ------------------------------------------------------------------
def _prompt(apply: dict | None) -> dict:
    """API prompt: tiny SD1.5, 64×64, 2 steps; ``apply`` is node 7 (fed by nodes 1, 5, 6, 11) or None."""
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red house", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "LoadImage", "inputs": {"image": "reference.png"}},
        "6": {"class_type": "IPAdapterModelLoader", "inputs": {"ipadapter_file": ADAPTER}},
        "11": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": ENCODER}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["7", 0] if apply else ["1", 0], "seed": 3, "steps": 2, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "legacy"}},
    }
    if apply:
        prompt["7"] = apply
    return prompt


_LINKS = {"ipadapter": ["6", 0], "clip_vision": ["11", 0], "image": ["5", 0], "model": ["1", 0]}
OLD_WIDGETS = {"weight": 2.5, "noise": 0.0, "weight_type": "channel penalty", "start_at": 0.0, "end_at": 1.0,
               "unfold_batch": False}
OLD = {"class_type": "IPAdapterApply", "inputs": {**_LINKS, **OLD_WIDGETS}}
NEW = {"class_type": "IPAdapterAdvanced", "inputs": {
    **_LINKS, "weight": 2.5, "weight_type": "linear", "combine_embeds": "concat", "start_at": 0.0, "end_at": 1.0,
    "embeds_scaling": "K+mean(V) w/ C penalty"}}


def _image(executor: Executor, prompt: dict) -> torch.Tensor:
    return executor.execute(prompt).node_outputs["9"][0]


@pytest.fixture(scope="module")
def images(layout):
    executor = Executor(progress=False)
    return {
        "plain": _image(executor, _prompt(None)),
        "legacy": _image(executor, _prompt(OLD)),
        "advanced": _image(executor, _prompt(NEW)),
        "noise": _image(executor, _prompt({"class_type": "IPAdapterApply",
                                           "inputs": {**OLD["inputs"], "noise": 0.3}})),
    }


def test_legacy_apply_workflow_gives_exactly_the_ipadapter_advanced_image(images):
    assert torch.equal(images["legacy"], images["advanced"])
    assert (images["legacy"] - images["plain"]).abs().max() > 1e-3  # the adapter did something


def test_legacy_apply_with_noise_gives_another_image(images):
    assert (images["noise"] - images["legacy"]).abs().max() > 1e-4


def _ui_node(node_id, kind, widgets=None, inputs=(), outputs=()):
    node = {"id": node_id, "type": kind, "pos": [0, 0], "size": [200, 100], "flags": {}, "order": node_id,
            "mode": 0, "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs],
            "outputs": [{"name": n, "type": t, "links": links} for n, t, links in outputs],
            "properties": {"Node name for S&R": kind}}
    if widgets is not None:
        node["widgets_values"] = widgets
    return node


def _ui_workflow(apply_widgets: list) -> dict:
    """A v1-era UI save (schema 0.4) of the graph of :func:`_prompt` with IPAdapterApply as node 7."""
    nodes = [
        _ui_node(1, "CheckpointLoaderSimple", ["tiny-sd15"],
                 outputs=[("MODEL", "MODEL", [1]), ("CLIP", "CLIP", [2, 3]), ("VAE", "VAE", [4])]),
        _ui_node(2, "CLIPTextEncode", ["a red house"], [("clip", "CLIP", 2)], [("CONDITIONING", "CONDITIONING", [5])]),
        _ui_node(3, "CLIPTextEncode", ["blurry"], [("clip", "CLIP", 3)], [("CONDITIONING", "CONDITIONING", [6])]),
        _ui_node(4, "EmptyLatentImage", [64, 64, 1], outputs=[("LATENT", "LATENT", [7])]),
        _ui_node(5, "LoadImage", ["reference.png", "image"], outputs=[("IMAGE", "IMAGE", [8]), ("MASK", "MASK", [])]),
        _ui_node(6, "IPAdapterModelLoader", [ADAPTER], outputs=[("IPADAPTER", "IPADAPTER", [9])]),
        _ui_node(11, "CLIPVisionLoader", [ENCODER], outputs=[("CLIP_VISION", "CLIP_VISION", [10])]),
        _ui_node(7, "IPAdapterApply", apply_widgets,
                 [("ipadapter", "IPADAPTER", 9), ("clip_vision", "CLIP_VISION", 10), ("image", "IMAGE", 8),
                  ("model", "MODEL", 1), ("attn_mask", "MASK", None)], [("MODEL", "MODEL", [11])]),
        _ui_node(8, "KSampler", [3, "fixed", 2, 5.0, "euler", "normal", 1.0],
                 [("model", "MODEL", 11), ("positive", "CONDITIONING", 5), ("negative", "CONDITIONING", 6),
                  ("latent_image", "LATENT", 7)], [("LATENT", "LATENT", [12])]),
        _ui_node(9, "VAEDecode", None, [("samples", "LATENT", 12), ("vae", "VAE", 4)], [("IMAGE", "IMAGE", [13])]),
        _ui_node(10, "SaveImage", ["legacy"], [("images", "IMAGE", 13)]),
    ]
    links = [[1, 1, 0, 7, 3, "MODEL"], [2, 1, 1, 2, 0, "CLIP"], [3, 1, 1, 3, 0, "CLIP"], [4, 1, 2, 9, 1, "VAE"],
             [5, 2, 0, 8, 1, "CONDITIONING"], [6, 3, 0, 8, 2, "CONDITIONING"], [7, 4, 0, 8, 3, "LATENT"],
             [8, 5, 0, 7, 2, "IMAGE"], [9, 6, 0, 7, 0, "IPADAPTER"], [10, 11, 0, 7, 1, "CLIP_VISION"],
             [11, 7, 0, 8, 0, "MODEL"], [12, 8, 0, 9, 0, "LATENT"], [13, 9, 0, 10, 0, "IMAGE"]]
    return {"last_node_id": 11, "last_link_id": 13, "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {}, "version": 0.4}


def test_v1_ui_save_with_ipadapter_apply_converts_and_runs_like_the_api_prompt(layout, images):
    loaded = load_workflow(_ui_workflow([2.5, 0.0, "channel penalty", 0.0, 1.0, False]), CLASSES,
                           registry.display_names())
    apply = loaded.prompt["7"]
    assert apply["class_type"] == "IPAdapterApply"
    assert apply["inputs"] == {**OLD["inputs"], "model": ["1", 0]}
    assert apply["_meta"]["title"] == "Apply IPAdapter (legacy)"
    checked = validate_prompt(loaded.prompt, CLASSES, loaded.ui_titles)  # what `ipadapter run` checks first
    assert checked.ok and not checked.node_errors, checked.node_errors
    image = _image(Executor(progress=False), loaded.prompt)
    assert torch.equal(image, images["legacy"])


def test_early_v1_save_without_step_range_widgets_gets_the_defaults(layout):
    loaded = load_workflow(_ui_workflow([0.6, 0.2, "linear"]), CLASSES)
    assert loaded.prompt["7"]["inputs"] == {**_LINKS, "weight": 0.6, "noise": 0.2, "weight_type": "linear",
                                            "start_at": 0.0, "end_at": 1.0, "unfold_batch": False}


# ---- the other legacy nodes ------------------------------------------------------------------------------
def test_apply_encoded_is_ipadapter_embeds(parts):
    pos, _ = _node("IPAdapterEncoder", ipadapter=parts["plus"], image=parts["image"], weight=1.0,
                   clip_vision=parts["clip_vision"])
    for unfold, today in ((False, "IPAdapterEmbeds"), (True, "IPAdapterEmbedsBatch")):
        old = _only_application(_node("IPAdapterApplyEncoded", ipadapter=parts["plus"], embeds=pos,
                                      model=parts["model"], weight=0.7, weight_type="linear", start_at=0.0,
                                      end_at=0.5, unfold_batch=unfold)[0])
        new = _only_application(_node(today, model=parts["model"], ipadapter=parts["plus"], pos_embed=pos,
                                      weight=0.7, weight_type="linear", start_at=0.0, end_at=0.5,
                                      embeds_scaling="K+V")[0])
        _same_application(old, new)


def test_batch_embeds_concatenates_like_combine_embeds(parts):
    first, _ = _node("IPAdapterEncoder", ipadapter=parts["adapter"], image=parts["image"], weight=1.0,
                     clip_vision=parts["clip_vision"])
    second, _ = _node("IPAdapterEncoder", ipadapter=parts["adapter"], image=parts["image"].flip(2), weight=0.5,
                      clip_vision=parts["clip_vision"])
    joined = _node("IPAdapterBatchEmbeds", embed1=first, embed2=second)[0]
    expected = _node("IPAdapterCombineEmbeds", embed1=first, method="concat", embed2=second)[0]
    assert joined.count == 2
    assert torch.equal(joined.cond, expected.cond) and torch.equal(joined.uncond, expected.uncond)
    assert torch.equal(joined.cond[1:], second.cond)


@pytest.mark.parametrize("size, tiles, expected", [
    ((100, 110), 1, ([0], [11])),             # a small leftover is split on both sides and left out
    ((100, 150), 1, ([0], [0, 112])),         # a quarter tile or more earns a tile aligned with the far edge
    ((150, 100), 2, ([0, 224, 448], [0, 224])),  # tall: 672 x 448, the long side exactly three tiles
])
def test_masked_tiles_grid(size, tiles, expected):
    height, width = size
    new_h, new_w = legacy.tiled_size(height, width, tiles)
    assert min(new_h, new_w) == 224 * tiles
    assert (legacy.tile_starts(new_h), legacy.tile_starts(new_w)) == expected


def test_masked_tiles_masks_hold_the_tile_weight_and_the_whole_picture_comes_first():
    image = torch.rand(1, 64, 128, 3, generator=torch.Generator().manual_seed(4))
    tiles, masks = legacy.masked_tiles(image, 2, 0.6)
    # 448 x 896: 2 x 4 tiles of 0.6, after the 1 x 2 whole-picture tiles of 1.0 (each half of the picture)
    assert tiles.shape == (10, 224, 224, 3) and masks.shape == (10, 448, 896)
    assert torch.equal(masks[0, :, :448], torch.ones(448, 448)) and masks[0, :, 448:].abs().max() == 0
    assert torch.equal(masks[1, :, 448:], torch.ones(448, 448)) and masks[1, :, :448].abs().max() == 0
    for n, (y, x) in enumerate((y, x) for y in (0, 224) for x in (0, 224, 448, 672)):
        region = torch.zeros(448, 896)
        region[y:y + 224, x:x + 224] = 0.6
        assert torch.equal(masks[2 + n], region)
    single_row, single_masks = legacy.masked_tiles(torch.rand(1, 64, 128, 3), 1, 0.6)
    assert single_row.shape[0] == 2 and single_masks.max() == 1.0  # one row: weight 1.0, no whole-picture tiles


def test_tiles_masked_applies_one_masked_adapter_per_tile(parts):
    common = dict(ipadapter=parts["adapter"], clip_vision=parts["clip_vision"], image=parts["image"],
                  model=parts["model"], weight=0.7, noise=0.0, weight_type="linear", start_at=0.0, end_at=1.0)
    tiled = _node("IPAdapterTilesMasked", short_side_tiles=2, tile_weight=0.5, **common)[0]
    tiles, masks = legacy.masked_tiles(parts["image"], 2, 0.5)
    assert len(tiled.applications) == tiles.shape[0]
    for n, application in enumerate(tiled.applications):
        assert torch.equal(application.attn_mask, masks[n:n + 1])
        assert application.weight == 0.7 and application.embeds_scaling == "K+V"
        expected = _only_application(_node(
            "IPAdapterAdvanced", model=parts["model"], ipadapter=parts["adapter"], image=tiles[n:n + 1], weight=0.7,
            weight_type="linear", combine_embeds="concat", start_at=0.0, end_at=1.0, embeds_scaling="K+V",
            attn_mask=masks[n:n + 1], clip_vision=parts["clip_vision"])[0])
        _same_application(application, expected)
    whole = _only_application(_node("IPAdapterTilesMasked", short_side_tiles=0, tile_weight=0.5, **common)[0])
    _same_application(whole, _only_application(_legacy_apply(parts, weight=0.7, weight_type="linear",
                                                              start_at=0.0, end_at=1.0)))


def test_prep_image_for_insightface_pads_a_580_px_image_with_white():
    image = torch.rand(1, 90, 120, 3, generator=torch.Generator().manual_seed(6))
    padded = _node("PrepImageForInsightFace", image=image, crop_position="left", sharpening=0.2, pad_around=True)[0]
    plain = _node("PrepImageForInsightFace", image=image, crop_position="left", sharpening=0.2, pad_around=False)[0]
    assert padded.shape == plain.shape == (1, 640, 640, 3)
    assert torch.equal(padded[:, 30:610, 30:610], prep_image.prep_image(image, "LANCZOS", "left", 0.2, size=580))
    border = torch.ones_like(padded, dtype=torch.bool)
    border[:, 30:610, 30:610] = False
    assert torch.equal(padded[border], torch.ones(int(border.sum())))
    assert torch.equal(plain, prep_image.prep_image(image, "LANCZOS", "left", 0.2, size=640))


# ---- FaceID ----------------------------------------------------------------------------------------------
def test_insightface_loader_loads_buffalo_l(layout):
    assert _node("InsightFaceLoader", provider="CPU")[0] is faceid.load_insightface("buffalo_l", provider="CPU")


@pytest.mark.parametrize("faceid_v2, weight_type", [(False, "original"), (True, "channel penalty")])
def test_apply_faceid_is_ipadapter_faceid(parts, faceid_v2, weight_type):
    face = face_image(128, seed=3)
    insightface = _node("InsightFaceLoader", provider="CPU")[0]
    common = dict(ipadapter=parts["face"], clip_vision=parts["clip_vision"], insightface=insightface, image=face,
                  model=parts["model"], weight=0.9, weight_type=weight_type, start_at=0.0, end_at=1.0,
                  faceid_v2=faceid_v2, weight_v2=0.6, unfold_batch=False)
    old = _only_application(_node("IPAdapterApplyFaceID", noise=0.0, **common)[0])
    new = _only_application(_node(
        "IPAdapterFaceID", model=parts["model"], ipadapter=parts["face"], image=face, weight=0.9,
        weight_faceidv2=0.6, weight_type="linear", combine_embeds="concat", start_at=0.0, end_at=1.0,
        embeds_scaling=legacy.EMBEDS_SCALING_FOR[weight_type], clip_vision=parts["clip_vision"],
        insightface=insightface)[0])
    assert old.faceid_v2_weight == (0.6 if faceid_v2 else None)
    # v1's faceid_v2 switch is the Plus V2 shortcut that today's node turns on from "plusv2" in the file name
    _same_application(old, dataclasses.replace(new, faceid_v2_weight=old.faceid_v2_weight))
    noisy = _only_application(_node("IPAdapterApplyFaceID", noise=0.5, **common)[0])
    again = _only_application(_node("IPAdapterApplyFaceID", noise=0.5, **common)[0])
    crops = faceid.analyze_faces(insightface, face, crop_size=224).crops
    assert torch.equal(noisy.embeds.clip_uncond, again.embeds.clip_uncond)
    assert torch.equal(noisy.embeds.clip_cond, old.embeds.clip_cond)
    assert (noisy.embeds.clip_uncond - old.embeds.clip_uncond).abs().max() > 1e-3
    scrambled = _only_application(_node(
        "IPAdapterFaceID", model=parts["model"], ipadapter=parts["face"], image=face, weight=0.9,
        weight_faceidv2=0.6, weight_type="linear", combine_embeds="concat", start_at=0.0, end_at=1.0,
        embeds_scaling=legacy.EMBEDS_SCALING_FOR[weight_type], clip_vision=parts["clip_vision"],
        insightface=insightface, image_negative=legacy.noise_negative(crops, 0.5))[0])
    assert torch.equal(noisy.embeds.clip_uncond, scrambled.embeds.clip_uncond)


# ---- the node reference stays true -----------------------------------------------------------------------
def test_nodes_md_is_what_the_generator_writes_today():
    spec = importlib.util.spec_from_file_location("gen_nodes_md", REPO / "tools" / "gen_nodes_md.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    written = (REPO / "docs" / "NODES.md").read_text(encoding="utf-8")
    assert written == generator.render(), "docs/NODES.md is stale: run `python tools/gen_nodes_md.py`"
    for class_type in CLASSES:  # every node the headless runtime knows is documented
        assert f"#### `{class_type}`" in written
