"""Embeds files: our safetensors format, the pack's and diffusers' legacy layouts, unsafe and broken files."""
from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch

from ipadapter_nodes.core import embeds_io
from ipadapter_nodes.core.embeds import Embeds
from ipadapter_nodes.core.embeds_io import EmbedsFileError, load_embeds, next_free_path, read_embeds_file, save_embeds


def _rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# Widths of the tiny encoders (runtime/tiny.py): ViT-H image_embeds 32, hidden 48; 257 tokens; faces 512.
EMBEDS_KINDS = {
    "image_embeds": lambda: Embeds(_rand(2, 32, seed=1), torch.zeros(2, 32), "image_embeds"),
    "hidden_states": lambda: Embeds(_rand(3, 257, 48, dtype=torch.float16, seed=2),
                                    _rand(1, 257, 48, dtype=torch.float16, seed=3).expand(3, 257, 48), "hidden_states"),
    "face": lambda: Embeds(_rand(1, 512, seed=4), torch.zeros(1, 512), "face"),
    "faceid_plus": lambda: Embeds(_rand(2, 512, seed=5), torch.zeros(2, 512), "face",
                                  _rand(2, 257, 48, dtype=torch.bfloat16, seed=6),
                                  _rand(2, 257, 48, dtype=torch.bfloat16, seed=7)),
}


@pytest.mark.parametrize("kind", sorted(EMBEDS_KINDS))
def test_round_trip_is_bit_identical(tmp_path, kind):
    embeds = EMBEDS_KINDS[kind]()
    path = save_embeds(embeds, tmp_path / f"{kind}.safetensors")
    loaded = load_embeds(path)
    assert loaded.feature == embeds.feature and loaded.count == embeds.count
    for name in ("cond", "uncond", "clip_cond", "clip_uncond"):
        before, after = getattr(embeds, name), getattr(loaded, name)
        if before is None:
            assert after is None
            continue
        assert after.dtype == before.dtype and after.shape == before.shape
        # bit-identical: compare the raw bytes, so even -0.0/NaN patterns would count
        assert torch.equal(after.contiguous().view(torch.uint8), before.contiguous().view(torch.uint8))


def test_metadata_names_format_feature_width_and_count(tmp_path):
    path = save_embeds(EMBEDS_KINDS["faceid_plus"](), tmp_path / "e.safetensors", metadata={"adapter": "x.bin"})
    info = read_embeds_file(path)
    meta = info.metadata
    assert meta["format"] == "ipadapter_nodes.embeds" and meta["format_version"] == "1"
    assert (meta["feature"], meta["count"], meta["encoder_width"], meta["tokens"], meta["face_width"]) == \
        ("face", "2", "48", "257", "512")
    assert meta["has_clip"] == "true" and meta["adapter"] == "x.bin"
    assert info.layout == "ipadapter_nodes" and info.uncond_known
    hidden = read_embeds_file(save_embeds(EMBEDS_KINDS["hidden_states"](), tmp_path / "h.safetensors")).metadata
    assert (hidden["encoder_width"], hidden["tokens"], hidden["dtype"], hidden["has_clip"]) == \
        ("48", "257", "float16", "false")


def test_reserved_metadata_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_embeds(EMBEDS_KINDS["face"](), tmp_path / "e.safetensors", metadata={"feature": "x"})
    assert list(tmp_path.iterdir()) == []


def test_existing_file_is_never_overwritten(tmp_path):
    path = save_embeds(EMBEDS_KINDS["image_embeds"](), tmp_path / "IP_embeds_00001_.safetensors")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="IP_embeds_00001_.safetensors"):
        save_embeds(EMBEDS_KINDS["face"](), path)
    assert path.read_bytes() == before
    assert next_free_path(tmp_path, "IP_embeds").name == "IP_embeds_00002_.safetensors"


def test_next_free_path_numbers_like_comfyui(tmp_path):
    assert next_free_path(tmp_path, "IP_embeds").name == "IP_embeds_00001_.safetensors"
    (tmp_path / "IP_embeds_00007_.safetensors").write_bytes(b"")
    (tmp_path / "other_00042_.safetensors").write_bytes(b"")
    assert next_free_path(tmp_path, "IP_embeds").name == "IP_embeds_00008_.safetensors"
    nested = next_free_path(tmp_path, "embeds/run", ext=".ipadpt")
    assert nested == tmp_path / "embeds" / "run_00001_.ipadpt" and nested.parent.is_dir()
    with pytest.raises(ValueError, match="outside"):
        next_free_path(tmp_path, "../escape")


