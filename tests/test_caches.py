"""Caches: adapter files loaded once and shared, encoder outputs memoized, projection and K/V once per run.

Workflows run through the headless executor on the tiny SD1.5 model (64×64 px, 2-3 steps):
LoadImage → IPAdapterModelLoader + CLIPVisionLoader → IPAdapterAdvanced → KSampler → SaveImage, and the
FaceID Plus form of it. Encoder work is counted by hooks on the transformers CLIP vision class and on the
InsightFace detector, never timed.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import installed_folders
import torch
from PIL import Image
from transformers import CLIPVisionModelWithProjection

from ipadapter_nodes.core import adapter as adapter_module
from ipadapter_nodes.core import embeds as embeds_module
from ipadapter_nodes.core import faceid, folders, memo
from ipadapter_nodes.core.adapter import load_adapter
from ipadapter_nodes.core.encode import load_clip_vision
from ipadapter_nodes.runtime.executor import Executor
from ipadapter_nodes.runtime.tiny_adapters import make_adapter
from tiny_faces import face_image

ENCODER_FILE = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
PLUS_FILE = "ip-adapter-plus_sd15.safetensors"
BASE_FILE = "ip-adapter_sd15.safetensors"
FACEID_PLUS_FILE = "ip-adapter-faceid-plus_sd15.bin"


@pytest.fixture(scope="module")
def layout(tiny_models_dir, tiny_faces_dir, tmp_path_factory):
    """Tiny models, the tiny ViT-H under its public name, tiny adapters, a reference picture and a face."""
    root = tmp_path_factory.mktemp("caches")
    models = root / "models"
    (models / "clip_vision").mkdir(parents=True)
    shutil.copyfile(tiny_models_dir / "clip_vision" / "tiny-vit-h.safetensors", models / "clip_vision" / ENCODER_FILE)
    make_adapter("sd15-plus", models / "ipadapter" / PLUS_FILE, seed=21)
    make_adapter("sd15", models / "ipadapter" / BASE_FILE, seed=22)
    make_adapter("faceid-plus-sd15", models / "ipadapter" / FACEID_PLUS_FILE, seed=23)
    (root / "input").mkdir()
    pixels = np.random.default_rng(5).integers(0, 256, size=(72, 88, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "input" / "reference.png")
    face = (face_image(128, seed=3)[0].numpy() * 255).round().astype(np.uint8)
    Image.fromarray(face).save(root / "input" / "face.png")
    with installed_folders(root, models, tiny_models_dir):
        yield root


@pytest.fixture
def clip_forwards(monkeypatch):
    """A list that grows by the batch size of every CLIP vision tower forward (any instance)."""
    calls: list[int] = []
    original = CLIPVisionModelWithProjection.forward

    def counting(self, pixel_values=None, **kwargs):
        calls.append(int(pixel_values.shape[0]))
        return original(self, pixel_values=pixel_values, **kwargs)

    monkeypatch.setattr(CLIPVisionModelWithProjection, "forward", counting)
    memo.ENCODER_MEMO.clear()
    return calls


def _prompt(weight: float = 1.0, *, weight_type: str = "linear", start_at: float = 0.0, end_at: float = 1.0,
            adapter_file: str = PLUS_FILE, steps: int = 2, image: str = "reference.png") -> dict:
    """LoadImage → IPAdapterModelLoader + CLIPVisionLoader → IPAdapterAdvanced → KSampler → SaveImage."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red house", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "LoadImage", "inputs": {"image": image}},
        "6": {"class_type": "IPAdapterModelLoader", "inputs": {"ipadapter_file": adapter_file}},
        "11": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": ENCODER_FILE}},
        "7": {"class_type": "IPAdapterAdvanced", "inputs": {
            "model": ["1", 0], "ipadapter": ["6", 0], "clip_vision": ["11", 0], "image": ["5", 0],
            "weight": weight, "weight_type": weight_type, "combine_embeds": "concat", "start_at": start_at,
            "end_at": end_at, "embeds_scaling": "V only"}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["7", 0], "seed": 3, "steps": steps, "cfg": 4.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "caches"}},
    }


# ---- adapter files --------------------------------------------------------------------------------------------

def test_every_loader_node_shares_one_adapter_object_loaded_once(layout, monkeypatch):
    """Two IPAdapterModelLoader nodes and a Unified Loader naming the same file get one object, read once."""
    adapter_module.clear_cache()
    reads = []
    original = adapter_module.load_state_dict
    monkeypatch.setattr(adapter_module, "load_state_dict", lambda path: reads.append(path) or original(path))
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15"}},
        "6": {"class_type": "IPAdapterModelLoader", "inputs": {"ipadapter_file": PLUS_FILE}},
        "12": {"class_type": "IPAdapterModelLoader", "inputs": {"ipadapter_file": PLUS_FILE}},
        "13": {"class_type": "IPAdapterUnifiedLoader", "inputs": {"model": ["1", 0], "preset": "PLUS (high strength)"}},
    }
    outputs = Executor(progress=False).execute(prompt, outputs=["6", "12", "13"]).node_outputs
    again = Executor(progress=False).execute(prompt, outputs=["6"]).node_outputs  # a new executor: same object
    first = outputs["6"][0]
    assert outputs["12"][0] is first
    assert outputs["13"][1]["ipadapter"]["model"] is first
    assert again["6"][0] is first
    assert len(reads) == 1


