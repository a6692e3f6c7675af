"""Detection of every published IP-Adapter variant from its weights alone; the loaded adapter and its cache."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from ipadapter_nodes.core.adapter import (
    AdapterSpec, attn2_hidden_sizes, attn2_layer_names, clear_cache, describe, describe_spec, detect, load_adapter,
)
from ipadapter_nodes.core.checkpoint import AdapterFileError, load_state_dict
from ipadapter_nodes.runtime import tiny
from ipadapter_nodes.runtime.tiny_adapters import MANIFEST_NAMES, VARIANTS, make_adapter, random_state_dict

REPO = Path(__file__).resolve().parent.parent
MANIFEST_PLACES = (REPO / "tests" / "data" / "ipadapter_key_manifest.json",
                   REPO.parent / "shared" / "reference" / "ipadapter_key_manifest.json")

# variant: (family, kind, feature, encoder width, encoder hint, tokens, cross dim, LoRA, face dim) at real widths
EXPECTED = {
    "sd15": ("sd15", "base", "image_embeds", 1024, "vit-h", 4, 768, False, None),
    "sd15-light": ("sd15", "base", "image_embeds", 1024, "vit-h", 4, 768, False, None),
    "sd15-vit-g": ("sd15", "base", "image_embeds", 1280, "vit-bigG", 4, 768, False, None),
    "sd15-plus": ("sd15", "plus", "penultimate_hidden_states", 1280, "vit-h", 16, 768, False, None),
    "sd15-plus-face": ("sd15", "plus", "penultimate_hidden_states", 1280, "vit-h", 16, 768, False, None),
    "sd15-full-face": ("sd15", "full-face", "penultimate_hidden_states", 1280, "vit-h", 257, 768, False, None),
    "sdxl": ("sdxl", "base", "image_embeds", 1280, "vit-bigG", 4, 2048, False, None),
    "sdxl-vit-h": ("sdxl", "base", "image_embeds", 1024, "vit-h", 4, 2048, False, None),
    "sdxl-plus-vit-h": ("sdxl", "plus", "penultimate_hidden_states", 1280, "vit-h", 16, 2048, False, None),
    "sdxl-plus-face-vit-h": ("sdxl", "plus", "penultimate_hidden_states", 1280, "vit-h", 16, 2048, False, None),
    "faceid-sd15": ("sd15", "faceid", "face_embedding", 512, None, 4, 768, True, 512),
    "faceid-plus-sd15": ("sd15", "faceid-plus", "face_embedding+penultimate_hidden_states", 1280, "vit-h", 4, 768,
                         True, 512),
    "faceid-plusv2-sd15": ("sd15", "faceid-plus", "face_embedding+penultimate_hidden_states", 1280, "vit-h", 4,
                           768, True, 512),
    "faceid-sdxl": ("sdxl", "faceid", "face_embedding", 512, None, 4, 2048, True, 512),
    "faceid-plusv2-sdxl": ("sdxl", "faceid-plus", "face_embedding+penultimate_hidden_states", 1280, "vit-h", 4,
                           2048, True, 512),
    "portrait-sd15": ("sd15", "portrait", "face_embedding", 512, None, 16, 768, False, 512),
    "portrait-sdxl": ("sdxl", "portrait", "face_embedding", 512, None, 16, 2048, False, 512),
    "portrait-unnorm-sdxl": ("sdxl", "portrait-unnorm", "face_embedding", 512, None, 16, 2048, False, 512),
}
REAL_BLOCKS = {"sd15": (320, 640, 1280, 1280), "sdxl": (320, 640, 1280)}
TINY_WIDTH = {("vit-h", "embeds"): 32, ("vit-h", "hidden"): 48, ("vit-bigG", "embeds"): 40,
              ("vit-bigG", "hidden"): 64, ("face", "face"): 512}


def summary(spec: AdapterSpec) -> tuple:
    return (spec.family, spec.kind, spec.feature, spec.encoder_width, spec.encoder_hint, spec.tokens,
            spec.cross_attention_dim, spec.has_lora, spec.face_embed_dim)


def test_every_published_variant_has_a_test_expectation():
    assert set(EXPECTED) == set(VARIANTS) and set(MANIFEST_NAMES.values()) <= set(VARIANTS)


def test_random_real_shapes_are_exactly_the_published_layouts():
    manifest_path = next((p for p in MANIFEST_PLACES if p.exists()), None)
    assert manifest_path is not None, f"key manifest not found in {[str(p) for p in MANIFEST_PLACES]}"
    manifest = json.loads(manifest_path.read_text())
    assert set(manifest) == set(MANIFEST_NAMES)
    for name, variant in MANIFEST_NAMES.items():
        state = random_state_dict(variant, "real", "meta")
        for part in ("image_proj", "ip_adapter"):
            assert {k: list(v.shape) for k, v in state[part].items()} == manifest[name][part], (name, part)


@pytest.mark.parametrize("variant", sorted(EXPECTED))
def test_real_shapes_on_meta_device_are_detected(variant):
    spec = detect(random_state_dict(variant, "real", "meta"), f"{variant}.bin")
    assert summary(spec) == EXPECTED[variant]
    assert spec.num_layers == {"sd15": 16, "sdxl": 70}[spec.family]
    assert spec.hidden_sizes == attn2_hidden_sizes(spec.family, REAL_BLOCKS[spec.family])


@pytest.mark.parametrize("variant", sorted(EXPECTED))
def test_tiny_files_are_detected_in_both_containers_with_mixed_dtypes(tmp_path, variant):
    family, kind, feature, _, _, tokens, _, lora, face = EXPECTED[variant]
    v = VARIANTS[variant]
    for suffix in (".bin", ".safetensors"):
        # A misleading name: detection must not look at it.
        path = make_adapter(variant, tmp_path / f"ip-adapter_sd15{suffix}", dtype_mix=True, seed=5)
        spec = detect(load_state_dict(path), path.name)
        assert (spec.family, spec.kind, spec.feature, spec.tokens, spec.has_lora, spec.face_embed_dim) == (
            family, kind, feature, tokens, lora, face)
        assert spec.encoder_width == TINY_WIDTH[(v.encoder, v.feature)]
        assert spec.encoder_hint is None  # tiny widths match no public encoder
        assert spec.cross_attention_dim == {"sd15": 32, "sdxl": 64}[family]
        tiny_blocks = (tiny.TINY_SD15 if family == "sd15" else tiny.TINY_SDXL)["block_out_channels"]
        assert spec.hidden_sizes == attn2_hidden_sizes(family, tuple(tiny_blocks))


def test_portrait_without_lora_and_faceid_with_lora_are_told_apart():
    assert detect(random_state_dict("faceid-sd15", "tiny", "meta")).kind == "faceid"
    assert detect(random_state_dict("portrait-sd15", "tiny", "meta")).kind == "portrait"
    stripped = random_state_dict("faceid-sd15", "tiny", "meta")  # a FaceID file whose LoRA was removed
    stripped["ip_adapter"] = {k: v for k, v in stripped["ip_adapter"].items() if "_lora." not in k}
    assert (detect(stripped).kind, detect(stripped).has_lora) == ("faceid", False)


# ----------------------------------------------------------------------------------------------------
# layouts that are not IP-Adapters


def test_unknown_image_proj_layout_lists_what_was_found():
    state = random_state_dict("sd15", "tiny", "meta")
    state["image_proj"] = {"mystery.weight": torch.empty(3, 3, device="meta")}
    with pytest.raises(AdapterFileError, match=r"odd\.bin.*unknown image_proj layout.*mystery\.weight"):
        detect(state, "odd.bin")


def test_unsupported_layer_count_is_named():
    state = random_state_dict("sd15", "tiny", "meta")
    state["ip_adapter"] = {k: v for k, v in state["ip_adapter"].items() if int(k.split(".")[0]) < 20}
    with pytest.raises(AdapterFileError, match=r"10 cross-attention layers.*16 \(SD1\.5\), 70 \(SDXL\)"):
        detect(state, "x.safetensors")


def test_missing_ip_adapter_part_is_an_error():
    with pytest.raises(AdapterFileError, match="no per-layer"):
        detect({"image_proj": random_state_dict("sd15", "tiny", "meta")["image_proj"], "ip_adapter": {}}, "x")


def test_parts_of_two_different_adapters_are_refused():
    state = random_state_dict("sd15", "tiny", "meta")
    state["image_proj"] = random_state_dict("sdxl", "tiny", "meta")["image_proj"]
    with pytest.raises(AdapterFileError, match="64-wide tokens but to_k_ip/to_v_ip expect 32"):
        detect(state, "mix.bin")


# ----------------------------------------------------------------------------------------------------
# describe


def test_describe_spec_reads_like_the_models_listing():
    spec = detect(random_state_dict("sd15-plus", "real", "meta"))
    assert describe_spec(spec) == ("SD1.5 Plus (also Plus-Face), 16 tokens, needs penultimate hidden states of a "
                                   "1280-wide encoder (ViT-H/14), cross-attention 768")
    spec = detect(random_state_dict("faceid-plusv2-sdxl", "real", "meta"))
    assert describe_spec(spec).startswith("SDXL FaceID-Plus / Plus V2")
    assert "512-d face embedding and penultimate hidden states of a 1280-wide encoder (ViT-H/14)" in describe_spec(spec)
    assert describe_spec(spec).endswith("with attention LoRA")


def test_describe_names_the_file_and_reports_unusable_ones(tmp_path):
    path = make_adapter("sdxl-vit-h", tmp_path / "anything.safetensors")
    assert describe(path) == ("anything.safetensors: SDXL IP-Adapter (also Light / Light v1.1), 4 tokens, needs "
                              "image_embeds of a 32-wide encoder, cross-attention 64")
    (tmp_path / "broken.bin").write_bytes(b"\x80\x02garbage")
    assert describe(tmp_path / "broken.bin").startswith("broken.bin: not usable: ")


def test_models_command_lists_what_each_file_is(tmp_path, capsys):
    from ipadapter_nodes.runtime import cli

    folder = tmp_path / "models" / "ipadapter"
    make_adapter("sd15-plus", folder / "renamed.bin")
    (folder / "broken.safetensors").write_bytes(b"nonsense")
    assert cli.main(["models", "--models-dir", str(tmp_path / "models")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("broken.safetensors: unrecognized: ") and "broken.safetensors" in lines[0]
    assert lines[1] == ("renamed.bin: SD1.5 Plus (also Plus-Face), 16 tokens, needs penultimate hidden states of a "
                        "48-wide encoder, cross-attention 32")


# ----------------------------------------------------------------------------------------------------
# the loaded adapter


@pytest.fixture
def fresh_cache():
    clear_cache()
    yield
    clear_cache()


def test_load_adapter_is_shared_until_the_file_changes(tmp_path, fresh_cache):
    path = make_adapter("sd15-plus", tmp_path / "a.safetensors")
    first = load_adapter(path)
    assert load_adapter(path) is first
    assert load_adapter(tmp_path / "." / "a.safetensors") is first  # same file, spelled differently
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    second = load_adapter(path)
    assert second is not first and load_adapter(path) is second


def test_loaded_adapter_is_float32_with_the_files_values(tmp_path, fresh_cache):
    path = make_adapter("faceid-sd15", tmp_path / "f.bin", dtype_mix=True)
    adapter, stored = load_adapter(path), load_state_dict(path)["ip_adapter"]
    assert adapter.spec.kind == "faceid" and adapter.path == path.resolve()
    assert all(t.dtype == torch.float32 for t in adapter.to_k_ip + adapter.to_v_ip)
    assert torch.equal(adapter.to_v_ip[3], stored["7.to_v_ip.weight"].float())
    assert set(adapter.lora) == {k for k in stored if "_lora." in k} and len(adapter.lora) == 32 * 8
    assert torch.equal(adapter.lora["30.to_out_lora.up.weight"], stored["30.to_out_lora.up.weight"].float())


def test_adapter_without_lora_has_an_empty_lora_dict(tmp_path, fresh_cache):
    assert load_adapter(make_adapter("sd15", tmp_path / "a.safetensors")).lora == {}


def tiny_unet(family: str) -> UNet2DConditionModel:
    """The tiny UNet topology of runtime/tiny.py (only the structure matters here)."""
    if family == "sd15":
        t = tiny.TINY_SD15
        return UNet2DConditionModel(sample_size=8, block_out_channels=t["block_out_channels"],
                                    layers_per_block=t["layers_per_block"], cross_attention_dim=t["cross_attention_dim"],
                                    attention_head_dim=t["attention_head_dim"], norm_num_groups=t["norm_num_groups"])
    t = tiny.TINY_SDXL
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=t["block_out_channels"], layers_per_block=t["layers_per_block"],
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=t["transformer_layers_per_block"], cross_attention_dim=t["cross_attention_dim"],
        attention_head_dim=t["attention_head_dim"], norm_num_groups=t["norm_num_groups"])


@pytest.mark.parametrize("family,variant", [("sd15", "sd15-plus"), ("sdxl", "faceid-plusv2-sdxl")])
def test_kv_weights_follow_the_unets_cross_attention_order(tmp_path, fresh_cache, family, variant):
    unet = tiny_unet(family)
    names = list(unet.attn_processors)
    attn2 = [(i, n[: -len(".processor")]) for i, n in enumerate(names) if n.endswith("attn2.processor")]
    assert [i for i, _ in attn2] == [2 * k + 1 for k in range(len(attn2))]  # checkpoint key ip_adapter.{2k+1}
    assert tuple(n for _, n in attn2) == attn2_layer_names(family)
    adapter = load_adapter(make_adapter(variant, tmp_path / "a.safetensors"))
    assert len(adapter.to_k_ip) == len(adapter.to_v_ip) == len(attn2) == adapter.spec.num_layers
    for k, (_, name) in enumerate(attn2):
        to_k = unet.get_submodule(name).to_k
        assert adapter.to_k_ip[k].shape == adapter.to_v_ip[k].shape == (to_k.out_features, to_k.in_features), name
