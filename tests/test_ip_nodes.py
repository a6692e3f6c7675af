"""IP-Adapter node declarations (names, defaults, widget order as the existing pack) and PrepImageForClipVision."""
from __future__ import annotations

import pytest
import torch

from ipadapter_nodes import nodes
from ipadapter_nodes.core import apply as engine
from ipadapter_nodes.core import prep_image as prep

WEIGHT_TYPES = ["linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input", "weak output",
                "weak middle", "strong middle", "style transfer", "composition", "strong style transfer",
                "style and composition", "style transfer precise", "composition precise"]
SCALING = ["V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty"]
START = ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001})
END = ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001})

# class_type → (required inputs in order, optional inputs in order, outputs, output names, category, display)
ANCHOR = {
    "IPAdapter": (
        {"model": ("MODEL",), "ipadapter": ("IPADAPTER",), "image": ("IMAGE",),
         "weight": ("FLOAT", {"default": 1.0, "min": -1, "max": 3, "step": 0.05}),
         "start_at": START, "end_at": END,
         "weight_type": (["standard", "prompt is more important", "style transfer"],)},
        {"attn_mask": ("MASK",)},
        ("MODEL",), None, "ipadapter", "IPAdapter"),
    "IPAdapterAdvanced": (
        {"model": ("MODEL",), "ipadapter": ("IPADAPTER",), "image": ("IMAGE",),
         "weight": ("FLOAT", {"default": 1.0, "min": -1, "max": 5, "step": 0.05}),
         "weight_type": (WEIGHT_TYPES,),
         "combine_embeds": (["concat", "add", "subtract", "average", "norm average"],),
         "start_at": START, "end_at": END, "embeds_scaling": (SCALING,)},
        {"image_negative": ("IMAGE",), "attn_mask": ("MASK",), "clip_vision": ("CLIP_VISION",)},
        ("MODEL",), None, "ipadapter", "IPAdapter Advanced"),
    "IPAdapterUnifiedLoader": (
        {"model": ("MODEL",),
         "preset": (["LIGHT - SD1.5 only (low strength)", "STANDARD (medium strength)", "VIT-G (medium strength)",
                     "PLUS (high strength)", "PLUS FACE (portraits)",
                     "FULL FACE - SD1.5 only (portraits stronger)"],)},
        {"ipadapter": ("IPADAPTER",)},
        ("MODEL", "IPADAPTER"), ("model", "ipadapter"), "ipadapter", "IPAdapter Unified Loader"),
    "PrepImageForClipVision": (
        {"image": ("IMAGE",), "interpolation": (["LANCZOS", "BICUBIC", "HAMMING", "BILINEAR", "BOX", "NEAREST"],),
         "crop_position": (["top", "bottom", "left", "right", "center", "pad"],),
         "sharpening": ("FLOAT", {"default": 0.0, "min": 0, "max": 1, "step": 0.05})},
        {},
        ("IMAGE",), None, "ipadapter/utils", "Prep Image For ClipVision"),
}


@pytest.mark.parametrize("class_type", sorted(ANCHOR))
def test_node_declaration_equals_the_existing_pack(class_type):
    required, optional, outputs, names, category, display = ANCHOR[class_type]
    cls = nodes.NODE_CLASS_MAPPINGS[class_type]
    spec = cls.INPUT_TYPES()
    # dict equality ignores order, so compare the key lists too: widget order is the UI-format contract
    assert list(spec["required"]) == list(required)
    assert spec["required"] == required
    # inputs this pack adds may only follow the existing pack's, so saved workflows keep their widget order
    extra = spec.get("optional", {})
    assert list(extra)[:len(optional)] == list(optional)
    assert {name: extra[name] for name in optional} == optional
    assert cls.RETURN_TYPES == outputs
    assert getattr(cls, "RETURN_NAMES", None) == names
    assert cls.CATEGORY == category
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS[class_type] == display
    assert callable(getattr(cls(), cls.FUNCTION))


