"""Embeds nodes: declarations as in the existing pack, each combine method by numbers, the noise node, saving
and loading files through the nodes.  Workflows with sampling are in test_issue5_workflows.py."""
from __future__ import annotations

import math

import pytest
import torch

from ipadapter_nodes.core import folders
from ipadapter_nodes.core.embeds import Embeds
from ipadapter_nodes.core.embeds_io import EmbedsFileError
from ipadapter_nodes.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from ipadapter_nodes.nodes.embeds import (IPAdapterCombineEmbeds, IPAdapterLoadEmbeds, IPAdapterNoise,
                                          IPAdapterSaveEmbeds)
from ipadapter_nodes.runtime.models import configure_folders

from test_batch_nodes import END, SCALING, START, WEIGHT_TYPES, _sockets, _widgets


@pytest.mark.parametrize("name", ["IPAdapterEmbeds", "IPAdapterEmbedsBatch"])
def test_apply_embeds_declarations_equal_the_existing_pack(name):
    cls = NODE_CLASS_MAPPINGS[name]
    assert NODE_DISPLAY_NAME_MAPPINGS[name] == {"IPAdapterEmbeds": "IPAdapter Embeds",
                                                "IPAdapterEmbedsBatch": "IPAdapter Embeds Batch"}[name]
    assert cls.CATEGORY == "ipadapter/embeds" and cls.RETURN_TYPES == ("MODEL",)
    assert _widgets(cls) == [("weight", "FLOAT", 1.0, -1.0, 3.0), ("weight_type", WEIGHT_TYPES, "linear"), START, END,
                             ("embeds_scaling", SCALING, "V only")]
    assert _sockets(cls) == (["model", "ipadapter", "pos_embed"], ["neg_embed", "attn_mask", "clip_vision"])


def test_utility_declarations_equal_the_existing_pack():
    encoder = NODE_CLASS_MAPPINGS["IPAdapterEncoder"]
    assert _widgets(encoder) == [("weight", "FLOAT", 1.0, -1.0, 3.0)]
    assert _sockets(encoder) == (["ipadapter", "image"], ["mask", "clip_vision"])
    assert (encoder.RETURN_TYPES, encoder.RETURN_NAMES) == (("EMBEDS", "EMBEDS"), ("pos_embed", "neg_embed"))
    assert _widgets(IPAdapterCombineEmbeds) == [
        ("method", ("concat", "add", "subtract", "average", "norm average", "max", "min"), "concat")]
    assert _sockets(IPAdapterCombineEmbeds) == (["embed1"], ["embed2", "embed3", "embed4", "embed5"])
    # the pack's four noise types first; ours ("blur") appended at the end
    assert _widgets(IPAdapterNoise) == [("type", ("fade", "dissolve", "gaussian", "shuffle", "blur"), "fade"),
                                        ("strength", "FLOAT", 1.0, 0.0, 1.0), ("blur", "INT", 0, 0, 32)]
    assert _sockets(IPAdapterNoise) == ([], ["image_optional"])
    assert IPAdapterNoise.CATEGORY == "ipadapter/utils" and IPAdapterNoise.RETURN_TYPES == ("IMAGE",)
    assert _widgets(IPAdapterSaveEmbeds) == [("filename_prefix", "STRING", "IP_embeds", None, None)]
    assert IPAdapterSaveEmbeds.OUTPUT_NODE is True and IPAdapterSaveEmbeds.RETURN_TYPES == ()
    assert IPAdapterLoadEmbeds.RETURN_TYPES == ("EMBEDS",)
    for name, display in [("IPAdapterEncoder", "IPAdapter Encoder"), ("IPAdapterCombineEmbeds", "IPAdapter Combine Embeds"),
                          ("IPAdapterNoise", "IPAdapter Noise"), ("IPAdapterSaveEmbeds", "IPAdapter Save Embeds"),
                          ("IPAdapterLoadEmbeds", "IPAdapter Load Embeds")]:
        assert NODE_DISPLAY_NAME_MAPPINGS[name] == display
        if name != "IPAdapterNoise":
            assert NODE_CLASS_MAPPINGS[name].CATEGORY == "ipadapter/embeds"


def _embeds(*rows: list[float], uncond: float = 0.0) -> Embeds:
    cond = torch.tensor([rows[0]])
    return Embeds(cond, torch.full_like(cond, uncond), "image_embeds")


E1, E2, E3 = _embeds([1.0, 2.0], uncond=-1.0), _embeds([3.0, -4.0], uncond=-2.0), _embeds([5.0, 0.0], uncond=-3.0)


