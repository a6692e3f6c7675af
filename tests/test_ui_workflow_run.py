"""A UI-format workflow, as ComfyUI's frontend saves it, runs headless and equals the API-format run of the same graph.

The UI file is written by hand to the documented schema and uses what real saves contain: a PrimitiveNode feeding
a converted seed widget, a Reroute chain on the MODEL wire, a muted node, a bypassed node that must pass its input
through, a Note, the seed's control_after_generate value and LoadImage's upload value.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter_nodes.core import folders
from ipadapter_nodes.runtime.executor import Executor
from ipadapter_nodes.runtime.tiny_adapters import make_adapter
from ipadapter_nodes.runtime.workflow import load_workflow

ADAPTER = "ip-adapter-plus_sd15.safetensors"


@pytest.fixture(scope="module")
def layout(tiny_models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-run")
    make_adapter("sd15-plus", root / "models" / "ipadapter" / ADAPTER, seed=5)
    (root / "input").mkdir()
    pixels = np.random.default_rng(8).integers(0, 256, size=(72, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "input" / "ref.png")
    previous = folders.provider()
    folders.configure(folders.FolderLayout(models_dirs=[str(root / "models"), str(tiny_models_dir)],
                                           input_dir=str(root / "input"), output_dir=str(root / "output"),
                                           temp_dir=str(root / "temp")))
    yield root
    folders.configure(previous)


def _node(id, type, inputs=(), outputs=(), widgets=None, mode=0, title=None):
    node = {"id": id, "type": type, "pos": [0, 0], "size": [200, 80], "flags": {}, "order": id, "mode": mode,
            "inputs": [dict(name=n, type=t, link=l, **({"widget": {"name": n}} if w else {}))
                       for n, t, l, w in inputs],
            "outputs": [{"name": n, "type": t, "links": ls, "slot_index": i} for i, (n, t, ls) in enumerate(outputs)],
            "properties": {"Node name for S&R": type}}
    if widgets is not None:
        node["widgets_values"] = widgets
    if title:
        node["title"] = title
    return node


def ui_workflow() -> dict:
    nodes = [
        _node(1, "CheckpointLoaderSimple", outputs=[("MODEL", "MODEL", [1]), ("CLIP", "CLIP", [2, 3]),
                                                   ("VAE", "VAE", [4])], widgets=["tiny-sd15"]),
        _node(2, "Reroute", inputs=[("", "*", 1, False)], outputs=[("", "MODEL", [5])]),
        _node(3, "Reroute", inputs=[("", "*", 5, False)], outputs=[("", "MODEL", [6])]),
        _node(4, "CLIPTextEncode", inputs=[("clip", "CLIP", 2, False)], outputs=[("CONDITIONING", "CONDITIONING", [7])],
              widgets=["a lighthouse"]),
        _node(5, "CLIPTextEncode", inputs=[("clip", "CLIP", 3, False)], outputs=[("CONDITIONING", "CONDITIONING", [8])],
              widgets=["blurry"]),
        _node(6, "EmptyLatentImage", outputs=[("LATENT", "LATENT", [9])], widgets=[64, 64, 1]),
        _node(7, "LoadImage", outputs=[("IMAGE", "IMAGE", [10]), ("MASK", "MASK", [])], widgets=["ref.png", "image"]),
        # bypassed: its IMAGE output is served by its IMAGE input, unchanged
        _node(8, "ImageScale", inputs=[("image", "IMAGE", 10, False)], outputs=[("IMAGE", "IMAGE", [11])],
              widgets=["bilinear", 32, 32, "disabled"], mode=4),
        _node(9, "IPAdapterModelLoader", outputs=[("IPADAPTER", "IPADAPTER", [12])], widgets=[ADAPTER]),
        _node(10, "CLIPVisionLoader", outputs=[("CLIP_VISION", "CLIP_VISION", [13])], widgets=["tiny-vit-h"]),
        _node(11, "IPAdapterAdvanced",
              inputs=[("model", "MODEL", 6, False), ("ipadapter", "IPADAPTER", 12, False), ("image", "IMAGE", 11, False),
                      ("image_negative", "IMAGE", None, False), ("attn_mask", "MASK", None, False),
                      ("clip_vision", "CLIP_VISION", 13, False)],
              outputs=[("MODEL", "MODEL", [14])], widgets=[0.9, "ease in", "concat", 0.0, 0.8, "V only"]),
        _node(12, "PrimitiveNode", outputs=[("INT", "INT", [15])], widgets=[123, "fixed"], title="seed"),
        _node(13, "KSampler", inputs=[("model", "MODEL", 14, False), ("positive", "CONDITIONING", 7, False),
                                      ("negative", "CONDITIONING", 8, False), ("latent_image", "LATENT", 9, False),
                                      ("seed", "INT", 15, True)],
              outputs=[("LATENT", "LATENT", [16])], widgets=[0, "randomize", 2, 5.0, "euler", "normal", 1.0]),
        _node(14, "VAEDecode", inputs=[("samples", "LATENT", 16, False), ("vae", "VAE", 4, False)],
              outputs=[("IMAGE", "IMAGE", [17, 18])]),
        _node(15, "SaveImage", inputs=[("images", "IMAGE", 17, False)], widgets=["ui_run"]),
        # muted: dropped with its links, never executed
        _node(16, "PreviewImage", inputs=[("images", "IMAGE", 18, False)], mode=2),
        _node(17, "Note", widgets=["notes are ignored"]),
    ]
    links = [[1, 1, 0, 2, 0, "MODEL"], [2, 1, 1, 4, 0, "CLIP"], [3, 1, 1, 5, 0, "CLIP"], [4, 1, 2, 14, 1, "VAE"],
             [5, 2, 0, 3, 0, "MODEL"], [6, 3, 0, 11, 0, "MODEL"], [7, 4, 0, 13, 1, "CONDITIONING"],
             [8, 5, 0, 13, 2, "CONDITIONING"], [9, 6, 0, 13, 3, "LATENT"], [10, 7, 0, 8, 0, "IMAGE"],
             [11, 8, 0, 11, 2, "IMAGE"], [12, 9, 0, 11, 1, "IPADAPTER"], [13, 10, 0, 11, 5, "CLIP_VISION"],
             [14, 11, 0, 13, 0, "MODEL"], [15, 12, 0, 13, 4, "INT"], [16, 13, 0, 14, 0, "LATENT"],
             [17, 14, 0, 15, 0, "IMAGE"], [18, 14, 0, 16, 0, "IMAGE"]]
    return {"last_node_id": 17, "last_link_id": 18, "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {}, "version": 0.4}


def api_prompt() -> dict:
    """The same graph written directly in API format: what the frontend would queue."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["1", 1]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "LoadImage", "inputs": {"image": "ref.png"}},
        "9": {"class_type": "IPAdapterModelLoader", "inputs": {"ipadapter_file": ADAPTER}},
        "10": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "tiny-vit-h"}},
        "11": {"class_type": "IPAdapterAdvanced", "inputs": {
            "model": ["1", 0], "ipadapter": ["9", 0], "image": ["7", 0], "clip_vision": ["10", 0], "weight": 0.9,
            "weight_type": "ease in", "combine_embeds": "concat", "start_at": 0.0, "end_at": 0.8,
            "embeds_scaling": "V only"}},
        "13": {"class_type": "KSampler", "inputs": {
            "model": ["11", 0], "seed": 123, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0], "denoise": 1.0}},
        "14": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["1", 2]}},
        "15": {"class_type": "SaveImage", "inputs": {"images": ["14", 0], "filename_prefix": "ui_run"}},
    }


def _image(executor: Executor, prompt: dict, extra_pnginfo=None) -> torch.Tensor:
    result = executor.execute(prompt, extra_pnginfo=extra_pnginfo)
    return result.node_outputs["14"][0]


def test_the_ui_file_converts_to_the_api_graph():
    loaded = load_workflow(ui_workflow())
    converted = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in loaded.prompt.items()}
    assert converted == api_prompt()


def test_the_ui_file_runs_and_equals_the_api_run(layout):
    loaded = load_workflow(ui_workflow())
    from_ui = _image(Executor(), loaded.prompt, loaded.extra_pnginfo)
    from_api = _image(Executor(), api_prompt())
    assert from_ui.shape == (1, 64, 64, 3)
    assert torch.equal(from_ui, from_api)
    # the adapter is really in the graph: without it the image differs
    without = api_prompt()
    without["13"]["inputs"]["model"] = ["1", 0]
    assert not torch.equal(_image(Executor(), without), from_api)
