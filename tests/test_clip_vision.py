"""CLIP vision encoding (core/encode.py) and the CLIPVisionLoader / CLIPVisionEncode nodes."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ipadapter_nodes.core import encode, folders
from ipadapter_nodes.runtime.standard_nodes import clip_vision as nodes
from ipadapter_nodes.runtime.tiny import TINY_CLIP_VISION

STD = torch.tensor(encode.CLIP_STD).view(1, 3, 1, 1)
MEAN = torch.tensor(encode.CLIP_MEAN).view(1, 3, 1, 1)
FIELDS = ("image_embeds", "last_hidden_state", "penultimate_hidden_states")


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """An 8-bit RGB image without sharp edges, so bicubic resizing does not overshoot 0..255."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, 6, 6, generator=g)
    img = torch.nn.functional.interpolate(base, size=(height, width), mode="bilinear", align_corners=False)
    return (img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def as_image(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).float().div(255.0).unsqueeze(0)


def in_levels(diff: torch.Tensor) -> torch.Tensor:
    """A pixel_values difference expressed in 8-bit levels of the input image."""
    return diff * STD * 255.0


def clip_processor(**kwargs):
    from transformers import CLIPImageProcessor

    options = dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
                   do_center_crop=True, image_mean=list(encode.CLIP_MEAN), image_std=list(encode.CLIP_STD))
    options.update(kwargs)
    return CLIPImageProcessor(**options)


@pytest.fixture
def clip_dir(tiny_models_dir):
    return tiny_models_dir / "clip_vision"


@pytest.fixture
def layout(tiny_models_dir, tmp_path):
    saved = folders._provider
    folders.configure(folders.FolderLayout(models_dirs=[str(tiny_models_dir)], input_dir=str(tmp_path / "in"),
                                           output_dir=str(tmp_path / "out"), temp_dir=str(tmp_path / "tmp")))
    yield
    folders._provider = saved


# ---- preprocessing --------------------------------------------------------------------------------------
# CLIPImageProcessor resizes in PIL on 8-bit data (two passes, each rounded to 8 bits); we resize in float
# and round once, as ComfyUI does.  Both use the same antialiased bicubic filter (a=-0.5), so on images
# that do not overshoot the results differ by at most one 8-bit level per pixel.
@pytest.mark.parametrize("height,width", [(64, 96), (320, 480), (96, 64)])
def test_preprocess_matches_clip_image_processor_within_one_8bit_level(height, width):
    array = smooth_image(height, width)
    ours = encode.preprocess_image(as_image(array))
    ref = clip_processor()(images=Image.fromarray(array), return_tensors="pt").pixel_values
    assert ours.shape == ref.shape == (1, 3, 224, 224)
    levels = in_levels((ours - ref).abs())
    assert float(levels.max()) <= 1.0 + 1e-3
    assert float(levels.mean()) < 0.25


def test_preprocess_rounds_to_8bit_levels_and_normalizes():
    pixels = encode.preprocess_image(torch.rand(2, 50, 70, 3))
    values = (pixels * STD + MEAN) * 255.0
    assert torch.allclose(values, values.round(), atol=1e-3)
    assert float(values.min()) >= -1e-3 and float(values.max()) <= 255.0 + 1e-3


def test_preprocess_leaves_224_square_untouched_except_rounding_and_drops_alpha():
    image = torch.rand(1, 224, 224, 4)
    pixels = encode.preprocess_image(image)
    expected = ((image[..., :3] * 255).round() / 255).permute(0, 3, 1, 2)
    assert torch.allclose(pixels * STD + MEAN, expected, atol=1e-6)


def test_crop_false_squashes_the_whole_image_and_crop_true_keeps_the_centre():
    bands = np.zeros((64, 192, 3), np.uint8)  # red | green | blue thirds
    bands[:, :64, 0] = bands[:, 64:128, 1] = bands[:, 128:, 2] = 255
    cropped = encode.preprocess_image(as_image(bands), crop=True) * STD + MEAN
    squashed = encode.preprocess_image(as_image(bands), crop=False) * STD + MEAN
    assert torch.allclose(cropped[0, :, :, 100:124], torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1), atol=1e-6)
    # no red or blue left, except the bicubic blur of the band edges in the outermost columns
    assert float(cropped[0, 0, :, 8:-8].max()) < 0.05 and float(cropped[0, 2, :, 8:-8].max()) < 0.05
    assert torch.allclose(squashed[0, :, :, :70], torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1), atol=1e-6)
    assert torch.allclose(squashed[0, :, :, -70:], torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1), atol=1e-6)


