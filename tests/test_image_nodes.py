"""Headless image nodes: LoadImage, SaveImage, PreviewImage, ImageScale, ImageBatch."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter_nodes.core import folders
from ipadapter_nodes.runtime.standard_nodes import image as nodes


def rgba_file(path, alpha_value=64):
    pixels = np.zeros((6, 10, 4), np.uint8)
    pixels[..., 0] = 200
    pixels[..., 3] = 255
    pixels[:3, :, 3] = alpha_value  # top half mostly transparent
    Image.fromarray(pixels, "RGBA").save(path)


# ---- LoadImage ------------------------------------------------------------------------------------------
def test_load_image_gives_rgb_and_mask_is_one_minus_alpha(dirs):
    rgba_file(os.path.join(dirs.input_dir, "a.png"))
    image, mask = nodes.LoadImage().load_image("a.png")
    assert image.shape == (1, 6, 10, 3) and image.dtype == torch.float32
    assert torch.allclose(image[..., 0], torch.full((1, 6, 10), 200 / 255))
    assert mask.shape == (1, 6, 10)
    assert torch.allclose(mask[0, :3], torch.full((3, 10), 1 - 64 / 255))
    assert torch.equal(mask[0, 3:], torch.zeros(3, 10))


def test_load_image_without_alpha_gives_an_empty_64x64_mask(dirs):
    Image.new("RGB", (20, 12), (10, 20, 30)).save(os.path.join(dirs.input_dir, "rgb.png"))
    image, mask = nodes.LoadImage().load_image("rgb.png")
    assert image.shape == (1, 12, 20, 3)
    assert torch.allclose(image[0, 0, 0], torch.tensor([10, 20, 30]) / 255.0)
    assert torch.equal(mask, torch.zeros(1, 64, 64))


def test_animated_image_gives_one_batch_entry_per_frame(dirs):
    frames = [Image.new("RGB", (8, 8), (v, v, v)) for v in (0, 120, 240)]
    frames[0].save(os.path.join(dirs.input_dir, "anim.gif"), save_all=True, append_images=frames[1:])
    image, _ = nodes.LoadImage().load_image("anim.gif")
    assert image.shape == (3, 8, 8, 3)
    assert [round(float(image[i].mean()) * 255) for i in range(3)] == [0, 120, 240]


def test_exif_orientation_is_applied(dirs):
    img = Image.new("RGB", (4, 2), (0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0))  # red top-left pixel as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display rotated 90° clockwise
    img.save(os.path.join(dirs.input_dir, "rot.png"), exif=exif)
    image, _ = nodes.LoadImage().load_image("rot.png")
    assert image.shape == (1, 4, 2, 3)
    assert torch.equal(image[0, 0, 1], torch.tensor([1.0, 0.0, 0.0]))  # now top-right


def test_input_list_holds_top_level_images_only(dirs):
    rgba_file(os.path.join(dirs.input_dir, "b.png"))
    Image.new("RGB", (2, 2)).save(os.path.join(dirs.input_dir, "a.jpg"))
    open(os.path.join(dirs.input_dir, "notes.txt"), "w").close()
    os.makedirs(os.path.join(dirs.input_dir, "sub"))
    Image.new("RGB", (2, 2)).save(os.path.join(dirs.input_dir, "sub", "c.png"))
    options, opts = nodes.LoadImage.INPUT_TYPES()["required"]["image"]
    assert options == ["a.jpg", "b.png"] and opts == {"image_upload": True}


@pytest.mark.parametrize("name", ["../secret.png", "sub/../../secret.png"])
def test_names_leaving_the_input_folder_are_refused(dirs, tmp_path, name):
    rgba_file(tmp_path / "secret.png")
    message = nodes.LoadImage.VALIDATE_INPUTS(image=name)
    assert isinstance(message, str) and "outside" in message and name in message
    with pytest.raises(folders.PathOutsideFolderError):
        nodes.LoadImage().load_image(name)


def test_absolute_paths_and_escaping_links_are_refused(dirs, tmp_path):
    secret = tmp_path / "secret.png"
    rgba_file(secret)
    os.symlink(secret, os.path.join(dirs.input_dir, "link.png"))
    for name in (str(secret), "link.png"):
        assert "outside" in nodes.LoadImage.VALIDATE_INPUTS(image=name)
        with pytest.raises(folders.PathOutsideFolderError):
            nodes.LoadImage().load_image(name)


def test_validate_reports_a_missing_file_and_accepts_an_existing_one(dirs):
    message = nodes.LoadImage.VALIDATE_INPUTS(image="missing.png")
    assert isinstance(message, str) and "missing.png" in message and "not found" in message
    rgba_file(os.path.join(dirs.input_dir, "here.png"))
    assert nodes.LoadImage.VALIDATE_INPUTS(image="here.png") is True


def test_is_changed_follows_the_file_content(dirs):
    path = os.path.join(dirs.input_dir, "x.png")
    rgba_file(path, alpha_value=10)
    first = nodes.LoadImage.IS_CHANGED(image="x.png")
    assert nodes.LoadImage.IS_CHANGED(image="x.png") == first
    rgba_file(path, alpha_value=11)
    assert nodes.LoadImage.IS_CHANGED(image="x.png") != first


# ---- SaveImage / PreviewImage ---------------------------------------------------------------------------
def test_two_saves_get_consecutive_numbers_and_never_overwrite(dirs):
    images = torch.rand(1, 8, 8, 3)
    first = nodes.SaveImage().save_images(images, "ComfyUI")
    second = nodes.SaveImage().save_images(images, "ComfyUI")
    assert first == {"ui": {"images": [{"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}]}}
    assert second["ui"]["images"][0]["filename"] == "ComfyUI_00002_.png"
    assert sorted(os.listdir(dirs.output_dir)) == ["ComfyUI_00001_.png", "ComfyUI_00002_.png"]


def test_counter_continues_the_highest_existing_file_and_a_batch_counts_up(dirs):
    open(os.path.join(dirs.output_dir, "img_00007_.png"), "wb").close()
    out = nodes.SaveImage().save_images(torch.rand(2, 8, 8, 3), "img")
    assert [i["filename"] for i in out["ui"]["images"]] == ["img_00008_.png", "img_00009_.png"]


def test_an_existing_file_at_the_chosen_name_is_skipped_not_overwritten(dirs, monkeypatch):
    taken = os.path.join(dirs.output_dir, "ComfyUI_00001_.png")
    with open(taken, "wb") as f:
        f.write(b"precious")
    real = nodes.save_target
    # another process created the file after the counter was chosen
    monkeypatch.setattr(nodes, "save_target", lambda *a: (*real(*a)[:3], 1))
    out = nodes.SaveImage().save_images(torch.rand(1, 8, 8, 3), "ComfyUI")
    assert out["ui"]["images"][0]["filename"] == "ComfyUI_00002_.png"
    with open(taken, "rb") as f:
        assert f.read() == b"precious"


def test_without_hard_links_an_existing_file_is_still_never_overwritten(dirs, monkeypatch):
    def no_links(src, dst):
        raise PermissionError("hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    taken = os.path.join(dirs.output_dir, "ComfyUI_00001_.png")
    with open(taken, "wb") as f:
        f.write(b"precious")
    real = nodes.save_target
    monkeypatch.setattr(nodes, "save_target", lambda *a: (*real(*a)[:3], 1))
    out = nodes.SaveImage().save_images(torch.rand(1, 8, 8, 3), "ComfyUI")
    assert out["ui"]["images"][0]["filename"] == "ComfyUI_00002_.png"
    with open(taken, "rb") as f:
        assert f.read() == b"precious"
    with Image.open(os.path.join(dirs.output_dir, "ComfyUI_00002_.png")) as png:
        assert png.size == (8, 8)
    assert sorted(os.listdir(dirs.output_dir)) == ["ComfyUI_00001_.png", "ComfyUI_00002_.png"]


def test_png_holds_prompt_and_workflow_text_chunks_and_the_pixels(dirs):
    prompt = {"3": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}}}
    workflow = {"nodes": [{"id": 3, "type": "SaveImage"}], "version": 0.4}
    images = torch.rand(1, 5, 7, 3)
    nodes.SaveImage().save_images(images, "meta", prompt=prompt, extra_pnginfo={"workflow": workflow})
    with Image.open(os.path.join(dirs.output_dir, "meta_00001_.png")) as png:
        assert png.text["prompt"] == json.dumps(prompt)
        assert json.loads(png.text["workflow"]) == workflow
        saved = np.asarray(png.convert("RGB"))
    assert np.array_equal(saved, np.clip(255.0 * images[0].numpy(), 0, 255).astype(np.uint8))


def test_an_interrupted_write_leaves_no_file(dirs, monkeypatch):
    def interrupted_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        nodes.SaveImage().save_images(torch.rand(1, 8, 8, 3), "ComfyUI")
    assert os.listdir(dirs.output_dir) == []


def test_subfolders_are_allowed_but_never_outside_the_output_folder(dirs, tmp_path):
    out = nodes.SaveImage().save_images(torch.rand(1, 4, 4, 3), "run1/shot")
    assert out["ui"]["images"][0] == {"filename": "shot_00001_.png", "subfolder": "run1", "type": "output"}
    assert os.path.isfile(os.path.join(dirs.output_dir, "run1", "shot_00001_.png"))
    for prefix in ("../escape", "run1/../../escape", str(tmp_path / "abs")):
        with pytest.raises(folders.PathOutsideFolderError, match="outside the output folder"):
            nodes.SaveImage().save_images(torch.rand(1, 4, 4, 3), prefix)
    written = [name for _, _, names in os.walk(tmp_path) for name in names]
    assert written == ["shot_00001_.png"]


def test_prefix_expands_width_and_height(dirs):
    out = nodes.SaveImage().save_images(torch.rand(1, 6, 9, 3), "s_%width%x%height%")
    assert out["ui"]["images"][0]["filename"] == "s_9x6_00001_.png"


def test_preview_writes_to_the_temp_folder(dirs):
    out = nodes.PreviewImage().save_images(torch.rand(1, 4, 4, 3))
    entry = out["ui"]["images"][0]
    assert entry["type"] == "temp" and entry["filename"].startswith("ComfyUI_temp_")
    assert os.path.isfile(os.path.join(dirs.temp_dir, entry["filename"]))
    assert os.listdir(dirs.output_dir) == []
    assert nodes.PreviewImage.OUTPUT_NODE and nodes.SaveImage.OUTPUT_NODE


# ---- ImageScale / ImageBatch ----------------------------------------------------------------------------
def test_image_scale_with_zero_width_keeps_the_aspect_ratio():
    (out,) = nodes.ImageScale().upscale(torch.rand(1, 64, 128, 3), "bilinear", 0, 32, "disabled")
    assert out.shape == (1, 32, 64, 3)
    (out,) = nodes.ImageScale().upscale(torch.rand(1, 60, 90, 3), "area", 30, 0, "disabled")
    assert out.shape == (1, 20, 30, 3)
    image = torch.rand(1, 5, 5, 3)
    assert nodes.ImageScale().upscale(image, "bicubic", 0, 0, "disabled")[0] is image


def test_image_scale_area_averages_and_centre_crop_keeps_the_middle():
    image = torch.zeros(1, 4, 12, 3)
    image[:, :, 4:8] = 1.0  # white middle third
    (area,) = nodes.ImageScale().upscale(image, "area", 3, 1, "disabled")
    assert torch.allclose(area[0, 0, :, 0], torch.tensor([0.0, 1.0, 0.0]))
    (cropped,) = nodes.ImageScale().upscale(image, "nearest-exact", 4, 4, "center")
    assert torch.equal(cropped, torch.ones(1, 4, 4, 3))


@pytest.mark.parametrize("method", nodes.UPSCALE_METHODS)
def test_every_upscale_method_gives_the_size_and_stays_in_range(method):
    (out,) = nodes.ImageScale().upscale(torch.rand(2, 10, 14, 3), method, 21, 15, "disabled")
    assert out.shape == (2, 15, 21, 3)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_image_batch_resizes_the_second_image_to_the_first():
    first, second = torch.rand(1, 8, 8, 3), torch.full((2, 16, 32, 3), 0.25)
    (batch,) = nodes.ImageBatch().batch(first, second)
    assert batch.shape == (3, 8, 8, 3)
    assert torch.equal(batch[0], first[0])
    assert torch.allclose(batch[1:], torch.full((2, 8, 8, 3), 0.25))
