"""Everything ``--model-map tiny`` needs besides ``tiny.ensure_tiny_models``: tiny stand-ins for the files the
shipped workflows name, and stand-in input images.

``ensure_tiny_assets(models_dir)`` adds, once (a version stamp marks a finished build), to a ComfyUI-layout
models folder that already holds (or gets) the tiny model set:

* ``ipadapter/tiny-<published name>``: a random tiny adapter of that file's variant for every published
  IP-Adapter file in :data:`ADAPTER_FILES`, so the Unified Loaders' name patterns find them as they find
  the real files;
* ``clip_vision/tiny-CLIP-ViT-H-14-…`` / ``tiny-CLIP-ViT-bigG-14-…``: the tiny encoders under the names the
  presets look for;
* ``loras/tiny-lora-sd15.safetensors`` / ``tiny-lora-sdxl.safetensors``: small random LoRAs (kohya layout) on
  every attention projection of the tiny UNets, and ``loras/tiny-<published FaceID LoRA name>``: the tiny
  FaceID adapters' own attention LoRAs, as the published ``*_lora.safetensors`` files hold theirs;
* ``animatediff_models/tiny-motion-sd15`` (``tiny_motion``) and ``insightface/models/{buffalo_l,antelopev2}``
  (``tiny_faces``).

``ensure_input(input_dir, name, models_dir)`` writes a stand-in input file (an image whose look follows its
name — a face, a mask, edges — or an embeds file) unless one is already there.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import tiny, tiny_adapters, tiny_faces, tiny_motion

ASSETS_VERSION = "1"
STAMP_NAME = ".tiny-assets-version"

# Published IP-Adapter file name -> tiny variant (runtime.tiny_adapters.VARIANTS); each is written as
# ipadapter/tiny-<name>, in the same format (.bin or .safetensors) as the published file.
ADAPTER_FILES = {
    "ip-adapter_sd15.safetensors": "sd15",
    "ip-adapter_sd15_light_v11.bin": "sd15-light",
    "ip-adapter_sd15_vit-G.safetensors": "sd15-vit-g",
    "ip-adapter-plus_sd15.safetensors": "sd15-plus",
    "ip-adapter-plus-face_sd15.safetensors": "sd15-plus-face",
    "ip-adapter-full-face_sd15.safetensors": "sd15-full-face",
    "ip-adapter-faceid_sd15.bin": "faceid-sd15",
    "ip-adapter-faceid-plus_sd15.bin": "faceid-plus-sd15",
    "ip-adapter-faceid-plusv2_sd15.bin": "faceid-plusv2-sd15",
    "ip-adapter-faceid-portrait-v11_sd15.bin": "portrait-sd15",
    "ip-adapter_sdxl.safetensors": "sdxl",
    "ip-adapter_sdxl_vit-h.safetensors": "sdxl-vit-h",
    "ip-adapter-plus_sdxl_vit-h.safetensors": "sdxl-plus-vit-h",
    "ip-adapter-plus-face_sdxl_vit-h.safetensors": "sdxl-plus-face-vit-h",
    "ip-adapter-faceid_sdxl.bin": "faceid-sdxl",
    "ip-adapter-faceid-plusv2_sdxl.bin": "faceid-plusv2-sdxl",
    "ip-adapter-faceid-portrait_sdxl.bin": "portrait-sdxl",
    "ip-adapter-faceid-portrait_sdxl_unnorm.bin": "portrait-unnorm-sdxl",
}
# Published FaceID LoRA file -> the adapter file whose attention LoRA it holds.
FACEID_LORA_FILES = {
    "ip-adapter-faceid_sd15_lora.safetensors": "ip-adapter-faceid_sd15.bin",
    "ip-adapter-faceid-plus_sd15_lora.safetensors": "ip-adapter-faceid-plus_sd15.bin",
    "ip-adapter-faceid-plusv2_sd15_lora.safetensors": "ip-adapter-faceid-plusv2_sd15.bin",
    "ip-adapter-faceid_sdxl_lora.safetensors": "ip-adapter-faceid_sdxl.bin",
    "ip-adapter-faceid-plusv2_sdxl_lora.safetensors": "ip-adapter-faceid-plusv2_sdxl.bin",
}
# Published encoder file -> the tiny encoder file (from tiny.ensure_tiny_models) copied under tiny-<name>.
CLIP_VISION_FILES = {
    "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors": "tiny-vit-h.safetensors",
    "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors": "tiny-vit-bigG.safetensors",
}
# Generic LoRAs (any LoRA a workflow names, e.g. an LCM LoRA): tiny file -> its checkpoint folder.
LORA_FILES = {"tiny-lora-sd15.safetensors": "tiny-sd15", "tiny-lora-sdxl.safetensors": "tiny-sdxl"}
LORA_RANK = 4
ADAPTER_SEED = 0          # the demo's adapter (tiny-ip-adapter-plus_sd15.safetensors) uses seed 0 too
LORA_SEED = 4201


def tiny_name(published: str) -> str:
    """The tiny stand-in's file name for a published file name."""
    return "tiny-" + published