def test_crop_false_matches_clip_image_processor_squash_within_one_level():
    array = smooth_image(96, 160, seed=3)
    ours = encode.preprocess_image(as_image(array), crop=False)
    ref = clip_processor(size={"height": 224, "width": 224}, do_center_crop=False)(
        images=Image.fromarray(array), return_tensors="pt").pixel_values
    assert float(in_levels((ours - ref).abs()).max()) <= 1.0 + 1e-3


# ---- encoding -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vit-h", "vit-bigG"])
def test_encode_gives_257_tokens_and_projection_width(clip_dir, name):
    clip = encode.load_clip_vision(clip_dir / f"tiny-{name}")
    widths = TINY_CLIP_VISION[name]
    out = clip.encode(torch.rand(2, 64, 80, 3))
    assert out.image_embeds.shape == (2, widths["projection_dim"])
    assert out.last_hidden_state.shape == (2, 257, widths["hidden_size"])
    assert out.penultimate_hidden_states.shape == (2, 257, widths["hidden_size"])
    assert (clip.hidden_size, clip.projection_dim, clip.image_size) == (
        widths["hidden_size"], widths["projection_dim"], 224)


def test_outputs_equal_transformers_fields_and_hidden_states_minus_2(clip_dir):
    clip = encode.load_clip_vision(clip_dir / "tiny-vit-h")
    pixels = clip.preprocess(torch.rand(1, 64, 64, 3))
    with torch.no_grad():
        ref = clip.model(pixel_values=pixels, output_hidden_states=True)
        # the input of the last encoder layer, computed by hand: hidden_states[-2] must be exactly this
        vision = clip.model.vision_model
        hidden = vision.pre_layrnorm(vision.embeddings(pixels))
        for layer in vision.encoder.layers[:-1]:
            hidden = layer(hidden, None)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    out = clip.encode_pixels(pixels)
    assert torch.equal(out.penultimate_hidden_states, ref.hidden_states[-2])
    assert torch.allclose(out.penultimate_hidden_states, hidden, atol=1e-6)
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state)  # before post_layernorm, like ComfyUI
    assert torch.equal(out.image_embeds, ref.image_embeds)
    assert not torch.allclose(out.penultimate_hidden_states, out.last_hidden_state)


def test_single_file_and_folder_give_identical_outputs(clip_dir):
    folder = encode.load_clip_vision(clip_dir / "tiny-vit-bigG")
    single = encode.load_clip_vision(clip_dir / "tiny-vit-bigG.safetensors")
    image = torch.rand(2, 72, 60, 3)
    a, b = folder.encode(image), single.encode(image)
    for field in FIELDS:
        assert torch.equal(a[field], b[field]), field


