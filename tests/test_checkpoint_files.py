"""Reading IP-Adapter files: both containers, the training spellings, mixed dtypes, and every kind of bad file."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ipadapter_nodes.core.checkpoint import AdapterFileError, load_state_dict, read_layout
from ipadapter_nodes.runtime.tiny_adapters import make_adapter, random_state_dict


def assert_same_parts(loaded: dict, expected: dict) -> None:
    assert set(loaded) == {"image_proj", "ip_adapter"}
    for part in ("image_proj", "ip_adapter"):
        assert set(loaded[part]) == set(expected[part])
        for key, value in expected[part].items():
            assert loaded[part][key].dtype == value.dtype, key
            assert torch.equal(loaded[part][key], value), key


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_file_round_trips_to_the_two_parts(tmp_path, suffix):
    path = make_adapter("sd15-plus", tmp_path / f"a{suffix}", seed=3)
    assert_same_parts(load_state_dict(path), random_state_dict("sd15-plus", "tiny", seed=3))


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_mixed_dtypes_come_back_as_stored(tmp_path, suffix):
    path = make_adapter("faceid-sd15", tmp_path / f"a{suffix}", dtype_mix=True)
    parts = load_state_dict(path)
    assert {t.dtype for t in parts["image_proj"].values()} == {torch.float32}
    assert {t.dtype for t in parts["ip_adapter"].values()} == {torch.float16}


def test_bf16_parts_come_back_as_stored(tmp_path):
    path = make_adapter("sd15", tmp_path / "a.safetensors", dtype=torch.bfloat16)
    assert {t.dtype for t in load_state_dict(path)["ip_adapter"].values()} == {torch.bfloat16}


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_training_prefixes_are_accepted(tmp_path, suffix):
    path = make_adapter("sd15", tmp_path / f"a{suffix}", prefixes=("image_proj_model", "adapter_modules"))
    assert_same_parts(load_state_dict(path), random_state_dict("sd15", "tiny"))


def test_flat_training_keys_inside_a_bin_are_accepted(tmp_path):
    state = random_state_dict("sd15", "tiny")
    flat = {f"image_proj_model.{k}": v for k, v in state["image_proj"].items()}
    flat.update({f"adapter_modules.{k}": v for k, v in state["ip_adapter"].items()})
    flat["unet.conv_in.weight"] = torch.zeros(1)  # training checkpoints carry more; it is ignored
    torch.save(flat, tmp_path / "pytorch_model.bin")
    assert_same_parts(load_state_dict(tmp_path / "pytorch_model.bin"), state)


def test_container_is_recognised_from_content_not_suffix(tmp_path):
    renamed = make_adapter("sd15", tmp_path / "a.safetensors").rename(tmp_path / "really_safetensors.bin")
    assert_same_parts(load_state_dict(renamed), random_state_dict("sd15", "tiny"))


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_read_layout_gives_shapes_and_dtypes_without_data(tmp_path, suffix):
    path = make_adapter("sdxl-plus-vit-h", tmp_path / f"a{suffix}", dtype_mix=True)
    layout, full = read_layout(path), load_state_dict(path)
    for part in ("image_proj", "ip_adapter"):
        assert {k: (v.shape, v.dtype) for k, v in layout[part].items()} == {
            k: (v.shape, v.dtype) for k, v in full[part].items()}
        assert all(v.device.type == "meta" for v in layout[part].values())


# ----------------------------------------------------------------------------------------------------
# bad files: each is an AdapterFileError (a ValueError) that names the file


def error_for(path: Path) -> str:
    with pytest.raises(AdapterFileError) as caught:
        load_state_dict(path)
    assert isinstance(caught.value, ValueError)
    assert path.name in str(caught.value)
    return str(caught.value)


def test_missing_file(tmp_path):
    assert "does not exist" in error_for(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_safetensors(tmp_path, keep):
    path = make_adapter("sd15", tmp_path / "cut.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    assert "truncated" in error_for(path)


def test_truncated_bin(tmp_path):
    path = make_adapter("sd15", tmp_path / "cut.bin")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "not a readable torch checkpoint" in error_for(path)


@pytest.mark.parametrize("name", ["junk.safetensors", "junk.bin", "junk.pt"])
def test_garbage_bytes(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(bytes(range(7, 250)) * 40)
    assert "corrupt" in error_for(path)


def test_empty_file(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    error_for(tmp_path / "empty.safetensors")


class Payload:
    """Unpickling this touches a marker file: harmless, but proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps({"image_proj": {"x": Payload(marker)}, "ip_adapter": {}}, protocol=2))
    message = error_for(path)
    assert "refusing to unpickle" in message and "run Python code" in message and ".safetensors" in message
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the payload is live: a plain unpickle does run it
    assert marker.exists()


def test_torch_saved_object_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"image_proj": {"proj.weight": torch.zeros(2)}, "ip_adapter": Payload(marker)}, path)
    assert "refusing to unpickle" in error_for(path)
    assert not marker.exists()


def test_lora_file_is_named_as_such(tmp_path):
    path = tmp_path / "some_lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)}, str(path))
    message = error_for(path)
    assert "not an IP-Adapter" in message and "LoRA" in message and "lora_unet_down_blocks_0" in message


def test_unrelated_dict_lists_its_keys(tmp_path):
    path = tmp_path / "other.bin"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "global_step": 10}, path)
    message = error_for(path)
    assert "'state_dict'" in message and "'global_step'" in message and "checkpoint" in message


@pytest.mark.parametrize("obj", [torch.zeros(3), [torch.zeros(3)], 7])
def test_non_dict_torch_file(tmp_path, obj):
    path = tmp_path / "thing.pt"
    torch.save(obj, path)
    assert "not a dict" in error_for(path)