def test_model_loader_lists_the_ipadapter_folder(tmp_path):
    from ipadapter_nodes.core import folders

    (tmp_path / "ipadapter" / "sub").mkdir(parents=True)
    (tmp_path / "ipadapter" / "sub" / "x.safetensors").write_bytes(b"")
    (tmp_path / "ipadapter" / "a.bin").write_bytes(b"")
    previous = folders.provider()
    folders.configure(folders.FolderLayout(models_dirs=[str(tmp_path)]))
    try:
        spec = nodes.NODE_CLASS_MAPPINGS["IPAdapterModelLoader"].INPUT_TYPES()
    finally:
        folders.configure(previous)
    assert list(spec["required"]) == ["ipadapter_file"]
    assert spec["required"]["ipadapter_file"] == (["a.bin", "sub/x.safetensors"],)
    cls = nodes.NODE_CLASS_MAPPINGS["IPAdapterModelLoader"]
    assert (cls.RETURN_TYPES, cls.CATEGORY) == (("IPADAPTER",), "ipadapter/loaders")


def test_simple_node_needs_the_unified_loader_pipeline():
    with pytest.raises(ValueError, match="IPAdapterUnifiedLoader"):
        engine.unpack_pipeline(object(), object(), node="IPAdapter", require_pipeline=True)


def test_advanced_node_takes_a_bare_adapter_with_a_clip_vision_or_a_pipeline():
    adapter, cv, other_cv = object(), object(), object()
    assert engine.unpack_pipeline(adapter, cv, node="n") == (adapter, cv)
    pipeline = {"ipadapter": {"file": "f", "model": adapter}, "clipvision": {"file": "g", "model": cv}}
    assert engine.unpack_pipeline(pipeline, None, node="n") == (adapter, cv)
    assert engine.unpack_pipeline(pipeline, other_cv, node="n") == (adapter, other_cv)
    with pytest.raises(ValueError, match="clip_vision"):
        engine.unpack_pipeline(adapter, None, node="IPAdapterAdvanced")


def test_wrong_family_adapter_error_names_both_families():
    class Spec:
        family, kind, cross_attention_dim = "sdxl", "plus", 2048

    class Adapter:
        spec, path = Spec(), "ip-adapter-plus_sdxl_vit-h.safetensors"

    with pytest.raises(ValueError, match="SDXL plus adapter.*model is SD1.5"):
        engine.check_family(Adapter(), "sd15", node="IPAdapterUnifiedLoader")
    engine.check_family(Adapter(), "sdxl", node="IPAdapterUnifiedLoader")


def test_comfy_model_family_comes_from_the_model_class():
    class SDXL:  # noqa: N801 - named like ComfyUI's class
        pass

    class BaseModel:
        pass

    class Patcher:
        def __init__(self, inner):
            self.model = inner

    assert engine.model_family(Patcher(SDXL())) == "sdxl"
    assert engine.model_family(Patcher(BaseModel())) == "sd15"


# ---- PrepImageForClipVision ---------------------------------------------------------------------------