def test_openclip_naming_loads_to_the_same_encoder(clip_dir, tmp_path):
    sd = load_file(clip_dir / "tiny-vit-h.safetensors")
    layers = TINY_CLIP_VISION["vit-h"]["num_hidden_layers"]
    top = {"vision_model.embeddings.class_embedding": "class_embedding",
           "vision_model.embeddings.patch_embedding.weight": "conv1.weight",
           "vision_model.embeddings.position_embedding.weight": "positional_embedding",
           "vision_model.pre_layrnorm.weight": "ln_pre.weight", "vision_model.pre_layrnorm.bias": "ln_pre.bias",
           "vision_model.post_layernorm.weight": "ln_post.weight", "vision_model.post_layernorm.bias": "ln_post.bias"}
    openclip = {"visual." + v: sd[k] for k, v in top.items()}
    openclip["visual.proj"] = sd["visual_projection.weight"].t().contiguous()
    for i in range(layers):
        src, dst = f"vision_model.encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            openclip[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [sd[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                         ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                openclip[dst + f"{b}.{kind}"] = sd[src + f"{a}.{kind}"]
    # an OpenCLIP text tower beside it (unprefixed resblocks, listed first) is ignored
    openclip = {"transformer.resblocks.0.attn.in_proj_weight": torch.zeros(12, 4),
                "token_embedding.weight": torch.zeros(4, 4), **openclip}
    path = tmp_path / "open_clip_vit_h.safetensors"
    # heads cannot be read from shapes; real files have public widths (known heads), the tiny one says it
    save_file(openclip, str(path), metadata={"num_attention_heads": str(TINY_CLIP_VISION["vit-h"]["num_attention_heads"]),
                                              "hidden_act": "gelu"})
    image = torch.rand(1, 64, 64, 3)
    ref = encode.load_clip_vision(clip_dir / "tiny-vit-h").encode(image)
    out = encode.load_clip_vision(path).encode(image)
    for field in FIELDS:
        assert torch.equal(out[field], ref[field]), field


def test_config_is_inferred_from_shapes_not_the_file_name(clip_dir, tmp_path):
    misleading = tmp_path / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
    shutil.copy(clip_dir / "tiny-vit-bigG.safetensors", misleading)
    clip = encode.load_clip_vision(misleading)
    config = clip.model.config
    for key, value in TINY_CLIP_VISION["vit-bigG"].items():
        assert getattr(config, key) == value, key


def test_heads_come_from_file_metadata_for_unknown_widths(clip_dir, tmp_path):
    sd = load_file(clip_dir / "tiny-vit-h.safetensors")
    config = encode.infer_config(sd, {"num_attention_heads": "6"})
    assert config["num_attention_heads"] == 6


