"""Memory: stacked applications share one copy of the adapter weights; the CLIP vision weights can be freed.

Measured by what is reachable, not by RSS: the set of tensor storages (data pointers and bytes) a MODEL's
applications hold, and weak references to the encoder. Peak RSS is a benchmark (benchmarks/memory.py).
"""
from __future__ import annotations

import dataclasses
import gc
import os
import shutil

import numpy as np
import pytest
from conftest import installed_folders
import torch
from PIL import Image

from ipadapter_nodes.core import encode, folders, memo
from ipadapter_nodes.nodes.loaders import IPAdapterUnifiedLoader
from ipadapter_nodes.runtime.executor import Executor
from ipadapter_nodes.runtime.tiny_adapters import make_adapter

ENCODER_FILE = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
PLUS_FILE = "ip-adapter-plus_sd15.safetensors"
PRESET = "PLUS (high strength)"


@pytest.fixture(scope="module")
def layout(tiny_models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    models = root / "models"
    (models / "clip_vision").mkdir(parents=True)
    shutil.copyfile(tiny_models_dir / "clip_vision" / "tiny-vit-h.safetensors", models / "clip_vision" / ENCODER_FILE)
    make_adapter("sd15-plus", models / "ipadapter" / PLUS_FILE, seed=31)
    (root / "input").mkdir()
    pixels = np.random.default_rng(6).integers(0, 256, size=(64, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "input" / "reference.png")
    Image.fromarray(255 - pixels).save(root / "input" / "other.png")
    with installed_folders(root, models, tiny_models_dir):
        yield root


def storages(obj, found: dict | None = None, seen: set | None = None) -> dict[int, int]:
    """{storage data pointer: bytes} of every tensor reachable from ``obj`` through modules, dataclasses and
    containers."""
    found = {} if found is None else found
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return found
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        found[storage.data_ptr()] = storage.nbytes()
    elif isinstance(obj, torch.nn.Module):
        for tensor in obj.state_dict(keep_vars=True).values():
            storages(tensor, found, seen)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for field in dataclasses.fields(obj):
            storages(getattr(obj, field.name), found, seen)
    elif isinstance(obj, dict):
        for value in obj.values():
            storages(value, found, seen)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            storages(value, found, seen)
    return found


def _stacked_prompt(count: int, *, free: bool = False, weight: float = 1.0, image: str = "reference.png") -> dict:
    """CheckpointLoader → Unified Loader → ``count`` IPAdapter applies, each on the previous one's MODEL."""
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15"}},
        "5": {"class_type": "LoadImage", "inputs": {"image": image}},
        "6": {"class_type": "IPAdapterUnifiedLoader", "inputs": {"model": ["1", 0], "preset": PRESET,
                                                                 "free_clip_vision": free}},
    }
    model = ["6", 0]
    for n in range(count):
        node = str(100 + n)
        prompt[node] = {"class_type": "IPAdapterAdvanced", "inputs": {
            "model": model, "ipadapter": ["6", 1], "image": ["5", 0], "weight": weight * (1 + n / 10),
            "weight_type": "linear", "combine_embeds": "concat", "start_at": 0.0, "end_at": 1.0,
            "embeds_scaling": "V only"}}
        model = [node, 0]
    return prompt


def _final_model(count: int, **options):
    prompt = _stacked_prompt(count, **options)
    last = str(100 + count - 1)
    return Executor(progress=False).execute(prompt, outputs=[last]).node_outputs[last][0]


def test_eight_stacked_applications_hold_the_tensors_of_one(layout):
    memo.ENCODER_MEMO.clear()
    one, eight = _final_model(1), _final_model(8)
    assert len(eight.applications) == 8
    assert all(app.adapter is one.applications[0].adapter for app in eight.applications)
    assert eight.unet is one.unet
    held_one, held_eight = storages(one.applications), storages(eight.applications)
    # adapter weights and the (memoized) reference features: the same storages, not copies
    assert set(held_eight) == set(held_one)
    assert sum(held_eight.values()) == sum(held_one.values())
    adapter_storages = storages(one.applications[0].adapter)
    assert len(adapter_storages) > 16 and set(adapter_storages) <= set(held_eight)


def test_free_clip_vision_lets_the_encoder_weights_go_after_encoding(layout):
    memo.ENCODER_MEMO.clear()
    encode_path = folders.get_full_path_or_raise("clip_vision", ENCODER_FILE)
    executor = Executor(progress=False)
    prompt = _stacked_prompt(1, free=True)
    model = executor.execute(prompt, outputs=["100"]).node_outputs["100"][0]
    handle = executor.execute(prompt, outputs=["6"]).node_outputs["6"][1]["clipvision"]["model"]
    assert memo.is_on_demand(handle) and isinstance(handle, encode.ClipVision)
    assert not handle.is_loaded
    gc.collect()
    # nothing keeps a loaded encoder of that file alive: not the handle, the executor, nor the loader's cache
    real = os.path.realpath(encode_path)
    alive = [obj for obj in gc.get_objects()
             if isinstance(obj, encode.ClipVision) and not memo.is_on_demand(obj) and obj.source == real]
    assert alive == []
    assert len(model.applications) == 1
    loads = handle.loads
    executor.execute(_stacked_prompt(1, free=True, weight=0.5), outputs=["100"])
    assert handle.loads == loads  # only the weight changed: the memo answers, nothing is loaded
    executor.execute(_stacked_prompt(1, free=True, image="other.png"), outputs=["100"])
    assert handle.loads == loads + 1 and not handle.is_loaded  # a new image: loaded for it, then let go


def test_free_clip_vision_gives_the_same_features_as_the_loaded_encoder(layout):
    memo.ENCODER_MEMO.clear()
    kept = _final_model(1, free=False).applications[0].embeds
    memo.ENCODER_MEMO.clear()
    freed = _final_model(1, free=True).applications[0].embeds
    assert torch.equal(kept.cond, freed.cond) and torch.equal(kept.uncond, freed.uncond)


def test_free_clip_vision_is_appended_after_the_existing_inputs():
    types = IPAdapterUnifiedLoader.INPUT_TYPES()
    assert list(types["required"]) == ["model", "preset"]
    assert list(types["optional"]) == ["ipadapter", "free_clip_vision"]
    assert types["optional"]["free_clip_vision"][1]["default"] is False


def test_an_on_demand_encoder_loads_once_for_chunked_encoding(layout, monkeypatch):
    """encode_batch_size splits the images; the encoder is held across the chunks, not reloaded per chunk."""
    from ipadapter_nodes.core import apply as engine
    from ipadapter_nodes.core.adapter import load_adapter

    memo.ENCODER_MEMO.clear()
    handle = engine.load_clip_vision_on_demand(folders.get_full_path_or_raise("clip_vision", ENCODER_FILE))
    adapter = load_adapter(folders.get_full_path_or_raise("ipadapter", PLUS_FILE))
    images = torch.rand(3, 48, 48, 3, generator=torch.Generator().manual_seed(8))
    loads = handle.loads
    embeds = engine.encode_images(adapter, handle, images, encode_batch_size=1)
    assert embeds.count == 3
    assert handle.loads == loads + 1 and not handle.is_loaded