def stamp_text() -> str:
    """This build's version: ours and those of the models the stand-ins are made from."""
    return (f"assets {ASSETS_VERSION}, models {tiny.TINY_VERSION}, motion {tiny_motion.TINY_MOTION_VERSION}, "
            f"faces {tiny_faces.VERSION}")


def is_current(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` (a models folder, or the stand-in input folder) holds a finished build of this version."""
    stamp = Path(folder) / STAMP_NAME
    return stamp.is_file() and stamp.read_text() == stamp_text()


def _stand_in_files(models_dir: Path) -> list[Path]:
    return ([models_dir / "ipadapter" / tiny_name(n) for n in ADAPTER_FILES]
            + [models_dir / "clip_vision" / tiny_name(n) for n in CLIP_VISION_FILES]
            + [models_dir / "loras" / n for n in LORA_FILES]
            + [models_dir / "loras" / tiny_name(n) for n in FACEID_LORA_FILES])


def ensure_tiny_assets(models_dir: str | os.PathLike) -> Path:
    """Build the tiny model set plus every stand-in above into ``models_dir`` (once); return the folder."""
    models_dir = Path(models_dir).resolve()
    tiny.ensure_tiny_models(models_dir)
    if is_current(models_dir):
        return models_dir
    with tiny._build_lock(models_dir):  # the same lock as the model set: one builder per folder
        if is_current(models_dir):
            return models_dir
        (models_dir / STAMP_NAME).unlink(missing_ok=True)
        for stale in _stand_in_files(models_dir):  # made from an older model set: made again below
            stale.unlink(missing_ok=True)
        tiny_motion.ensure_tiny_motion(models_dir)
        tiny_faces.ensure_tiny_faces(models_dir)
        for published, variant in ADAPTER_FILES.items():
            _write_new(models_dir / "ipadapter" / tiny_name(published),
                       lambda tmp, v=variant, p=published: tiny_adapters.make_adapter(
                           v, tmp, fmt="bin" if p.endswith(".bin") else "safetensors", seed=ADAPTER_SEED))
        for published, source in CLIP_VISION_FILES.items():
            _write_new(models_dir / "clip_vision" / tiny_name(published),
                       lambda tmp, s=source: shutil.copyfile(models_dir / "clip_vision" / s, tmp))
        for name, checkpoint in LORA_FILES.items():
            _write_new(models_dir / "loras" / name,
                       lambda tmp, c=checkpoint: _write_random_lora(models_dir / "checkpoints" / c / "unet", tmp))
        for published, adapter in FACEID_LORA_FILES.items():
            _write_new(models_dir / "loras" / tiny_name(published),
                       lambda tmp, a=adapter: _write_faceid_lora(models_dir / "ipadapter" / tiny_name(a), tmp))
        (models_dir / STAMP_NAME).write_text(stamp_text())
    return models_dir


def _write_new(target: Path, write) -> None:
    """Write ``target`` through a temporary file (``write(tmp_path)``) and move it into place; keep an existing one."""
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _write_random_lora(unet_folder: Path, path: Path) -> None:
    """A kohya-layout LoRA (diffusers module names) on every attention projection of the UNet in ``unet_folder``.

    Shapes come from the saved weights, so no model is built; values are small so images change but stay sane.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(LORA_SEED)
    projection = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight$")
    tensors = {}
    with safe_open(str(unet_folder / "diffusion_pytorch_model.safetensors"), framework="pt") as handle:
        for key in sorted(handle.keys()):
            if not projection.search(key):
                continue
            out_features, in_features = handle.get_slice(key).get_shape()
            stem = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
            tensors[f"{stem}.lora_down.weight"] = torch.randn(LORA_RANK, in_features, generator=generator) * 0.1
            tensors[f"{stem}.lora_up.weight"] = torch.randn(out_features, LORA_RANK, generator=generator) * 0.1
            tensors[f"{stem}.alpha"] = torch.tensor(float(LORA_RANK))
    save_file(tensors, str(path))


def _write_faceid_lora(adapter_path: Path, path: Path) -> None:
    """The FaceID adapter's own attention LoRA as a kohya file with diffusers module names."""
    from safetensors.torch import save_file

    from ..core import faceid_lora
    from ..core.adapter import load_adapter

    adapter = load_adapter(adapter_path)
    names = faceid_lora.attention_names(adapter.spec.family)
    tensors = {}
    for key, down in adapter.lora.items():
        if not key.endswith("_lora.down.weight"):
            continue
        index, projection = key.split(".")[0], key.split(".")[1][: -len("_lora")]
        module = f"{names[int(index)]}.{'to_out.0' if projection == 'to_out' else projection}"
        stem = "lora_unet_" + module.replace(".", "_")
        tensors[f"{stem}.lora_down.weight"] = down.float().contiguous()
        tensors[f"{stem}.lora_up.weight"] = adapter.lora[key.replace(".down.", ".up.")].float().contiguous()
    save_file(tensors, str(path))


# --------------------------------------------------------------------------------------------- input stand-ins
IMAGE_SIZE = 64          # px; small, so img2img / inpainting latents stay tiny
FACE_SIZE = 128          # px; large enough for the tiny face detector
EMBEDS_ADAPTER = "ip-adapter-plus_sd15.safetensors"   # stand-in embeds are Plus-type (ViT-H hidden states)
EMBEDS_SOURCE_IMAGE = "reference.png"

# (name pattern, kind), first match wins; the kind picks the drawing.
INPUT_KINDS = (
    (r"\.(safetensors|ipadpt)$", "embeds"),
    (r"mask", "mask"),
    (r"face|portrait|person", "face"),
    (r"canny|edge|line|scribble|control|depth|pose|hint", "edges"),
    (r"\.(png|jpe?g|webp|bmp|gif|tiff?)$", "picture"),
)


def input_kind(name: str) -> str | None:
    """What stand-in ``name`` gets ("embeds", "mask", "face", "edges", "picture"), None for unknown files."""
    for pattern, kind in INPUT_KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return None


def refresh_inputs(input_dir: str | os.PathLike) -> None:
    """Delete the stand-ins in ``input_dir`` (a folder only this module writes to) made by another version."""
    input_dir = Path(input_dir)
    input_dir.mkdir(parents=True, exist_ok=True)
    if is_current(input_dir):
        return
    for entry in input_dir.iterdir():
        if entry.is_file() and input_kind(entry.name) is not None:
            entry.unlink(missing_ok=True)
    (input_dir / STAMP_NAME).write_text(stamp_text())


def ensure_input(input_dir: str | os.PathLike, name: str, models_dir: str | os.PathLike) -> Path | None:
    """Write a stand-in ``input_dir/name`` unless it exists; returns its path, None when ``name`` is unknown."""
    kind = input_kind(name)
    if kind is None:
        return None
    path = Path(input_dir) / name
    if path.exists():
        return path
    if kind == "embeds":
        reference = ensure_input(input_dir, EMBEDS_SOURCE_IMAGE, models_dir)
        _write_new(path, lambda tmp: _write_embeds(Path(models_dir), reference, tmp))
        return path
    pixels = {"mask": _mask_pixels, "face": _face_pixels, "edges": _edge_pixels, "picture": _picture_pixels}[kind](name)
    _write_new(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))
    return path


def _name_rng(name: str) -> np.random.Generator:
    # A stable seed per name (Python's hash() is salted per process).
    return np.random.default_rng(int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little"))


def _picture_pixels(name: str) -> np.ndarray:
    """A smooth two-colour gradient with a disc; colours and position follow the name."""
    rng = _name_rng(name)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) / (IMAGE_SIZE - 1)
    a, b, disc_colour = rng.uniform(0.1, 0.9, size=(3, 3))
    rgb = a * (1 - xx[..., None]) + b * xx[..., None] * 0.5 + b * yy[..., None] * 0.5
    cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
    rgb[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = disc_colour
    return (rgb.clip(0, 1) * 255).round().astype(np.uint8)


def _mask_pixels(name: str) -> np.ndarray:
    """RGBA: white with alpha 0 inside the region, black and opaque outside — so both ComfyUI readings
    (a colour channel, or 1 - alpha) give the same mask. The region follows the name (left/right/top/bottom
    half, else a centred disc)."""
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) / (IMAGE_SIZE - 1)
    lowered = name.lower()
    regions = {"left": xx < 0.5, "right": xx >= 0.5, "top": yy < 0.5, "bottom": yy >= 0.5}
    inside = next((region for word, region in regions.items() if word in lowered),
                  (xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.3 ** 2)
    rgba = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 4), dtype=np.uint8)
    rgba[..., :3][inside] = 255
    rgba[..., 3] = np.where(inside, 0, 255)
    return rgba


def _face_pixels(name: str) -> np.ndarray:
    seed = int(_name_rng(name).integers(0, 2**31))
    image = tiny_faces.face_image(FACE_SIZE, seed=seed)
    return (image[0].numpy() * 255).round().astype(np.uint8)


def _edge_pixels(name: str) -> np.ndarray:
    """White outlines (a rectangle and a circle) on black, like a Canny edge map."""
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) / (IMAGE_SIZE - 1)
    circle = np.abs(np.sqrt((xx - 0.62) ** 2 + (yy - 0.58) ** 2) - 0.22) < 0.02
    box = ((np.abs(xx - 0.15) < 0.015) | (np.abs(xx - 0.45) < 0.015)) & (yy > 0.15) & (yy < 0.7)
    box |= ((np.abs(yy - 0.15) < 0.015) | (np.abs(yy - 0.7) < 0.015)) & (xx > 0.15) & (xx < 0.45)
    edges = (circle | box).astype(np.uint8) * 255
    return np.repeat(edges[..., None], 3, axis=-1)


def _write_embeds(models_dir: Path, reference: Path, path: Path) -> None:
    """Plus-type embeds of the stand-in reference image, encoded by the tiny ViT-H as IPAdapterEncoder would."""
    from ..core import apply as engine
    from ..core import embeds_io

    adapter = engine.load_adapter(str(models_dir / "ipadapter" / tiny_name(EMBEDS_ADAPTER)))
    clip_vision = engine.load_clip_vision(str(models_dir / "clip_vision" / "tiny-vit-h.safetensors"))
    with Image.open(reference) as img:
        image = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]
    embeds = engine.encode_images(adapter, clip_vision, image, node="tiny embeds stand-in")
    embeds_io.save_embeds(embeds, path)