def test_a_file_without_clip_vision_keys_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "not_clip.safetensors"
    save_file({"image_proj.proj.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match=r"not_clip\.safetensors.*vision_model"):
        encode.load_clip_vision(path)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        encode.load_clip_vision(tmp_path / "missing.safetensors")


def test_loaded_encoders_are_cached_per_path_and_mtime(clip_dir, tmp_path):
    path = tmp_path / "vit.safetensors"
    shutil.copy(clip_dir / "tiny-vit-h.safetensors", path)
    first = encode.load_clip_vision(path)
    assert encode.load_clip_vision(path) is first
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert encode.load_clip_vision(path) is not first


def test_output_has_attribute_and_item_access():
    out = encode.ClipVisionOutput(image_embeds=torch.ones(1, 2))
    assert out["image_embeds"] is out.image_embeds
    out["penultimate_hidden_states"] = torch.zeros(1)
    assert out.penultimate_hidden_states is out["penultimate_hidden_states"]
    assert "image_embeds" in out and "last_hidden_state" not in out
    with pytest.raises(KeyError):
        out["nothing"]


# ---- interop --------------------------------------------------------------------------------------------
class _ComfyOutput:  # ComfyUI's Output: attribute + item access
    def __getitem__(self, key):
        return getattr(self, key)

    def __setitem__(self, key, value):
        setattr(self, key, value)


class _FakeComfyClipVision:
    image_size = 224

    def __init__(self):
        self.calls = []

    def encode_image(self, image, crop=True):
        self.calls.append(crop)
        out = _ComfyOutput()
        out["last_hidden_state"] = torch.full((image.shape[0], 257, 8), 1.0)
        out["penultimate_hidden_states"] = torch.full((image.shape[0], 257, 8), 2.0)
        out["image_embeds"] = torch.full((image.shape[0], 4), 3.0)
        return out


class _OldFakeComfyClipVision(_FakeComfyClipVision):
    def encode_image(self, image):  # ComfyUI before the crop argument
        return super().encode_image(image)


def test_as_clip_vision_wraps_comfy_objects_and_passes_crop():
    comfy = _FakeComfyClipVision()
    out = encode.as_clip_vision(comfy).encode(torch.rand(2, 32, 32, 3), crop=False)
    assert isinstance(out, encode.ClipVisionOutput)
    assert comfy.calls == [False]
    assert float(out.image_embeds[0, 0]) == 3.0 and float(out["penultimate_hidden_states"][1, 0, 0]) == 2.0
    old = encode.as_clip_vision(_OldFakeComfyClipVision()).encode(torch.rand(1, 32, 32, 3), crop=True)
    assert old.last_hidden_state.shape == (1, 257, 8)


def test_as_clip_vision_accepts_ours_and_a_bare_transformers_model_and_refuses_others(clip_dir):
    clip = encode.load_clip_vision(clip_dir / "tiny-vit-h")
    assert encode.as_clip_vision(clip) is clip
    wrapped = encode.as_clip_vision(clip.model)
    image = torch.rand(1, 40, 40, 3)
    assert torch.equal(wrapped.encode(image).image_embeds, clip.encode(image).image_embeds)
    with pytest.raises(TypeError, match="CLIP_VISION"):
        encode.as_clip_vision("clip.safetensors")


# ---- nodes ----------------------------------------------------------------------------------------------
def test_loader_lists_files_and_transformers_folders_once(layout):
    options = nodes.CLIPVisionLoader.INPUT_TYPES()["required"]["clip_name"][0]
    assert options == ["tiny-vit-bigG", "tiny-vit-bigG.safetensors", "tiny-vit-h", "tiny-vit-h.safetensors"]


def test_loader_and_encode_nodes(layout, clip_dir):
    (clip,) = nodes.CLIPVisionLoader().load_clip("tiny-vit-h")
    assert clip is encode.load_clip_vision(clip_dir / "tiny-vit-h")
    image = torch.rand(1, 64, 128, 3)
    (centre,) = nodes.CLIPVisionEncode().encode(clip, image, "center")
    (squash,) = nodes.CLIPVisionEncode().encode(clip, image, "none")
    assert torch.equal(centre.image_embeds, clip.encode(image, crop=True).image_embeds)
    assert torch.equal(squash.image_embeds, clip.encode(image, crop=False).image_embeds)
    assert not torch.allclose(centre.image_embeds, squash.image_embeds)


def test_loader_refuses_names_outside_the_folder(layout):
    with pytest.raises(folders.PathOutsideFolderError):
        nodes.CLIPVisionLoader().load_clip("../checkpoints/tiny-sd15")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        nodes.CLIPVisionLoader().load_clip("nope.safetensors")


# ---- which loader the unified loaders use (core.apply.load_clip_vision) ---------------------------------------

def test_unified_loaders_use_comfyuis_clip_vision_loader_inside_comfyui(clip_dir, monkeypatch):
    """Inside ComfyUI a CLIP vision *file* is loaded by ``comfy.clip_vision.load`` (the CLIPVisionLoader's
    model, under ComfyUI's model management) — found in ComfyUI's real server, where the unified loaders
    kept a second fp32 copy on the CPU.  Folders and runs without ComfyUI keep our loader."""
    import sys
    import types

    from ipadapter_nodes.core import apply as engine

    file_path = str(clip_dir / "tiny-vit-h.safetensors")
    folder_path = str(clip_dir / "tiny-vit-h")
    ours = engine.load_clip_vision(file_path)
    assert isinstance(ours, encode.ClipVision)

    calls = []
    comfy_model = object()
    fake = types.ModuleType("comfy.clip_vision")
    fake.load = lambda path: calls.append(path) or comfy_model
    monkeypatch.setitem(sys.modules, "comfy.clip_vision", fake)
    assert engine.load_clip_vision(file_path) is comfy_model
    assert calls == [file_path]
    assert isinstance(engine.load_clip_vision(folder_path), encode.ClipVision)  # ComfyUI reads files only
    assert calls == [file_path]

    # the free_clip_vision option inside ComfyUI: ComfyUI's model management does the freeing
    assert engine.load_clip_vision_on_demand(file_path) is comfy_model
    assert calls == [file_path, file_path]

    fake.load = lambda path: None  # what ComfyUI returns for a file without a known vision model
    with pytest.raises(ValueError, match="tiny-vit-h.safetensors"):
        engine.load_clip_vision(file_path)
