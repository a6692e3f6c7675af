"""Headless mask nodes with ComfyUI's names and numbers (runtime/standard_nodes/masks.py)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter_nodes.core import folders
from ipadapter_nodes.runtime.standard_nodes import NODE_CLASS_MAPPINGS
from ipadapter_nodes.runtime.standard_nodes import masks as nodes


def close(actual: torch.Tensor, expected) -> None:
    """``actual`` equals the hand-computed numbers (float32 rounding aside)."""
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=1e-6, atol=1e-7)


def test_nodes_are_registered_with_comfyui_inputs_and_widget_order():
    expected = {
        "LoadImageMask": ["image", "channel"],
        "SolidMask": ["value", "width", "height"],
        "InvertMask": ["mask"],
        "MaskComposite": ["destination", "source", "x", "y", "operation"],
        "ImageToMask": ["image", "channel"],
        "MaskToImage": ["mask"],
        "GrowMask": ["mask", "expand", "tapered_corners"],
        "FeatherMask": ["mask", "left", "top", "right", "bottom"],
    }
    for name, inputs in expected.items():
        cls = NODE_CLASS_MAPPINGS[name]
        assert list(cls.INPUT_TYPES()["required"]) == inputs, name
        assert cls.CATEGORY == "mask"
    assert NODE_CLASS_MAPPINGS["MaskToImage"].RETURN_TYPES == ("IMAGE",)
    assert nodes.SolidMask.INPUT_TYPES()["required"]["value"][1]["default"] == 1.0
    assert nodes.GrowMask.INPUT_TYPES()["required"]["tapered_corners"][1]["default"] is True
    assert nodes.LoadImageMask.INPUT_TYPES()["required"]["channel"][0] == ["alpha", "red", "green", "blue"]
    assert nodes.ImageToMask.INPUT_TYPES()["required"]["channel"][0] == ["red", "green", "blue", "alpha"]
    assert nodes.MaskComposite.INPUT_TYPES()["required"]["operation"][0] == [
        "multiply", "add", "subtract", "and", "or", "xor"]


# ---- SolidMask, InvertMask, ImageToMask, MaskToImage ----------------------------------------------------
def test_solid_mask_is_one_mask_of_the_value():
    (out,) = nodes.SolidMask().solid(0.25, width=3, height=2)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.full((1, 2, 3), 0.25))


def test_invert_mask_is_one_minus_the_mask():
    (out,) = nodes.InvertMask().invert(torch.tensor([[[0.0, 0.25], [1.0, 0.5]]]))
    assert out.tolist() == [[[1.0, 0.75], [0.0, 0.5]]]


def test_image_to_mask_picks_the_channel():
    image = torch.tensor([[[[0.1, 0.2, 0.3, 0.9]]]])  # [1,1,1,4] RGBA
    picks = {c: nodes.ImageToMask().image_to_mask(image, c)[0].item() for c in ("red", "green", "blue", "alpha")}
    assert picks == pytest.approx({"red": 0.1, "green": 0.2, "blue": 0.3, "alpha": 0.9})


def test_image_to_mask_alpha_of_an_rgb_image_is_a_clear_error():
    with pytest.raises(ValueError, match="channel 'alpha' needs an IMAGE with 4 channels, but the image has 3"):
        nodes.ImageToMask().image_to_mask(torch.zeros(1, 2, 2, 3), "alpha")


def test_mask_to_image_repeats_the_mask_in_three_channels():
    mask = torch.tensor([[0.0, 0.5], [1.0, 0.25]])  # a bare [H,W] mask is accepted
    (image,) = nodes.MaskToImage().mask_to_image(mask)
    assert image.shape == (1, 2, 2, 3)
    for c in range(3):
        assert torch.equal(image[0, :, :, c], mask)


# ---- MaskComposite ---------------------------------------------------------------------------------------
def _composite(dst, src, x, y, op):
    return nodes.MaskComposite().combine(dst, src, x, y, op)[0]


def test_composite_multiply_add_subtract_at_an_offset():
    dst = torch.full((1, 3, 4), 0.5)
    src = torch.full((1, 2, 2), 0.8)
    mult = _composite(dst, src, 1, 1, "multiply")
    close(mult, [[[0.5, 0.5, 0.5, 0.5], [0.5, 0.4, 0.4, 0.5], [0.5, 0.4, 0.4, 0.5]]])
    add = _composite(dst, src, 2, 0, "add")  # clamped to 1
    assert add.tolist() == [[[0.5, 0.5, 1.0, 1.0], [0.5, 0.5, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]]]
    sub = _composite(dst, src, 0, 0, "subtract")  # clamped to 0
    assert sub.tolist() == [[[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]]]


def test_composite_logic_operations_round_both_masks_first():
    dst = torch.tensor([[[0.4, 0.6, 0.4, 0.6]]])
    src = torch.tensor([[[0.4, 0.4, 0.6, 0.6]]])
    assert _composite(dst, src, 0, 0, "and").tolist() == [[[0.0, 0.0, 0.0, 1.0]]]
    assert _composite(dst, src, 0, 0, "or").tolist() == [[[0.0, 1.0, 1.0, 1.0]]]
    assert _composite(dst, src, 0, 0, "xor").tolist() == [[[0.0, 1.0, 1.0, 0.0]]]


def test_composite_source_crossing_or_past_the_edge():
    dst = torch.zeros(1, 2, 3)
    src = torch.ones(1, 2, 2)
    assert _composite(dst, src, 2, 1, "add").tolist() == [[[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]]
    untouched = torch.tensor([[[0.2, 1.5, -0.5]]])
    close(_composite(untouched, src, 5, 0, "add"), [[[0.2, 1.0, 0.0]]])  # only the clamp


def test_composite_with_mismatching_batches_is_a_clear_error():
    with pytest.raises(ValueError, match="source has 2 masks and the destination 3"):
        _composite(torch.zeros(3, 4, 4), torch.zeros(2, 4, 4), 0, 0, "add")


# ---- GrowMask ---------------------------------------------------------------------------------------------
def _dot(size=7):
    mask = torch.zeros(1, size, size)
    mask[0, size // 2, size // 2] = 1.0
    return mask


def _grow(mask, expand, tapered):
    return nodes.GrowMask().expand_mask(mask, expand, tapered)[0]


def test_grow_with_tapered_corners_grows_a_diamond_and_without_a_square():
    plus = _grow(_dot(), 1, True)[0]
    assert plus.sum().item() == 5
    assert plus[2:5, 2:5].tolist() == [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    assert _grow(_dot(), 1, False)[0][2:5, 2:5].tolist() == [[1, 1, 1]] * 3
    assert _grow(_dot(), 1, False).sum().item() == 9
    assert _grow(_dot(), 2, True).sum().item() == 13  # diamond of radius 2
    assert _grow(_dot(), 2, False).sum().item() == 25  # 5x5 square


def test_shrink_erodes_and_the_border_is_not_treated_as_empty():
    block = torch.zeros(1, 7, 7)
    block[0, 1:6, 1:6] = 1.0
    eroded = _grow(block, -1, True)
    assert eroded.sum().item() == 9 and eroded[0, 2:5, 2:5].min().item() == 1.0
    diamond = _grow(_dot(), 2, True)
    assert _grow(diamond, -1, False).sum().item() == 1  # only the centre has all 8 neighbours
    assert _grow(diamond, -1, True).sum().item() == 5  # the cross keeps the inner diamond
    full = torch.ones(1, 4, 5)
    assert torch.equal(_grow(full, -2, False), full)  # edges replicate, they do not erode from outside


def test_grow_takes_the_neighbourhood_max_of_grey_values():
    row = torch.tensor([[[0.2, 0.7, 0.1, 0.0]]])
    close(_grow(row, 1, True), [[[0.7, 0.7, 0.7, 0.1]]])
    close(_grow(row, -1, True), [[[0.2, 0.1, 0.0, 0.0]]])
    assert torch.equal(_grow(row, 0, True), row)


# ---- FeatherMask ------------------------------------------------------------------------------------------
def _feather(mask, left, top, right, bottom):
    return nodes.FeatherMask().feather(mask, left, top, right, bottom)[0]


def test_feather_left_and_top_ramp_linearly():
    out = _feather(torch.ones(1, 3, 4), 2, 0, 0, 0)
    assert out[0, 0].tolist() == [0.5, 1.0, 1.0, 1.0]
    out = _feather(torch.ones(1, 4, 2), 0, 4, 0, 0)
    assert out[0, :, 0].tolist() == [0.25, 0.5, 0.75, 1.0]


def test_feather_right_and_bottom_reproduce_comfyuis_index_quirk():
    # ComfyUI scales index -i by (i+1)/n; -0 is index 0, so the first factor lands on the opposite edge.
    out = _feather(torch.ones(1, 1, 6), 0, 0, 3, 0)
    assert out[0, 0].tolist() == pytest.approx([1 / 3, 1.0, 1.0, 1.0, 1.0, 2 / 3])
    out = _feather(torch.ones(1, 4, 1), 0, 0, 0, 2)
    assert out[0, :, 0].tolist() == pytest.approx([0.5, 1.0, 1.0, 1.0])


def test_feather_all_edges_multiply_and_sizes_are_clamped():
    out = _feather(torch.ones(1, 3, 6), 2, 1, 3, 0)
    assert out[0, 0].tolist() == pytest.approx([0.5 / 3, 1.0, 1.0, 1.0, 1.0, 2 / 3])
    clamped = _feather(torch.ones(1, 2, 2), 10, 0, 0, 0)  # left clamps to the width 2
    assert clamped[0].tolist() == [[0.5, 1.0], [0.5, 1.0]]


# ---- LoadImageMask -----------------------------------------------------------------------------------------
def _rgba_file(path):
    pixels = np.zeros((2, 3, 4), np.uint8)
    pixels[..., 0] = [[255, 0, 51], [0, 0, 0]]
    pixels[..., 1] = 102
    pixels[..., 2] = 0
    pixels[..., 3] = [[255, 0, 255], [51, 255, 255]]
    Image.fromarray(pixels, "RGBA").save(path)


def test_load_image_mask_picks_a_channel_and_inverts_alpha(dirs):
    _rgba_file(os.path.join(dirs.input_dir, "m.png"))
    load = nodes.LoadImageMask().load_image
    (red,) = load("m.png", "red")
    assert red.shape == (1, 2, 3)
    close(red[0], [[1.0, 0.0, 0.2], [0.0, 0.0, 0.0]])
    assert load("m.png", "green")[0].unique().tolist() == pytest.approx([0.4])
    close(load("m.png", "alpha")[0][0], [[0.0, 1.0, 0.0], [0.8, 0.0, 0.0]])


def test_load_image_mask_of_an_image_without_alpha(dirs):
    Image.fromarray(np.full((2, 2), 153, np.uint8), "L").save(os.path.join(dirs.input_dir, "gray.png"))
    load = nodes.LoadImageMask().load_image
    assert torch.equal(load("gray.png", "alpha")[0], torch.zeros(1, 2, 2))  # opaque: 1 - 1
    assert load("gray.png", "blue")[0].unique().tolist() == pytest.approx([0.6])


@pytest.mark.parametrize("name", ["../secret.png", "sub/../../secret.png"])
def test_load_image_mask_refuses_names_outside_the_input_folder(dirs, tmp_path, name):
    _rgba_file(tmp_path / "secret.png")
    with pytest.raises(folders.PathOutsideFolderError, match="outside its folder"):
        nodes.LoadImageMask().load_image(name, "red")
    assert "outside its folder" in nodes.LoadImageMask.VALIDATE_INPUTS(name)


def test_load_image_mask_lists_input_files_and_validates_existence(dirs):
    _rgba_file(os.path.join(dirs.input_dir, "b.png"))
    _rgba_file(os.path.join(dirs.input_dir, "a.png"))
    os.makedirs(os.path.join(dirs.input_dir, "folder"))
    assert nodes.LoadImageMask.INPUT_TYPES()["required"]["image"][0] == ["a.png", "b.png"]
    assert nodes.LoadImageMask.VALIDATE_INPUTS("a.png") is True
    assert "not found" in nodes.LoadImageMask.VALIDATE_INPUTS("missing.png")


# ---- in a workflow ----------------------------------------------------------------------------------------
def test_a_mask_chain_validates_and_runs_headless(dirs):
    from ipadapter_nodes.runtime.executor import Executor
    from ipadapter_nodes.runtime.registry import node_classes
    from ipadapter_nodes.runtime.validate import validate_prompt

    _rgba_file(os.path.join(dirs.input_dir, "m.png"))
    prompt = {
        "1": {"class_type": "LoadImageMask", "inputs": {"image": "m.png", "channel": "red"}},
        "2": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 4, "height": 3}},
        "3": {"class_type": "MaskComposite",
              "inputs": {"destination": ["2", 0], "source": ["1", 0], "x": 1, "y": 1, "operation": "add"}},
        "4": {"class_type": "InvertMask", "inputs": {"mask": ["3", 0]}},
        "5": {"class_type": "MaskToImage", "inputs": {"mask": ["4", 0]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "mask"}},
    }
    classes = node_classes()
    checked = validate_prompt(prompt, classes)
    assert checked.ok, checked.node_errors
    result = Executor(classes, progress=False).execute(checked.coerced)
    inverted = result.node_outputs["4"][0]
    # red channel [[1, 0, .2], [0, 0, 0]] placed at (1, 1) on a 3x4 zero mask, then inverted
    close(inverted, [[[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 1.0, 0.8], [1.0, 1.0, 1.0, 1.0]]])
    assert os.listdir(dirs.output_dir)
