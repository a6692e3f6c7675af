"""``--model-map tiny``: run a workflow that names real model files on the tiny model set instead.

The workflow keeps its real file names (``v1-5-pruned-emaonly.safetensors``, ``ip-adapter-plus_sd15.safetensors``,
…); before validation the loaded API prompt is rewritten:

1. :func:`shrink` (before ``--set``, so an explicit ``--set`` still wins): every ``EmptyLatentImage`` is scaled so
   its shorter side is 64 px (the longer one keeps the aspect ratio, in multiples of 64 px), and samplers run
   at most :data:`MAX_STEPS` steps (``KSamplerAdvanced``'s start/end steps are scaled with them).
2. :func:`rename` (after ``--set``): each model-file widget listed in :data:`MODEL_INPUTS` gets the tiny file
   that stands in for it, by the rules of :data:`RULES` (name patterns per models folder, first match wins);
   a name that is already an entry of the tiny folder is kept.
3. :func:`provide_inputs`: when the input folder lacks a file the prompt loads, the run reads its inputs from a
   cache folder of generated stand-ins instead (``runtime.tiny_assets.ensure_input``); user files are never
   written to.

The tiny set lives in ``$IPADAPTER_TINY_CACHE`` or ``~/.cache/ipadapter_nodes/tiny-models`` (built once), the
stand-in inputs in ``tiny-input/`` next to it.
"""
from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import tiny_assets
from .tiny_assets import tiny_name

MODEL_MAPS = ("tiny",)
MAX_STEPS = 2
LATENT_SIDE = 64          # px of the shorter side of a shrunk EmptyLatentImage
INPUT_FOLDER_NAME = "tiny-input"

# (class_type, input) -> models folder of the file it names.
MODEL_INPUTS = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("CLIPVisionLoader", "clip_name"): "clip_vision",
    ("IPAdapterModelLoader", "ipadapter_file"): "ipadapter",
    ("LoraLoader", "lora_name"): "loras",
    ("LoraLoaderModelOnly", "lora_name"): "loras",
    ("ControlNetLoader", "control_net_name"): "controlnet",
    ("AnimateDiffLoader", "motion_module"): "animatediff_models",
}
# (class_type, input) -> the input-folder file it names.
INPUT_FILES = {
    ("LoadImage", "image"): "image",
    ("LoadImageMask", "image"): "image",
    ("IPAdapterLoadEmbeds", "embeds"): "embeds",
}


def _adapter_rule(pattern: str, published: str) -> tuple[str, str]:
    return pattern, tiny_name(published)


# Per folder: (case-insensitive regex searched in the real name, tiny entry); first match wins; a tiny entry
# of None means "no tiny stand-in" (the message says so).
RULES: dict[str, tuple[tuple[str, str | None], ...]] = {
    "checkpoints": (
        (r"xl.*inpaint|inpaint.*xl", None),
        (r"inpaint", "tiny-sd15-inpaint"),
        (r"xl|pony|illustrious", "tiny-sdxl"),
        (r"", "tiny-sd15"),
    ),
    "clip_vision": (
        (r"bigG|vit.?g\b|vit.?g[-_.]|sdxl", tiny_name("CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors")),
        (r"", tiny_name("CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors")),
    ),
    # most specific first: a portrait/FaceID/plus-face name also contains the shorter patterns below it
    "ipadapter": (
        _adapter_rule(r"portrait.*sdxl.*unnorm", "ip-adapter-faceid-portrait_sdxl_unnorm.bin"),
        _adapter_rule(r"portrait.*sdxl", "ip-adapter-faceid-portrait_sdxl.bin"),
        _adapter_rule(r"portrait", "ip-adapter-faceid-portrait-v11_sd15.bin"),
        _adapter_rule(r"faceid.plus(v2)?.sdxl", "ip-adapter-faceid-plusv2_sdxl.bin"),
        _adapter_rule(r"faceid.plusv2", "ip-adapter-faceid-plusv2_sd15.bin"),
        _adapter_rule(r"faceid.plus", "ip-adapter-faceid-plus_sd15.bin"),
        _adapter_rule(r"faceid.*sdxl", "ip-adapter-faceid_sdxl.bin"),
        _adapter_rule(r"faceid", "ip-adapter-faceid_sd15.bin"),
        _adapter_rule(r"plus.face.*sdxl", "ip-adapter-plus-face_sdxl_vit-h.safetensors"),
        _adapter_rule(r"plus.*sdxl", "ip-adapter-plus_sdxl_vit-h.safetensors"),
        _adapter_rule(r"sdxl.*vit.?h", "ip-adapter_sdxl_vit-h.safetensors"),
        _adapter_rule(r"sdxl", "ip-adapter_sdxl.safetensors"),
        _adapter_rule(r"full.face", "ip-adapter-full-face_sd15.safetensors"),
        _adapter_rule(r"plus.face", "ip-adapter-plus-face_sd15.safetensors"),
        _adapter_rule(r"plus", "ip-adapter-plus_sd15.safetensors"),
        _adapter_rule(r"light", "ip-adapter_sd15_light_v11.bin"),
        _adapter_rule(r"vit.?g", "ip-adapter_sd15_vit-G.safetensors"),
        _adapter_rule(r"ip.?adapter", "ip-adapter_sd15.safetensors"),
    ),
    "loras": (
        *((re.escape(name.rsplit(".", 1)[0]), tiny_name(name)) for name in tiny_assets.FACEID_LORA_FILES),
        (r"xl", "tiny-lora-sdxl.safetensors"),
        (r"", "tiny-lora-sd15.safetensors"),
    ),
    "controlnet": (
        (r"xl", "tiny-controlnet-sdxl"),
        (r"", "tiny-controlnet-sd15"),
    ),
    "animatediff_models": (
        (r"xl", None),
        (r"", "tiny-motion-sd15"),
    ),
}


