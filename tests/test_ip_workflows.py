"""Headless API-format workflows with the IP-Adapter nodes on the tiny SD1.5 and SDXL models.

LoadImage → IPAdapterUnifiedLoader → IPAdapterAdvanced → KSampler → SaveImage, and the same with
IPAdapterModelLoader + CLIPVisionLoader. Tiny adapters and encoders carry the real file names, so the
Unified Loader finds them exactly as it finds the published files.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter_nodes.core import folders
from ipadapter_nodes.runtime.executor import Executor
from ipadapter_nodes.runtime.tiny_adapters import make_adapter

ENCODER_FILE = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
# family → (checkpoint, tiny adapter variant, real file name, the preset that means that file)
CASES = {
    "sd15": ("tiny-sd15", "sd15", "ip-adapter_sd15.safetensors", "STANDARD (medium strength)"),
    "sdxl": ("tiny-sdxl", "sdxl-plus-vit-h", "ip-adapter-plus_sdxl_vit-h.safetensors", "PLUS (high strength)"),
}


@pytest.fixture(scope="module")
def layout(tiny_models_dir, tmp_path_factory):
    """Folders: the tiny model set, plus the tiny ViT-H under its public name and tiny adapters."""
    root = tmp_path_factory.mktemp("ip-workflows")
    models = root / "models"
    (models / "clip_vision").mkdir(parents=True)
    shutil.copyfile(tiny_models_dir / "clip_vision" / "tiny-vit-h.safetensors", models / "clip_vision" / ENCODER_FILE)
    for _, variant, file_name, _ in CASES.values():
        make_adapter(variant, models / "ipadapter" / file_name, seed=7)
    (root / "input").mkdir()
    pixels = np.random.default_rng(3).integers(0, 256, size=(80, 96, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "input" / "reference.png")
    previous = folders.provider()
    folders.configure(folders.FolderLayout(models_dirs=[str(models), str(tiny_models_dir)], input_dir=str(root / "input"),
                                           output_dir=str(root / "output"), temp_dir=str(root / "temp")))
    yield root
    folders.configure(previous)


def _prompt(family: str, weight: float | None, loader: str = "unified", seed: int = 11) -> dict:
    """An API-format prompt; ``weight`` None leaves the IP-Adapter out. Node 9 decodes, node 10 saves."""
    checkpoint, _, adapter_file, preset = CASES[family]
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red house", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "LoadImage", "inputs": {"image": "reference.png"}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": seed, "steps": 2, "cfg": 4.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": f"ip_{family}"}},
    }
    if weight is None:
        return prompt
    apply_inputs = {"image": ["5", 0], "weight": weight, "weight_type": "linear", "combine_embeds": "concat",
                    "start_at": 0.0, "end_at": 1.0, "embeds_scaling": "V only"}
    if loader == "unified":
        prompt["6"] = {"class_type": "IPAdapterUnifiedLoader", "inputs": {"model": ["1", 0], "preset": preset}}
        apply_inputs.update(model=["6", 0], ipadapter=["6", 1])
    else:
        prompt["6"] = {"class_type": "IPAdapterModelLoader", "inputs": {"ipadapter_file": adapter_file}}
        prompt["11"] = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": ENCODER_FILE}}
        apply_inputs.update(model=["1", 0], ipadapter=["6", 0], clip_vision=["11", 0])
    prompt["7"] = {"class_type": "IPAdapterAdvanced", "inputs": apply_inputs}
    prompt["8"]["inputs"]["model"] = ["7", 0]
    return prompt


def _run(executor: Executor, prompt: dict) -> tuple[torch.Tensor, list[Path]]:
    result = executor.execute(prompt)
    saved = result.ui["10"]["images"]
    out_dir = Path(folders.provider().get_output_directory())
    return result.node_outputs["9"][0], [out_dir / e.get("subfolder", "") / e["filename"] for e in saved]


@pytest.fixture(scope="module")
def runs(layout):
    """family → {run name: (decoded image, saved files)}; each workflow runs once per module (CPU budget)."""
    done: dict[str, dict] = {}

    def get(family: str) -> dict:
        if family not in done:
            executor = Executor(progress=False)  # shared: loaders and text encoders run once
            done[family] = {
                "plain": _run(executor, _prompt(family, None)),
                "zero": _run(executor, _prompt(family, 0.0)),
                "unified": _run(executor, _prompt(family, 1.0, "unified")),
                # a separate sampling run from scratch with the same seed, through the other loaders
                "manual": _run(executor, _prompt(family, 1.0, "manual")),
            }
        return done[family]

    return get


@pytest.mark.parametrize("family", sorted(CASES))
def test_unified_loader_workflow_saves_a_png(runs, family):
    files = runs(family)["unified"][1]
    assert len(files) == 1 and files[0].suffix == ".png" and files[0].is_file()
    with Image.open(files[0]) as png:
        assert png.size == (64, 64)


@pytest.mark.parametrize("family", sorted(CASES))
def test_weight_zero_gives_exactly_the_image_without_adapter(runs, family):
    assert torch.equal(runs(family)["zero"][0], runs(family)["plain"][0])


@pytest.mark.parametrize("family", sorted(CASES))
def test_weight_one_changes_the_image(runs, family):
    assert (runs(family)["unified"][0] - runs(family)["plain"][0]).abs().max().item() > 1e-3


@pytest.mark.parametrize("family", sorted(CASES))
def test_model_loader_with_clip_vision_loader_gives_the_unified_loaders_image(runs, family):
    """Same files through IPAdapterModelLoader + CLIPVisionLoader: the same pixels (and so deterministic)."""
    image, files = runs(family)["manual"]
    assert files[0].is_file()
    assert torch.equal(image, runs(family)["unified"][0])


@pytest.mark.parametrize("family", sorted(CASES))
@pytest.mark.parametrize("loader", ["unified", "manual"])
@pytest.mark.parametrize("weight_type", ["linear", "style transfer precise"])
def test_ip_adapter_workflows_pass_validation(layout, family, loader, weight_type):
    """Every widget value of the existing pack validates, even weight types that run later."""
    from ipadapter_nodes.runtime.registry import node_classes
    from ipadapter_nodes.runtime.validate import validate_prompt

    prompt = _prompt(family, 1.0, loader)
    prompt["7"]["inputs"]["weight_type"] = weight_type
    result = validate_prompt(prompt, node_classes())
    assert result.ok, result.node_errors
