"""Unified Loader presets: finding the adapter and encoder files by name, by content, and the errors."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ipadapter_nodes.core import presets
from ipadapter_nodes.core.folders import FolderLayout

# The file names the existing pack's README tells users to download, per (preset, family).
README_FILES = {
    ("LIGHT - SD1.5 only (low strength)", "sd15"): "ip-adapter_sd15_light_v11.bin",
    ("STANDARD (medium strength)", "sd15"): "ip-adapter_sd15.safetensors",
    ("STANDARD (medium strength)", "sdxl"): "ip-adapter_sdxl_vit-h.safetensors",
    ("VIT-G (medium strength)", "sd15"): "ip-adapter_sd15_vit-G.safetensors",
    ("VIT-G (medium strength)", "sdxl"): "ip-adapter_sdxl.safetensors",
    ("PLUS (high strength)", "sd15"): "ip-adapter-plus_sd15.safetensors",
    ("PLUS (high strength)", "sdxl"): "ip-adapter-plus_sdxl_vit-h.safetensors",
    ("PLUS FACE (portraits)", "sd15"): "ip-adapter-plus-face_sd15.safetensors",
    ("PLUS FACE (portraits)", "sdxl"): "ip-adapter-plus-face_sdxl_vit-h.safetensors",
    ("FULL FACE - SD1.5 only (portraits stronger)", "sd15"): "ip-adapter-full-face_sd15.safetensors",
    ("FACEID", "sd15"): "ip-adapter-faceid_sd15.bin",
    ("FACEID", "sdxl"): "ip-adapter-faceid_sdxl.bin",
    ("FACEID PLUS - SD1.5 only", "sd15"): "ip-adapter-faceid-plus_sd15.bin",
    ("FACEID PLUS V2", "sd15"): "ip-adapter-faceid-plusv2_sd15.bin",
    ("FACEID PLUS V2", "sdxl"): "ip-adapter-faceid-plusv2_sdxl.bin",
    ("FACEID PORTRAIT (style transfer)", "sd15"): "ip-adapter-faceid-portrait-v11_sd15.bin",
    ("FACEID PORTRAIT (style transfer)", "sdxl"): "ip-adapter-faceid-portrait_sdxl.bin",
    ("FACEID PORTRAIT UNNORM - SDXL only (strong)", "sdxl"): "ip-adapter-faceid-portrait_sdxl_unnorm.bin",
    ("Composition", "sd15"): "ip_plus_composition_sd15.safetensors",
    ("Composition", "sdxl"): "ip_plus_composition_sdxl.safetensors",
    ("Kolors", "sdxl"): "Kolors-IP-Adapter-Plus.bin",
}
ENCODERS = {
    "vit-h": "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
    "vit-bigG": "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors",
    "clip-l-336": "clip-vit-large-patch14-336.bin",
}


def _layout(root: Path) -> FolderLayout:
    return FolderLayout(models_dirs=[str(root)])


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def _no_detect(path):
    raise AssertionError(f"a file found by name must not be read; read {path}")


@pytest.fixture()
def all_files(tmp_path: Path) -> FolderLayout:
    """Every README adapter (some in sub-folders) and the three encoders, as empty files."""
    for i, name in enumerate(sorted(set(README_FILES.values()))):
        sub = "sdxl_models/" if i % 3 == 0 else ""
        _touch(tmp_path / "ipadapter" / f"{sub}{name}")
    for name in ENCODERS.values():
        _touch(tmp_path / "clip_vision" / name)
    return _layout(tmp_path)


def test_unified_loader_lists_the_six_presets_of_the_existing_pack_in_order():
    assert presets.presets_for("IPAdapterUnifiedLoader") == [
        "LIGHT - SD1.5 only (low strength)", "STANDARD (medium strength)", "VIT-G (medium strength)",
        "PLUS (high strength)", "PLUS FACE (portraits)", "FULL FACE - SD1.5 only (portraits stronger)"]
    assert presets.presets_for("IPAdapterUnifiedLoaderFaceID") == [
        "FACEID", "FACEID PLUS - SD1.5 only", "FACEID PLUS V2", "FACEID PORTRAIT (style transfer)",
        "FACEID PORTRAIT UNNORM - SDXL only (strong)"]
    assert presets.presets_for("IPAdapterUnifiedLoaderCommunity") == ["Composition", "Kolors"]


@pytest.mark.parametrize("preset,family", sorted(README_FILES))
def test_every_preset_finds_its_readme_files_by_name(all_files, preset, family):
    clip_path, adapter_path = presets.find_files(preset, family, all_files, detect=_no_detect)
    assert os.path.basename(adapter_path) == README_FILES[(preset, family)]
    assert os.path.basename(clip_path) == ENCODERS[presets.get_preset(preset).encoder]


@pytest.mark.parametrize("preset,family", [
    ("LIGHT - SD1.5 only (low strength)", "sdxl"),
    ("FULL FACE - SD1.5 only (portraits stronger)", "sdxl"),
    ("FACEID PLUS - SD1.5 only", "sdxl"),
    ("FACEID PORTRAIT UNNORM - SDXL only (strong)", "sd15"),
    ("Kolors", "sd15"),
])
def test_presets_without_a_model_for_the_family_say_so(all_files, preset, family):
    with pytest.raises(presets.PresetUnsupportedError, match="preset"):
        presets.find_files(preset, family, all_files)


def test_light_prefers_v11_and_falls_back_to_the_first_light_file(tmp_path):
    _touch(tmp_path / "ipadapter" / "ip-adapter_sd15_light.safetensors")
    _touch(tmp_path / "clip_vision" / ENCODERS["vit-h"])
    layout = _layout(tmp_path)
    preset = "LIGHT - SD1.5 only (low strength)"
    assert presets.find_ipadapter(preset, "sd15", layout).endswith("ip-adapter_sd15_light.safetensors")
    _touch(tmp_path / "ipadapter" / "ip-adapter_sd15_light_v11.bin")
    assert presets.find_ipadapter(preset, "sd15", layout).endswith("ip-adapter_sd15_light_v11.bin")


def test_standard_sd15_does_not_take_the_light_or_vit_g_file(tmp_path):
    for name in ("ip-adapter_sd15_light_v11.bin", "ip-adapter_sd15_vit-G.safetensors"):
        _touch(tmp_path / "ipadapter" / name)
    with pytest.raises(presets.PresetFileNotFoundError):
        presets.find_ipadapter("STANDARD (medium strength)", "sd15", _layout(tmp_path), detect=lambda p: None)


@pytest.mark.parametrize("encoder_file", [
    "CLIP-ViT-H-14/model.safetensors",
    "CLIP-ViT-H-14-laion2B-s32B-b79K/pytorch_model.bin",
    "laion/clip-vit-h-14-laion2b-s32b-b79k/open_clip_model.safetensors",
])
def test_encoder_in_a_sub_folder_is_found_by_its_folder_name(tmp_path, encoder_file):
    _touch(tmp_path / "ipadapter" / "ip-adapter_sd15.safetensors")
    _touch(tmp_path / "clip_vision" / encoder_file)
    _touch(tmp_path / "clip_vision" / "CLIP-ViT-bigG-14" / "model.safetensors")
    clip_path, _ = presets.find_files("STANDARD (medium strength)", "sd15", _layout(tmp_path), detect=_no_detect)
    assert clip_path.replace(os.sep, "/").endswith(encoder_file)


def test_transformers_encoder_folder_is_returned_as_the_folder(tmp_path):
    folder = tmp_path / "clip_vision" / "CLIP-ViT-H-14"
    _touch(folder / "model.safetensors")
    (folder / "config.json").write_text("{}")
    _touch(tmp_path / "ipadapter" / "ip-adapter_sd15.safetensors")
    clip_path, _ = presets.find_files("STANDARD (medium strength)", "sd15", _layout(tmp_path), detect=_no_detect)
    assert Path(clip_path) == folder.resolve()


def test_missing_adapter_error_names_preset_folders_and_example_names(tmp_path):
    extra = tmp_path / "elsewhere" / "ipadapter"
    extra.mkdir(parents=True)
    _touch(tmp_path / "ipadapter" / "unrelated.safetensors")
    layout = FolderLayout(models_dirs=[str(tmp_path)], extra_paths={"ipadapter": [str(extra)]})
    with pytest.raises(presets.PresetFileNotFoundError) as err:
        presets.find_files("PLUS (high strength)", "sdxl", layout, detect=lambda p: None)
    text = str(err.value)
    assert "PLUS (high strength)" in text
    assert str(tmp_path / "ipadapter") in text and str(extra) in text
    assert "ip-adapter-plus_sdxl_vit-h.safetensors" in text


def test_missing_encoder_error_names_preset_folder_and_example_name(tmp_path):
    _touch(tmp_path / "ipadapter" / "ip-adapter_sdxl.safetensors")
    (tmp_path / "clip_vision").mkdir()
    with pytest.raises(presets.PresetFileNotFoundError) as err:
        presets.find_files("VIT-G (medium strength)", "sdxl", _layout(tmp_path), detect=lambda p: None)
    text = str(err.value)
    assert "VIT-G (medium strength)" in text and str(tmp_path / "clip_vision") in text
    assert "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors" in text


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="STANDARD \\(medium strength\\)"):
        presets.get_preset("MEDIUM")


# ---- by content ------------------------------------------------------------------------------------------

class _Spec:
    def __init__(self, family, kind, encoder_hint, encoder_width, feature):
        self.family, self.kind, self.encoder_hint = family, kind, encoder_hint
        self.encoder_width, self.feature = encoder_width, feature


def test_renamed_adapter_is_found_by_detected_kind_family_and_encoder(tmp_path):
    specs = {
        "a.safetensors": _Spec("sdxl", "plus", "vit-h", 48, "penultimate_hidden_states"),
        "b.safetensors": _Spec("sd15", "base", "vit-bigG", 40, "image_embeds"),
        "c.safetensors": _Spec("sd15", "base", "vit-h", 32, "image_embeds"),
        "ip-adapter_sd15_light_v11.bin": _Spec("sd15", "base", "vit-h", 32, "image_embeds"),
    }
    for name in specs:
        _touch(tmp_path / "ipadapter" / "mine" / name)
    layout = _layout(tmp_path)

    def detect(path):
        return specs[os.path.basename(path)]

    find = presets.find_ipadapter
    assert find("STANDARD (medium strength)", "sd15", layout, detect).endswith("mine/c.safetensors")
    assert find("VIT-G (medium strength)", "sd15", layout, detect).endswith("mine/b.safetensors")
    assert find("PLUS (high strength)", "sdxl", layout, detect).endswith("mine/a.safetensors")
    with pytest.raises(presets.PresetFileNotFoundError):
        find("PLUS (high strength)", "sd15", layout, detect)


def _encoder_folder(root: Path, name: str, hidden: int, projection: int) -> None:
    folder = root / "clip_vision" / name
    _touch(folder / "model.safetensors")
    (folder / "config.json").write_text(f'{{"hidden_size": {hidden}, "projection_dim": {projection}}}')


def test_renamed_adapters_without_a_public_encoder_are_told_apart_by_the_found_encoders_widths(tmp_path):
    # tiny widths have no public encoder name (encoder_hint None): the preset's encoder decides
    specs = {"one.safetensors": _Spec("sd15", "base", None, 40, "image_embeds"),
             "two.safetensors": _Spec("sd15", "base", None, 32, "image_embeds")}
    for name in specs:
        _touch(tmp_path / "ipadapter" / name)
    _encoder_folder(tmp_path, "CLIP-ViT-H-14-laion2B-s32B-b79K", 48, 32)
    _encoder_folder(tmp_path, "CLIP-ViT-bigG-14-laion2B-39B-b160k", 64, 40)
    layout = _layout(tmp_path)

    def detect(path):
        return specs[os.path.basename(path)]

    clip, adapter = presets.find_files("STANDARD (medium strength)", "sd15", layout, detect)
    assert (Path(clip).name, Path(adapter).name) == ("CLIP-ViT-H-14-laion2B-s32B-b79K", "two.safetensors")
    clip, adapter = presets.find_files("VIT-G (medium strength)", "sd15", layout, detect)
    assert (Path(clip).name, Path(adapter).name) == ("CLIP-ViT-bigG-14-laion2B-39B-b160k", "one.safetensors")


def test_renamed_encoder_is_found_by_the_width_the_adapter_needs(tmp_path):
    _touch(tmp_path / "ipadapter" / "ip-adapter-plus_sd15.safetensors")
    _encoder_folder(tmp_path, "encoder-a", 64, 40)
    _encoder_folder(tmp_path, "encoder-b", 48, 32)
    spec = _Spec("sd15", "plus", None, 48, "penultimate_hidden_states")
    clip, _ = presets.find_files("PLUS (high strength)", "sd15", _layout(tmp_path), lambda p: spec)
    assert Path(clip).name == "encoder-b"
    spec_misfit = _Spec("sd15", "plus", None, 1280, "penultimate_hidden_states")
    with pytest.raises(presets.PresetFileNotFoundError, match="1280-d"):
        presets.find_files("PLUS (high strength)", "sd15", _layout(tmp_path), lambda p: spec_misfit)


# ---- with tiny adapters in the real layouts (real detection from the weights) ------------------------------

# tiny variant (runtime.tiny_adapters) written under each README name
VARIANT_OF_FILE = {
    "ip-adapter_sd15_light_v11.bin": "sd15-light", "ip-adapter_sd15.safetensors": "sd15",
    "ip-adapter_sdxl_vit-h.safetensors": "sdxl-vit-h", "ip-adapter_sd15_vit-G.safetensors": "sd15-vit-g",
    "ip-adapter_sdxl.safetensors": "sdxl", "ip-adapter-plus_sd15.safetensors": "sd15-plus",
    "ip-adapter-plus_sdxl_vit-h.safetensors": "sdxl-plus-vit-h",
    "ip-adapter-plus-face_sd15.safetensors": "sd15-plus-face",
    "ip-adapter-plus-face_sdxl_vit-h.safetensors": "sdxl-plus-face-vit-h",
    "ip-adapter-full-face_sd15.safetensors": "sd15-full-face", "ip-adapter-faceid_sd15.bin": "faceid-sd15",
    "ip-adapter-faceid_sdxl.bin": "faceid-sdxl", "ip-adapter-faceid-plus_sd15.bin": "faceid-plus-sd15",
    "ip-adapter-faceid-plusv2_sd15.bin": "faceid-plusv2-sd15",
    "ip-adapter-faceid-plusv2_sdxl.bin": "faceid-plusv2-sdxl",
    "ip-adapter-faceid-portrait-v11_sd15.bin": "portrait-sd15",
    "ip-adapter-faceid-portrait_sdxl.bin": "portrait-sdxl",
    "ip-adapter-faceid-portrait_sdxl_unnorm.bin": "portrait-unnorm-sdxl",
}
# variants a renamed file of that preset may be (weights alone cannot tell Light from base, Plus-Face from Plus)
SAME_WEIGHTS = {"sd15-light": {"sd15", "sd15-light"}, "sd15": {"sd15", "sd15-light"},
                "sd15-plus-face": {"sd15-plus", "sd15-plus-face"}, "sd15-plus": {"sd15-plus", "sd15-plus-face"},
                "sdxl-plus-vit-h": {"sdxl-plus-vit-h", "sdxl-plus-face-vit-h"},
                "sdxl-plus-face-vit-h": {"sdxl-plus-vit-h", "sdxl-plus-face-vit-h"},
                "faceid-plus-sd15": {"faceid-plus-sd15", "faceid-plusv2-sd15"},
                "faceid-plusv2-sd15": {"faceid-plus-sd15", "faceid-plusv2-sd15"}}


@pytest.fixture(scope="module")
def tiny_adapter_dir(tmp_path_factory, tiny_models_dir) -> Path:
    """Every tiny variant once (under its README name) and the two tiny encoders under their public names."""
    from ipadapter_nodes.runtime.tiny_adapters import make_adapter

    root = tmp_path_factory.mktemp("tiny-presets")
    for name, variant in VARIANT_OF_FILE.items():
        make_adapter(variant, root / "named" / "ipadapter" / name, seed=1)
    (root / "named" / "clip_vision").mkdir(parents=True)
    for encoder, name in (("vit-h", ENCODERS["vit-h"]), ("vit-bigG", ENCODERS["vit-bigG"])):
        shutil.copyfile(tiny_models_dir / "clip_vision" / f"tiny-{encoder}.safetensors",
                        root / "named" / "clip_vision" / name)
    return root


CONTENT_CASES = [(preset, family) for (preset, family), name in sorted(README_FILES.items())
                 if name in VARIANT_OF_FILE]


@pytest.mark.parametrize("preset,family", CONTENT_CASES)
def test_tiny_files_are_found_by_name(tiny_adapter_dir, preset, family):
    clip, adapter = presets.find_files(preset, family, _layout(tiny_adapter_dir / "named"), detect=_no_detect)
    assert Path(adapter).name == README_FILES[(preset, family)]
    assert Path(clip).name == ENCODERS[presets.get_preset(preset).encoder]


@pytest.fixture(scope="module")
def renamed_dir(tiny_adapter_dir) -> Path:
    """Every tiny adapter under an opaque name in a sub-folder; the encoders keep their public names."""
    root = tiny_adapter_dir / "renamed"
    for i, name in enumerate(sorted(VARIANT_OF_FILE)):
        target = root / "ipadapter" / "my models" / f"adapter-{i:02d}{Path(name).suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tiny_adapter_dir / "named" / "ipadapter" / name, target)
    shutil.copytree(tiny_adapter_dir / "named" / "clip_vision", root / "clip_vision")
    return root


@pytest.mark.parametrize("preset,family", CONTENT_CASES)
def test_renamed_tiny_adapters_are_found_by_content(renamed_dir, preset, family):
    expected = VARIANT_OF_FILE[README_FILES[(preset, family)]]
    clip, adapter = presets.find_files(preset, family, _layout(renamed_dir))
    found = VARIANT_OF_FILE[sorted(VARIANT_OF_FILE)[int(Path(adapter).stem.split("-")[1])]]
    assert found in SAME_WEIGHTS.get(expected, {expected})
    assert Path(clip).name == ENCODERS[presets.get_preset(preset).encoder]


def test_renamed_tiny_encoder_is_found_by_the_width_the_adapter_needs(tiny_adapter_dir, tmp_path, tiny_models_dir):
    shutil.copytree(tiny_adapter_dir / "named" / "ipadapter", tmp_path / "ipadapter")
    (tmp_path / "clip_vision").mkdir()
    for encoder in ("vit-h", "vit-bigG"):  # transformers folders under names no pattern knows
        shutil.copytree(tiny_models_dir / "clip_vision" / f"tiny-{encoder}", tmp_path / "clip_vision" / f"enc-{encoder}")
    clip, _ = presets.find_files("VIT-G (medium strength)", "sdxl", _layout(tmp_path))
    assert Path(clip).name == "enc-vit-bigG"
    clip, _ = presets.find_files("PLUS (high strength)", "sd15", _layout(tmp_path))
    assert Path(clip).name == "enc-vit-h"