def test_numbered_save_takes_the_next_counter(tmp_path):
    first = embeds_io.save_embeds_numbered(EMBEDS_KINDS["face"](), tmp_path, "IP_embeds")
    second = embeds_io.save_embeds_numbered(EMBEDS_KINDS["face"](), tmp_path, "IP_embeds")
    assert (first.name, second.name) == ("IP_embeds_00001_.safetensors", "IP_embeds_00002_.safetensors")


def test_name_taken_during_the_write_is_not_overwritten(tmp_path, monkeypatch):
    target = tmp_path / "e.safetensors"
    real_write = embeds_io._write_all

    def write_while_another_writer_takes_the_name(handle, data):
        target.write_bytes(b"the other writer's file")
        real_write(handle, data)

    monkeypatch.setattr(embeds_io, "_write_all", write_while_another_writer_takes_the_name)
    with pytest.raises(FileExistsError, match="e.safetensors"):
        save_embeds(EMBEDS_KINDS["face"](), target)
    assert target.read_bytes() == b"the other writer's file"
    assert [p.name for p in tmp_path.iterdir()] == ["e.safetensors"]


def test_file_system_without_hard_links_still_writes_without_overwriting(tmp_path, monkeypatch):
    def no_links(*args, **kwargs):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(embeds_io.os, "link", no_links)
    embeds = EMBEDS_KINDS["hidden_states"]()
    path = save_embeds(embeds, tmp_path / "e.safetensors")
    assert torch.equal(load_embeds(path).cond, embeds.cond)
    real_write = embeds_io._write_all

    def write_while_another_writer_takes_the_name(handle, data):
        (tmp_path / "f.safetensors").write_bytes(b"other")
        real_write(handle, data)

    monkeypatch.setattr(embeds_io, "_write_all", write_while_another_writer_takes_the_name)
    with pytest.raises(FileExistsError, match="f.safetensors"):
        save_embeds(embeds, tmp_path / "f.safetensors")
    assert (tmp_path / "f.safetensors").read_bytes() == b"other"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.safetensors", "f.safetensors"]


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    def write_half_then_interrupt(handle, data):
        handle.write(data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(embeds_io, "_write_all", write_half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_embeds(EMBEDS_KINDS["hidden_states"](), tmp_path / "e.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_pack_v1_stacked_cond_first_loads(tmp_path):
    # ComfyUI_IPAdapter_plus before 2024-03: torch.save(torch.stack((cond, uncond))) of a Plus encoding.
    cond, uncond = _rand(2, 257, 48, seed=8), _rand(1, 257, 48, seed=9).repeat(2, 1, 1)
    path = tmp_path / "IPAdapter_00001_.ipadpt"
    torch.save(torch.stack((cond, uncond)), path)
    info = read_embeds_file(path)
    assert info.layout == "ipadapter_plus_v1" and info.embeds.feature == "hidden_states"
    assert torch.equal(info.embeds.cond, cond) and torch.equal(info.embeds.uncond, uncond)


def test_pack_v1_single_image_base_embeds_loads(tmp_path):
    cond = _rand(1, 32, seed=10)
    torch.save(torch.stack((cond, torch.zeros_like(cond))), tmp_path / "e.ipadpt")
    loaded = load_embeds(tmp_path / "e.ipadpt")
    assert loaded.feature == "image_embeds"
    assert torch.equal(loaded.cond, cond) and not loaded.uncond.any()


def test_pack_single_side_file_loads_as_cond_with_unknown_uncond(tmp_path):
    # The current pack saves one EMBEDS socket: the Encoder's pos_embed, [N, 257, H] for Plus adapters.
    pos = _rand(2, 257, 48, seed=11)
    torch.save(pos, tmp_path / "IP_embeds_00001.ipadpt")
    info = read_embeds_file(tmp_path / "IP_embeds_00001.ipadpt")
    assert info.layout == "ipadapter_plus" and not info.uncond_known
    assert info.embeds.feature == "hidden_states" and torch.equal(info.embeds.cond, pos)
    assert info.embeds.uncond.shape == pos.shape and not info.embeds.uncond.any()


@pytest.mark.parametrize("container", ["list", "tensor"])
def test_diffusers_layout_uncond_first_loads(tmp_path, container):
    # prepare_ip_adapter_image_embeds with CFG: cat([neg, pos]) of [1, n_img, E], neg = zeros for base adapters.
    pos = _rand(1, 3, 32, seed=12)
    stacked = torch.cat([torch.zeros_like(pos), pos])
    torch.save([stacked] if container == "list" else stacked, tmp_path / "d.ipadpt")
    info = read_embeds_file(tmp_path / "d.ipadpt")
    assert info.layout == "diffusers"
    assert torch.equal(info.embeds.cond, pos[0]) and not info.embeds.uncond.any()


def test_diffusers_hidden_states_list_with_prompt_batch_loads(tmp_path):
    # batch of 2 prompts: [2B = 4, n = 1, 257, H], the same reference repeated per prompt; uncond half first.
    pos, neg = _rand(1, 1, 257, 48, seed=13), _rand(1, 1, 257, 48, seed=14)
    torch.save([torch.cat([neg, neg, pos, pos])], tmp_path / "d.ipadpt")
    loaded = load_embeds(tmp_path / "d.ipadpt")
    assert loaded.feature == "hidden_states"
    assert torch.equal(loaded.cond, pos[0]) and torch.equal(loaded.uncond, neg[0])


def test_ambiguous_bare_stack_follows_explicit_layout(tmp_path):
    first, second = _rand(1, 257, 48, seed=15), _rand(1, 257, 48, seed=16)
    torch.save(torch.stack((first, second)), tmp_path / "x.ipadpt")
    as_pack = load_embeds(tmp_path / "x.ipadpt")
    as_diffusers = load_embeds(tmp_path / "x.ipadpt", layout="diffusers")
    assert torch.equal(as_pack.cond, first) and torch.equal(as_pack.uncond, second)
    assert torch.equal(as_diffusers.cond, second) and torch.equal(as_diffusers.uncond, first)


def test_diffusers_faceid_layout_loads_as_face(tmp_path):
    face = _rand(1, 1, 1, 512, seed=17)
    torch.save([torch.cat([torch.zeros_like(face), face])], tmp_path / "f.ipadpt")
    loaded = load_embeds(tmp_path / "f.ipadpt")
    assert loaded.feature == "face" and torch.equal(loaded.cond, face[0, :, 0])


def test_list_of_several_adapters_needs_an_index(tmp_path):
    a, b = torch.cat([torch.zeros(1, 1, 32), _rand(1, 1, 32, seed=18)]), torch.cat([torch.zeros(1, 1, 40),
                                                                                     _rand(1, 1, 40, seed=19)])
    torch.save([a, b], tmp_path / "two.ipadpt")
    with pytest.raises(EmbedsFileError, match=r"two\.ipadpt.*2 IP-Adapters.*index 0\.\.1"):
        load_embeds(tmp_path / "two.ipadpt")
    assert torch.equal(load_embeds(tmp_path / "two.ipadpt", index=1).cond, b[1])


class Payload:
    """Harmless stand-in for malicious code: unpickling it would create a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch notes the protocol-4 pickle
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dumps"])
def test_pickle_that_would_run_code_is_refused(tmp_path, writer):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.ipadpt"
    payload = [torch.zeros(2, 1, 32), Payload(marker)]
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(EmbedsFileError) as caught:
        load_embeds(path)
    message = str(caught.value)
    assert "evil.ipadpt" in message and "refused" in message and "execute code" in message
    assert not marker.exists()


def test_truncated_safetensors_names_the_file(tmp_path):
    path = save_embeds(EMBEDS_KINDS["hidden_states"](), tmp_path / "cut.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(EmbedsFileError, match=r"cut\.safetensors.*truncated or corrupt"):
        load_embeds(path)


def test_truncated_ipadpt_names_the_file(tmp_path):
    path = tmp_path / "cut.ipadpt"
    torch.save([torch.zeros(2, 1, 32)], path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(EmbedsFileError, match=r"cut\.ipadpt.*(truncated|corrupt)"):
        load_embeds(path)


def test_foreign_safetensors_is_named_not_embeds(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(EmbedsFileError, match=r"model\.safetensors.*not an IP-Adapter embeds file.*'weight'"):
        load_embeds(tmp_path / "model.safetensors")


def test_newer_format_version_asks_for_an_update(tmp_path):
    path = save_embeds(EMBEDS_KINDS["face"](), tmp_path / "e.safetensors")
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    header["__metadata__"]["format_version"] = "9"
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(length)  # same length keeps the offsets
    assert len(raw) == length
    path.write_bytes(bytes(data[:8]) + raw + bytes(data[8 + length:]))
    with pytest.raises(EmbedsFileError, match="version 9, newer"):
        load_embeds(path)


def test_missing_file_and_garbage_are_named(tmp_path):
    with pytest.raises(EmbedsFileError, match="nope.ipadpt"):
        load_embeds(tmp_path / "nope.ipadpt")
    (tmp_path / "junk.ipadpt").write_bytes(b"hello world, not embeds")
    with pytest.raises(EmbedsFileError, match="junk.ipadpt"):
        load_embeds(tmp_path / "junk.ipadpt")
