"""Re-run of a workflow after changing only the weight: encoder memo warm vs cold, side by side in one run.

Headless executor, tiny SD1.5 models (64×64 px, 2 steps): LoadImage ×N → ImageBatch → IPAdapterModelLoader +
CLIPVisionLoader → IPAdapterAdvanced → KSampler → VAEDecode. Each round changes the weight and re-runs on the
same executor (loaders, text encoders and the loaded image stay cached there) twice: with the encoder memo
(warm: no CLIP vision forward) and with it switched off (cold: the encoder runs again). It prints the median
time of each with the spread, their ratio, and the CLIP vision forwards counted in each (the hard number).

Run: ``python benchmarks/rerun.py [--images 4] [--rounds 5] [--models-dir DIR]``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ipadapter_nodes.core import folders, memo
from ipadapter_nodes.runtime import tiny
from ipadapter_nodes.runtime.executor import Executor
from ipadapter_nodes.runtime.tiny_adapters import make_adapter

ENCODER_FILE = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
ADAPTER_FILE = "ip-adapter-plus_sd15.safetensors"


def prepare(models_dir: Path, work: Path, images: int) -> None:
    """Tiny models in ``models_dir``; the encoder under its public name, a tiny Plus adapter and ``images``
    reference pictures in ``work``; folders configured."""
    tiny.ensure_tiny_models(models_dir)
    models = work / "models"
    (models / "clip_vision").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(models_dir / "clip_vision" / "tiny-vit-h.safetensors", models / "clip_vision" / ENCODER_FILE)
    make_adapter("sd15-plus", models / "ipadapter" / ADAPTER_FILE, seed=1)
    (work / "input").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for n in range(images):
        Image.fromarray(rng.integers(0, 256, size=(96, 96, 3), dtype=np.uint8)).save(work / "input" / f"ref{n}.png")
    folders.configure(folders.FolderLayout(models_dirs=[str(models), str(models_dir)], input_dir=str(work / "input"),
                                           output_dir=str(work / "output"), temp_dir=str(work / "temp")))


def workflow(images: int, weight: float) -> dict:
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red house", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "IPAdapterModelLoader", "inputs": {"ipadapter_file": ADAPTER_FILE}},
        "11": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": ENCODER_FILE}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["7", 0], "seed": 3, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
    }
    image = None
    for n in range(images):
        prompt[f"20{n}"] = {"class_type": "LoadImage", "inputs": {"image": f"ref{n}.png"}}
        if image is None:
            image = [f"20{n}", 0]
        else:
            prompt[f"30{n}"] = {"class_type": "ImageBatch", "inputs": {"image1": image, "image2": [f"20{n}", 0]}}
            image = [f"30{n}", 0]
    prompt["7"] = {"class_type": "IPAdapterAdvanced", "inputs": {
        "model": ["1", 0], "ipadapter": ["6", 0], "clip_vision": ["11", 0], "image": image, "weight": weight,
        "weight_type": "linear", "combine_embeds": "concat", "start_at": 0.0, "end_at": 1.0,
        "embeds_scaling": "V only"}}
    return prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--models-dir", default=os.environ.get("IPADAPTER_TINY_CACHE", ".cache/tiny-models"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import CLIPVisionModelWithProjection

    forwards = []
    original = CLIPVisionModelWithProjection.forward

    def counting(self, *a, **k):
        forwards.append(1)
        return original(self, *a, **k)

    CLIPVisionModelWithProjection.forward = counting
    with tempfile.TemporaryDirectory() as work:
        prepare(Path(args.models_dir), Path(work), args.images)
        executor = Executor(progress=False)
        start = time.perf_counter()
        executor.execute(workflow(args.images, 1.0), outputs=["9"])
        first = time.perf_counter() - start
        times: dict[str, list[float]] = {"warm": [], "cold": []}
        counts: dict[str, list[int]] = {"warm": [], "cold": []}
        weight = 1.0
        for _ in range(args.rounds):
            for mode in ("warm", "cold"):
                weight = 0.5 + (weight + 0.37) % 1.0  # a new weight every run: the apply node re-executes
                before = len(forwards)
                start = time.perf_counter()
                if mode == "warm":
                    executor.execute(workflow(args.images, weight), outputs=["9"])
                else:
                    with memo.disabled():
                        executor.execute(workflow(args.images, weight), outputs=["9"])
                times[mode].append(time.perf_counter() - start)
                counts[mode].append(len(forwards) - before)
    print(f"tiny SD1.5, {args.images} reference image(s), 64x64 px, 2 steps, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds")
    print(f"first run (loads everything): {first:.2f} s")
    for mode, label in (("warm", "re-run, encoder memo warm"), ("cold", "re-run, encoder memo off ")):
        values = times[mode]
        print(f"{label}: median {statistics.median(values):.3f} s (min {min(values):.3f}, max {max(values):.3f}); "
              f"CLIP vision forwards per re-run: {sorted(set(counts[mode]))}")
    print(f"cold/warm time ratio: {statistics.median(times['cold']) / statistics.median(times['warm']):.2f}x")


if __name__ == "__main__":
    main()