class ModelMapError(ValueError):
    """A workflow names a file the chosen model map has no stand-in for."""


@dataclass
class InputPlan:
    """Where a run reads its input files from, and what to tell the user about it."""

    input_dir: Path
    notes: list[str] = field(default_factory=list)


def prepare_models(models_dir: str | os.PathLike | None = None) -> Path:
    """Build (once) and return the tiny models folder (default: the demo's cache, ``demo.default_cache_dir``)."""
    from .demo import default_cache_dir

    return tiny_assets.ensure_tiny_assets(Path(models_dir).expanduser() if models_dir else default_cache_dir())


# --------------------------------------------------------------------------------------------- prompt rewriting
def _shrunk_sides(width: int, height: int) -> tuple[int, int]:
    scale = LATENT_SIDE / max(1, min(width, height))
    return tuple(max(LATENT_SIDE, int(side * scale / LATENT_SIDE + 0.5) * LATENT_SIDE) for side in (width, height))


def shrink(prompt: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``prompt`` with small latents and at most :data:`MAX_STEPS` sampling steps."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        inputs, kind = node.get("inputs") or {}, node.get("class_type")
        if kind == "EmptyLatentImage" and all(isinstance(inputs.get(k), int) for k in ("width", "height")):
            inputs["width"], inputs["height"] = _shrunk_sides(inputs["width"], inputs["height"])
        elif kind in ("KSampler", "KSamplerAdvanced") and isinstance(inputs.get("steps"), int):
            steps = inputs["steps"]
            capped = min(steps, MAX_STEPS)
            inputs["steps"] = capped
            for key in ("start_at_step", "end_at_step"):
                if kind == "KSamplerAdvanced" and isinstance(inputs.get(key), int) and inputs[key] < steps:
                    inputs[key] = int(inputs[key] * capped / steps + 0.5)
    return prompt


def tiny_entry(folder: str, name: str) -> str | None:
    """The tiny stand-in for the real file ``name`` of models folder ``folder`` (None: there is none)."""
    for pattern, entry in RULES.get(folder, ()):
        if re.search(pattern, name, re.IGNORECASE):
            return entry
    return None


def rename(prompt: dict[str, Any], models_dir: str | os.PathLike) -> dict[str, Any]:
    """A copy of ``prompt`` whose model-file widgets name the tiny stand-ins in ``models_dir``.

    Raises :class:`ModelMapError` listing every file that has no stand-in.
    """
    models_dir = Path(models_dir)
    prompt = copy.deepcopy(prompt)
    missing = []
    for node_id, node in prompt.items():
        inputs = node.get("inputs") or {}
        for (kind, input_name), folder in MODEL_INPUTS.items():
            value = inputs.get(input_name)  # a link (a list) is left alone
            if node.get("class_type") != kind or not isinstance(value, str):
                continue
            if (models_dir / folder / value).exists():
                continue  # already a tiny entry
            entry = tiny_entry(folder, value)
            if entry is None:
                missing.append(f"node {node_id} ({kind}) {input_name} '{value}'")
            else:
                inputs[input_name] = entry
    if missing:
        raise ModelMapError("--model-map tiny has no tiny stand-in for: " + "; ".join(missing)
                            + ". The tiny set covers SD1.5 and SDXL checkpoints, IP-Adapters, CLIP vision, LoRAs, "
                            "and SD1.5 ControlNets and motion modules.")
    return prompt


def input_names(prompt: dict[str, Any]) -> list[str]:
    """Input-folder files the prompt loads (LoadImage, LoadImageMask, IPAdapterLoadEmbeds), in node order."""
    names = []
    for node in prompt.values():
        for (kind, input_name), _ in INPUT_FILES.items():
            value = (node.get("inputs") or {}).get(input_name)
            if node.get("class_type") == kind and isinstance(value, str) and value not in names:
                names.append(value)
    return names


def provide_inputs(names: list[str], input_dir: str | os.PathLike, models_dir: str | os.PathLike) -> InputPlan:
    """Keep ``input_dir`` when it holds every file in ``names``; otherwise use the stand-in folder next to the
    tiny models (every name written there unless present), and say so in the plan's notes."""
    input_dir = Path(input_dir)
    lacking = [name for name in names if not (input_dir / name).exists()]
    if not lacking:
        return InputPlan(input_dir)
    stand_ins = Path(models_dir).resolve().parent / INPUT_FOLDER_NAME
    tiny_assets.refresh_inputs(stand_ins)
    unknown = [name for name in names if tiny_assets.ensure_input(stand_ins, name, models_dir) is None]
    notes = [f"--model-map tiny: the input folder {input_dir} lacks {', '.join(lacking)}; this run reads all its "
             f"inputs from generated stand-ins in {stand_ins}"]
    if unknown:
        notes.append(f"--model-map tiny: no stand-in is made for {', '.join(unknown)} (unknown file type)")
    return InputPlan(stand_ins, notes)