def test_a_rewritten_adapter_file_is_read_again(layout):
    path = Path(folders.get_full_path_or_raise("ipadapter", BASE_FILE))
    before = load_adapter(path)
    assert load_adapter(path) is before
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    after = load_adapter(path)
    assert after is not before and load_adapter(path) is after


# ---- encoder outputs memoized ------------------------------------------------------------------------------

@pytest.mark.parametrize("change", [
    {"weight": 0.4},
    {"start_at": 0.3, "end_at": 0.8},
    {"weight_type": "ease in-out"},
])
def test_rerun_changing_only_apply_widgets_runs_no_clip_vision_forward(layout, clip_forwards, change):
    executor = Executor(progress=False)
    first = executor.execute(_prompt())
    encoded = len(clip_forwards)
    assert encoded == 2  # the reference image and the black uncond image
    second = executor.execute(_prompt(**change))
    assert "7" in second.executed  # the apply node did run again ...
    assert len(clip_forwards) == encoded  # ... without a single encoder forward
    assert not torch.equal(second.node_outputs["9"][0], first.node_outputs["9"][0])


def test_a_new_executor_in_the_same_process_reuses_the_encodings(layout, clip_forwards):
    """A fresh executor re-reads the image file into a new tensor: equal bytes still hit the memo."""
    Executor(progress=False).execute(_prompt(), outputs=["7"])
    encoded = len(clip_forwards)
    Executor(progress=False).execute(_prompt(weight=0.7), outputs=["7"])
    assert encoded == 2 and len(clip_forwards) == encoded


def test_changed_pixels_or_adapter_kind_encode_again(layout, clip_forwards):
    """The memo key follows the image content and the feature (hidden states vs image_embeds)."""
    executor = Executor(progress=False)
    executor.execute(_prompt(), outputs=["7"])
    assert len(clip_forwards) == 2
    executor.execute(_prompt(adapter_file=BASE_FILE), outputs=["7"])  # image_embeds: uncond is zeros, no forward
    assert len(clip_forwards) == 3
    changed = np.asarray(Image.open(layout / "input" / "reference.png")).copy()
    changed[0, 0, 0] ^= 1  # one level of one pixel
    Image.fromarray(changed).save(layout / "input" / "reference_changed.png")
    executor.execute(_prompt(image="reference_changed.png"), outputs=["7"])
    assert len(clip_forwards) == 5


def _face_prompt(weight: float) -> dict:
    prompt = _prompt(weight, adapter_file=FACEID_PLUS_FILE, image="face.png")
    prompt["14"] = {"class_type": "IPAdapterInsightFaceLoader", "inputs": {"provider": "CPU",
                                                                          "model_name": "buffalo_l"}}
    prompt["7"] = {"class_type": "IPAdapterFaceID", "inputs": {
        "model": ["1", 0], "ipadapter": ["6", 0], "clip_vision": ["11", 0], "insightface": ["14", 0],
        "image": ["5", 0], "weight": weight, "weight_faceidv2": 1.0, "weight_type": "linear",
        "combine_embeds": "concat", "start_at": 0.0, "end_at": 1.0, "embeds_scaling": "V only"}}
    return prompt


def test_faceid_rerun_changing_only_the_weight_runs_no_face_analysis(layout, tiny_faces_dir, clip_forwards,
                                                                     monkeypatch):
    faceid.clear_cache()
    analyzer = faceid.load_insightface("buffalo_l", provider="CPU")  # the object the loader node gets
    detections = []
    detect = analyzer.app.det_model.detect
    monkeypatch.setattr(analyzer.app.det_model, "detect",
                        lambda *args, **kwargs: detections.append(1) or detect(*args, **kwargs))
    executor = Executor(progress=False)
    executor.execute(_face_prompt(1.0), outputs=["7"])
    assert len(detections) >= 1 and len(clip_forwards) == 2  # the face crop and the black uncond image
    counts = (len(detections), len(clip_forwards))
    rerun = executor.execute(_face_prompt(0.5), outputs=["7"])
    assert "7" in rerun.executed
    assert (len(detections), len(clip_forwards)) == counts


# ---- projection and K/V once per sampling call ---------------------------------------------------------------