def _two_halves(h: int, w: int, vertical: bool) -> torch.Tensor:
    """An image whose first half (top or left) is red and second half blue."""
    img = torch.zeros(1, h, w, 3)
    if vertical:
        img[:, : h // 2, :, 0] = 1.0
        img[:, h // 2:, :, 2] = 1.0
    else:
        img[:, :, : w // 2, 0] = 1.0
        img[:, :, w // 2:, 2] = 1.0
    return img


def _prep(image, interpolation="NEAREST", crop_position="center", sharpening=0.0):
    node = nodes.NODE_CLASS_MAPPINGS["PrepImageForClipVision"]()
    (out,) = node.prep_image(image, interpolation, crop_position, sharpening)
    return out


@pytest.mark.parametrize("interpolation", ["LANCZOS", "BICUBIC", "HAMMING", "BILINEAR", "BOX", "NEAREST"])
@pytest.mark.parametrize("crop_position", ["top", "bottom", "left", "right", "center", "pad"])
def test_output_is_224_square_in_range(interpolation, crop_position):
    image = torch.rand(2, 48, 80, 3, generator=torch.Generator().manual_seed(0))
    out = _prep(image, interpolation, crop_position)
    assert out.shape == (2, 224, 224, 3)
    assert out.dtype == torch.float32 and out.min() >= 0.0 and out.max() <= 1.0


def test_crop_positions_keep_the_named_side():
    wide = _two_halves(32, 64, vertical=False)
    tall = _two_halves(64, 32, vertical=True)
    red, blue = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    assert torch.equal(_prep(wide, crop_position="left")[0, 112, 112], red)
    assert torch.equal(_prep(wide, crop_position="right")[0, 112, 112], blue)
    assert torch.equal(_prep(tall, crop_position="top")[0, 112, 112], red)
    assert torch.equal(_prep(tall, crop_position="bottom")[0, 112, 112], blue)
    centre = _prep(wide, crop_position="center")[0]
    assert torch.equal(centre[112, 10], red) and torch.equal(centre[112, 213], blue)


def test_pad_keeps_the_whole_image_between_black_borders():
    image = torch.full((1, 64, 32, 3), 0.5)          # tall: pads 16 columns left and right
    out = _prep(image, crop_position="pad")[0]
    assert torch.all(out[:, :56] == 0.0) and torch.all(out[:, 168:] == 0.0)
    assert torch.all(out[:, 56:168] == 0.5)
    wide = _two_halves(30, 60, vertical=False)         # wide: the whole red and blue halves survive
    out = _prep(wide, crop_position="pad")[0]
    assert out[:, :, 0].sum() == pytest.approx(out[:, :, 2].sum()) and out[:, :, 0].sum() > 224 * 112 * 0.99 / 2
    assert torch.all(out[:56] == 0.0) and torch.all(out[168:] == 0.0)


def test_square_image_is_only_resized():
    image = torch.rand(1, 112, 112, 3, generator=torch.Generator().manual_seed(1))
    out = _prep(image, "NEAREST")
    assert torch.equal(out, image.repeat_interleave(2, 1).repeat_interleave(2, 2))


def test_sharpening_zero_is_identity_and_leaves_flat_areas_alone():
    image = torch.rand(1, 224, 224, 3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(prep.contrast_adaptive_sharpening(image, 0.0), image)
    flat = torch.full((1, 16, 16, 3), 0.3)
    assert torch.allclose(prep.contrast_adaptive_sharpening(flat, 1.0), flat, atol=1e-6)


def test_sharpening_steepens_a_soft_edge_more_as_it_grows():
    ramp = torch.linspace(0.2, 0.8, 224).repeat(224, 1)          # a smooth horizontal gradient
    soft = torch.zeros(1, 224, 224, 3)
    soft[..., :] = (ramp > 0.5).float()[..., None] * 0.4 + 0.3   # a step from 0.3 to 0.7 ...
    soft = torch.nn.functional.avg_pool2d(soft.permute(0, 3, 1, 2), 5, 1, 2,
                                          count_include_pad=False).permute(0, 2, 3, 1)  # ... blurred
    contrast = [(prep.contrast_adaptive_sharpening(soft, a)[0, 100, 1:, 0]
                 - prep.contrast_adaptive_sharpening(soft, a)[0, 100, :-1, 0]).abs().max().item()
                for a in (0.0, 0.5, 1.0)]
    assert contrast[0] < contrast[1] < contrast[2]
    sharpened = _prep(soft, "NEAREST", "center", 1.0)
    assert sharpened.min() >= 0.0 and sharpened.max() <= 1.0


def test_unknown_options_are_refused_with_the_valid_ones():
    image = torch.zeros(1, 8, 8, 3)
    with pytest.raises(ValueError, match="LANCZOS"):
        _prep(image, interpolation="CUBIC")
    with pytest.raises(ValueError, match="pad"):
        _prep(torch.zeros(1, 8, 4, 3), crop_position="middle")


# ---- combine_embeds -------------------------------------------------------------------------------------

def _embeds(cond, uncond):
    from ipadapter_nodes.core.embeds import Embeds

    return Embeds(cond, uncond, "image_embeds")


def test_combine_embeds_formulas_of_the_existing_pack():
    cond = torch.tensor([[1.0, 2.0], [3.0, -4.0], [5.0, 0.0]])
    uncond = torch.tensor([[0.5, 0.5], [7.0, 7.0], [9.0, 9.0]])
    e = _embeds(cond, uncond)
    assert engine.combine(e, "concat") is e
    expect = {
        "add": [[9.0, -2.0]],
        "subtract": [[1.0 - 4.0, 2.0 - (-2.0)]],
        "average": [[3.0, -2.0 / 3.0]],
        # element-wise norm across the three images: sqrt(1+9+25), sqrt(4+16+0)
        "norm average": [[(1 + 3 + 5) / 35 ** 0.5 / 3, (2 - 4 + 0) / 20 ** 0.5 / 3]],
    }
    for mode, value in expect.items():
        out = engine.combine(e, mode)
        assert torch.allclose(out.cond, torch.tensor(value)), mode
        assert torch.equal(out.uncond, uncond[:1]), mode  # the first image's uncond, as the pack does


def test_combine_leaves_a_single_image_alone():
    e = _embeds(torch.ones(1, 4), torch.zeros(1, 4))
    assert engine.combine(e, "average") is e


# ---- the nodes on loaded tiny files ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_layout(tiny_models_dir, tmp_path_factory):
    import shutil

    from ipadapter_nodes.core import folders
    from ipadapter_nodes.runtime.tiny_adapters import make_adapter

    root = tmp_path_factory.mktemp("ip-nodes")
    make_adapter("sd15", root / "ipadapter" / "ip-adapter_sd15.safetensors", seed=3)
    make_adapter("sd15-plus", root / "ipadapter" / "ip-adapter-plus_sd15.safetensors", seed=4)
    # an SDXL adapter under an SD1.5 name: the loader must notice from the weights
    make_adapter("sdxl-plus-face-vit-h", root / "ipadapter" / "ip-adapter-plus-face_sd15.safetensors", seed=5)
    (root / "clip_vision").mkdir()
    shutil.copyfile(tiny_models_dir / "clip_vision" / "tiny-vit-h.safetensors",
                    root / "clip_vision" / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors")
    previous = folders.provider()
    folders.configure(folders.FolderLayout(models_dirs=[str(root)]))
    yield root
    folders.configure(previous)


def _model(family="sd15"):
    from ipadapter_nodes.core.backends.diffusers import DiffusersModel

    return DiffusersModel(unet=None, family=family, scheduler_config={})


def _unified(model, preset, ipadapter=None):
    loader = nodes.NODE_CLASS_MAPPINGS["IPAdapterUnifiedLoader"]()
    return loader, loader.load_models(model, preset, ipadapter)


def test_unified_loader_passes_the_model_through_and_returns_the_pipeline(tiny_layout):
    model = _model()
    _, (out_model, pipeline) = _unified(model, "PLUS (high strength)")
    assert out_model is model
    assert pipeline["ipadapter"]["file"].endswith("ip-adapter-plus_sd15.safetensors")
    assert pipeline["clipvision"]["file"].endswith("CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors")
    assert pipeline["ipadapter"]["model"].spec.kind == "plus"
    assert pipeline["clipvision"]["model"] is not None


def test_daisy_chained_loader_reuses_the_loaded_encoder(tiny_layout):
    _, (_, first) = _unified(_model(), "STANDARD (medium strength)")
    _, (_, second) = _unified(_model(), "PLUS (high strength)", ipadapter=first)
    assert second["clipvision"] is first["clipvision"]
    assert second["ipadapter"]["file"].endswith("ip-adapter-plus_sd15.safetensors")


def test_unified_loader_refuses_an_adapter_of_the_other_family(tiny_layout):
    with pytest.raises(ValueError, match="SDXL plus adapter.*model is SD1.5"):
        _unified(_model(), "PLUS FACE (portraits)")


def test_model_loader_loads_the_named_file(tiny_layout):
    loader = nodes.NODE_CLASS_MAPPINGS["IPAdapterModelLoader"]()
    (adapter,) = loader.load_ipadapter_model("ip-adapter_sd15.safetensors")
    assert (adapter.spec.family, adapter.spec.kind) == ("sd15", "base")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        loader.load_ipadapter_model("missing.safetensors")


def _advanced(model, ipadapter, clip_vision=None, **overrides):
    inputs = dict(weight=0.7, weight_type="linear", combine_embeds="concat", start_at=0.1, end_at=0.9,
                  embeds_scaling="K+V")
    inputs.update(overrides)
    node = nodes.NODE_CLASS_MAPPINGS["IPAdapterAdvanced"]()
    return node.apply_ipadapter(model, ipadapter, torch.rand(2, 40, 48, 3), clip_vision=clip_vision, **inputs)[0]


def test_advanced_adds_one_application_and_leaves_the_input_model_alone(tiny_layout):
    model = _model()
    _, (_, pipeline) = _unified(model, "PLUS (high strength)")
    out = _advanced(model, pipeline)
    assert model.applications == ()
    (app,) = out.applications
    assert (app.weight, app.start_at, app.end_at, app.embeds_scaling) == (0.7, 0.1, 0.9, "K+V")
    assert app.adapter is pipeline["ipadapter"]["model"]
    assert app.embeds.count == 2 and app.embeds.cond.shape[1:] == (257, 48)   # two images, concatenated
    averaged = _advanced(out, pipeline, combine_embeds="average")
    assert len(averaged.applications) == 2 and averaged.applications[1].embeds.count == 1


def test_advanced_takes_a_bare_adapter_with_a_clip_vision(tiny_layout):
    from ipadapter_nodes.core import encode

    (adapter,) = nodes.NODE_CLASS_MAPPINGS["IPAdapterModelLoader"]().load_ipadapter_model(
        "ip-adapter_sd15.safetensors")
    clip_vision = encode.load_clip_vision(tiny_layout / "clip_vision" / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors")
    out = _advanced(_model(), adapter, clip_vision)
    assert out.applications[0].embeds.cond.shape == (2, 32)                    # tiny ViT-H image_embeds


def test_simple_node_applies_standard_as_linear(tiny_layout):
    _, (_, pipeline) = _unified(_model(), "STANDARD (medium strength)")
    node = nodes.NODE_CLASS_MAPPINGS["IPAdapter"]()
    (out,) = node.apply_ipadapter(_model(), pipeline, torch.rand(1, 32, 32, 3), 0.5, 0.0, 1.0, "standard")
    assert out.applications[0].weight == 0.5 and out.applications[0].layer_weights is None


def test_weight_types_and_masks_reach_the_application(tiny_layout):
    from ipadapter_nodes.core import weighting

    _, (_, pipeline) = _unified(_model(), "STANDARD (medium strength)")
    (app,) = _advanced(_model(), pipeline, weight_type="ease in", attn_mask=torch.ones(1, 8, 8)).applications
    assert app.layer_weights == weighting.layer_weights("ease in", 0.7, "sd15").cond
    assert app.uncond_layer_weights is None and app.attn_mask.shape == (1, 8, 8)
    assert app.mask_method == "ipadapter_plus"


def test_bad_inputs_raise_clear_errors(tiny_layout):
    _, (_, pipeline) = _unified(_model(), "STANDARD (medium strength)")
    with pytest.raises(ValueError, match="IPAdapterAdvanced: weight_type 'heavy'"):
        _advanced(_model(), pipeline, weight_type="heavy")
    with pytest.raises(ValueError, match="IPAdapterAdvanced: attn_mask"):
        _advanced(_model(), pipeline, attn_mask=torch.ones(1, 1, 1, 8, 8))
    with pytest.raises(ValueError, match="embeds_scaling 'V'"):
        _advanced(_model(), pipeline, embeds_scaling="V")
    with pytest.raises(ValueError, match="start_at"):
        _advanced(_model(), pipeline, start_at=0.8, end_at=0.2)
    with pytest.raises(ValueError, match="SDXL"):
        _advanced(_model("sdxl"), pipeline)


def test_a_value_that_is_no_model_is_refused_by_name(tiny_layout):
    class BaseModel:
        pass

    class NotAPatcher:  # has a model but none of ModelPatcher's patch API
        def __init__(self):
            self.model = BaseModel()

    _, (_, pipeline) = _unified(_model(), "STANDARD (medium strength)")
    with pytest.raises(TypeError, match="ModelPatcher.*NotAPatcher"):
        _advanced(NotAPatcher(), pipeline)