@pytest.mark.parametrize("method, expected", [
    ("add", [9.0, -2.0]),
    ("subtract", [1.0 - 4.0, 2.0 - (-2.0)]),
    ("average", [3.0, -2.0 / 3.0]),
    ("norm average", [(1 + 3 + 5) / math.sqrt(35) / 3, (2 - 4 + 0) / math.sqrt(20) / 3]),
    ("max", [5.0, 2.0]),
    ("min", [1.0, -4.0]),
])
def test_each_reducing_combine_method_by_numbers(method, expected):
    (out,) = IPAdapterCombineEmbeds().batch(E1, method, embed2=E2, embed4=E3)
    assert out.cond.shape == (1, 2)
    assert out.cond[0].tolist() == pytest.approx(expected)
    assert out.uncond.tolist() == [[-1.0, -1.0]]  # the first reference's uncond, as the pack keeps it


def test_concat_keeps_every_reference_in_order():
    (out,) = IPAdapterCombineEmbeds().batch(E1, "concat", embed3=E2, embed5=E3)
    assert out.cond.tolist() == [[1.0, 2.0], [3.0, -4.0], [5.0, 0.0]]
    assert out.uncond[:, 0].tolist() == [-1.0, -2.0, -3.0]
    assert IPAdapterCombineEmbeds().batch(E1, "concat")[0] is E1


def test_noise_is_deterministic_and_seeded_by_the_image():
    image = torch.rand(1, 40, 60, 3, generator=torch.manual_seed(0))
    first = IPAdapterNoise().make_noise("dissolve", 0.5, 0, image)[0]
    assert first.shape == (1, 224, 224, 3)
    assert torch.equal(first, IPAdapterNoise().make_noise("dissolve", 0.5, 0, image)[0])
    assert not torch.equal(first, IPAdapterNoise().make_noise("dissolve", 0.5, 0, image.flip(2))[0])
    assert torch.equal(IPAdapterNoise().make_noise("blur", 0.0, 0, None)[0], torch.zeros(1, 224, 224, 3))


@pytest.fixture
def io_folder(tmp_path):
    previous = folders.provider()
    configure_folders(models_dir=tmp_path / "models", input_dir=tmp_path, output_dir=tmp_path)
    yield tmp_path
    folders.configure(previous)


def test_save_numbers_files_and_load_lists_and_reads_them_bit_identically(io_folder):
    embeds = Embeds(torch.randn(2, 257, 8, generator=torch.manual_seed(1)), torch.randn(1, 257, 8).expand(2, -1, -1),
                    "hidden_states")
    first = IPAdapterSaveEmbeds().save(embeds, "sub/IP_embeds")
    second = IPAdapterSaveEmbeds().save(embeds, "sub/IP_embeds")
    assert [first["ui"]["embeds"][0]["filename"], second["ui"]["embeds"][0]["filename"]] == \
        ["IP_embeds_00001_.safetensors", "IP_embeds_00002_.safetensors"]
    assert first["ui"]["embeds"][0]["subfolder"] == "sub" and first["result"] == ()
    (io_folder / "notes.txt").write_text("not embeds")
    listed = IPAdapterLoadEmbeds.INPUT_TYPES()["required"]["embeds"][0]
    assert listed == ["sub/IP_embeds_00001_.safetensors", "sub/IP_embeds_00002_.safetensors"]
    (loaded,) = IPAdapterLoadEmbeds().load(listed[0])
    assert torch.equal(loaded.cond, embeds.cond) and torch.equal(loaded.uncond, embeds.uncond)
    assert loaded.feature == "hidden_states"


def test_load_lists_legacy_files_and_refuses_names_outside_the_input_folder(io_folder):
    torch.save(torch.stack([torch.ones(1, 32), torch.zeros(1, 32)]), io_folder / "old.ipadpt")
    assert IPAdapterLoadEmbeds.INPUT_TYPES()["required"]["embeds"][0] == ["old.ipadpt"]
    (loaded,) = IPAdapterLoadEmbeds().load("old.ipadpt")
    assert loaded.cond.tolist() == [[1.0] * 32] and not loaded.uncond.any()
    assert IPAdapterLoadEmbeds.VALIDATE_INPUTS("old.ipadpt") is True
    assert "outside" in IPAdapterLoadEmbeds.VALIDATE_INPUTS("../secret.ipadpt")
    assert "not found" in IPAdapterLoadEmbeds.VALIDATE_INPUTS("missing.ipadpt")


def test_a_truncated_file_is_a_clear_error(io_folder):
    IPAdapterSaveEmbeds().save(_embeds([1.0, 2.0]), "cut")
    path = io_folder / "cut_00001_.safetensors"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(EmbedsFileError, match="cut_00001_.safetensors"):
        IPAdapterLoadEmbeds().load(path.name)