def test_projection_and_each_layers_kv_run_once_per_sampling_call(layout, monkeypatch):
    adapter = load_adapter(folders.get_full_path_or_raise("ipadapter", PLUS_FILE))
    projections = []
    hook = adapter.image_proj.register_forward_hook(lambda *args: projections.append(1))
    kv_weights = {id(m.weight if isinstance(m, torch.nn.Module) else m): i
                  for i, m in enumerate(list(adapter.to_k_ip) + list(adapter.to_v_ip))}
    kv_calls = []
    linear = torch.nn.functional.linear

    def counting_linear(input, weight, bias=None):
        if id(weight) in kv_weights:
            kv_calls.append(kv_weights[id(weight)])
        return linear(input, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", counting_linear)
    try:
        Executor(progress=False).execute(_prompt(steps=3), outputs=["8"])
    finally:
        hook.remove()
    assert len(projections) == 1  # cond and uncond features in one projection call, for all 3 steps × CFG
    layers = len(adapter.to_k_ip)
    assert layers == 16
    # each K and V weight: one call for the cond and one for the uncond tokens, whatever the step count
    assert sorted(kv_calls) == sorted(list(range(2 * layers)) * 2)


# ---- the memo itself --------------------------------------------------------------------------------------

def test_tensor_key_follows_content_shape_and_dtype_not_identity():
    a = torch.rand(2, 8, 8, 3)
    assert memo.tensor_key(a) == memo.tensor_key(a.clone())
    assert memo.tensor_key(a) != memo.tensor_key(a.reshape(2, 8, 24, 1))
    assert memo.tensor_key(a) != memo.tensor_key(a.double())
    b = a.clone()
    b[1, 7, 7, 2] = torch.nextafter(b[1, 7, 7, 2], torch.tensor(2.0))
    assert memo.tensor_key(a) != memo.tensor_key(b)
    assert memo.tensor_key(torch.ones(3, dtype=torch.bfloat16))[1:] == ((3,), "torch.bfloat16")


def test_memo_is_an_lru_bounded_by_entries_and_bytes():
    store = memo.EncoderMemo(max_entries=2, max_bytes=10 * 4 * 100)
    computed = []

    def value(n):
        return lambda: computed.append(n) or torch.full((100,), float(n))

    store.get_or_compute(("a",), value(1))
    store.get_or_compute(("b",), value(2))
    store.get_or_compute(("a",), value(1))  # hit: "a" becomes the most recent
    store.get_or_compute(("c",), value(3))  # evicts "b"
    store.get_or_compute(("a",), value(1))
    store.get_or_compute(("b",), value(2))
    assert computed == [1, 2, 3, 2]
    assert (store.stats.hits, store.stats.misses, len(store)) == (2, 4, 2)
    big = memo.EncoderMemo(max_entries=8, max_bytes=1000)
    big.get_or_compute(("x",), lambda: torch.zeros(200))  # 800 bytes fit
    big.get_or_compute(("y",), lambda: torch.zeros(200))  # 1600 > 1000: the older goes
    assert len(big) == 1 and big.nbytes == 800
    big.get_or_compute(("z",), lambda: torch.zeros(1000))  # larger than the budget: returned, not stored
    assert len(big) == 1 and big.nbytes == 800


def test_a_stored_tensor_changed_in_place_is_recomputed():
    store = memo.EncoderMemo()
    got = store.get_or_compute(("k",), lambda: (torch.zeros(3), torch.ones(3)))
    got[0].add_(5.0)  # a careless caller
    again = store.get_or_compute(("k",), lambda: (torch.zeros(3), torch.ones(3)))
    assert torch.equal(again[0], torch.zeros(3)) and store.stats.misses == 2


def test_encodings_differ_by_crop_mode_and_uncond_convention(layout, clip_forwards):
    from ipadapter_nodes.core.adapter import load_adapter as load

    clip_vision = load_clip_vision(folders.get_full_path_or_raise("clip_vision", ENCODER_FILE))
    spec = load(folders.get_full_path_or_raise("ipadapter", PLUS_FILE)).spec
    image = torch.rand(1, 40, 64, 3, generator=torch.Generator().manual_seed(4))
    results = {}
    for crop in (True, False):
        for uncond in ("nodes", "diffusers"):
            results[crop, uncond] = embeds_module.encode_for_adapter(clip_vision, spec, image, uncond=uncond, crop=crop)
    forwards = len(clip_forwards)
    assert forwards == 8  # 4 keys × (image + uncond image): nothing shared between different preprocessing
    repeat = embeds_module.encode_for_adapter(clip_vision, spec, image.clone(), uncond="diffusers", crop=False)
    assert len(clip_forwards) == forwards
    assert torch.equal(repeat.cond, results[False, "diffusers"].cond)
    assert torch.equal(repeat.uncond, results[False, "diffusers"].uncond)
    assert not torch.equal(results[True, "nodes"].cond, results[False, "nodes"].cond)
    assert not torch.equal(results[True, "nodes"].uncond, results[True, "diffusers"].uncond)
    with memo.disabled():
        embeds_module.encode_for_adapter(clip_vision, spec, image, uncond="nodes", crop=True)
    assert len(clip_forwards) == forwards + 2


def test_the_memo_works_under_inference_mode_as_comfyui_runs_nodes():
    """ComfyUI executes nodes under torch.inference_mode(): inference tensors carry no version counter."""
    from ipadapter_nodes.core import memo

    store = memo.EncoderMemo(max_entries=4, max_bytes=1 << 20)
    calls = []

    def compute():
        calls.append(1)
        return torch.ones(3)

    with torch.inference_mode():
        first = store.get_or_compute(("k",), compute)
        second = store.get_or_compute(("k",), compute)
    assert len(calls) == 1 and second is first
