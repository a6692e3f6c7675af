"""The Unified Loader presets: which IP-Adapter and CLIP vision files each preset means, and finding them.

The table :data:`PRESETS` is data: per preset and per model family (``sd15`` / ``sdxl``) it lists the
file-name patterns of the existing node pack (so the files people already have are found), the adapter
kinds that fit the preset (so a renamed file is still found by what it *is*), and the encoder the preset
needs.  Patterns are case-insensitive regular expressions searched (``re.search``) in the file's path
relative to its folder, sub-folders included; within one pattern list the first pattern that matches any
file wins, and within a pattern the first file in sorted order.

Finding order, for the adapter and then the encoder:
1. by name (the table's patterns);
2. by content: adapters are detected from their weights (``core.adapter``), encoders by their widths,
   skipping files whose names claim another preset.
When nothing fits, :class:`PresetFileNotFoundError` names the preset, the folders searched and example
file names that would match.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from . import folders as default_folders

_MODEL_EXT = r"\.(safetensors|bin)$"

# CLIP vision patterns of the existing pack plus sub-folder layouts (``CLIP-ViT-H-14/model.safetensors``;
# ComfyUI lists sub-folder names with the OS separator, hence [/\\]).
_CLIP_VIT_H = (
    r"(ViT.H.14.*s32B.b79K|ipadapter.*sd15|sd1.?5.*model)\.(bin|safetensors)",
    r"ViT.H.14[^/\\]*[/\\](.*[/\\])?[^/\\]*" + _MODEL_EXT,
)
_CLIP_VIT_BIGG = (
    r"(ViT.bigG.14.*39B.b160k|ipadapter.*sdxl|sdxl.*model)\.(bin|safetensors)",
    r"ViT.bigG.14[^/\\]*[/\\](.*[/\\])?[^/\\]*" + _MODEL_EXT,
)
_CLIP_L_336 = (r"clip.vit.large.patch14.336\.(bin|safetensors)",)

# Example file names per encoder, for error messages.
_CLIP_EXAMPLES = {
    "vit-h": "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
    "vit-bigG": "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors",
    "clip-l-336": "clip-vit-large-patch14-336.bin",
}
_CLIP_PATTERNS = {"vit-h": _CLIP_VIT_H, "vit-bigG": _CLIP_VIT_BIGG, "clip-l-336": _CLIP_L_336}


def _ext(stem: str) -> str:
    return stem + _MODEL_EXT


@dataclass(frozen=True)
class FamilyFiles:
    """What a preset means for one model family.

    ``patterns``: adapter file-name patterns in priority order (a later one is a fallback).
    ``kinds``: AdapterSpec kinds that fit, for finding a renamed file by content (empty: by name only).
    ``example``: a file name that would match, for error messages.
    ``unsupported``: set when the preset has no adapter for this family (the message to show).
    ``lora``: LoRA file-name patterns (FaceID presets), folder ``loras``.
    """

    patterns: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    example: str = ""
    unsupported: str | None = None
    lora: tuple[str, ...] = ()


@dataclass(frozen=True)
class Preset:
    """One Unified Loader preset: the encoder it needs and its files per family."""

    name: str
    encoder: str                    # "vit-h", "vit-bigG" or "clip-l-336"
    sd15: FamilyFiles
    sdxl: FamilyFiles
    insightface: bool = False
    loader: str = "IPAdapterUnifiedLoader"   # the node class whose preset list holds it

    def family(self, family: str) -> FamilyFiles:
        if family not in ("sd15", "sdxl"):
            raise ValueError(f"unknown model family '{family}'; expected 'sd15' or 'sdxl'")
        return self.sd15 if family == "sd15" else self.sdxl

    @property
    def clip_vision_patterns(self) -> tuple[str, ...]:
        return _CLIP_PATTERNS[self.encoder]


FAMILY_LABELS = {"sd15": "SD1.5", "sdxl": "SDXL"}


def _unsupported(preset: str, family: str) -> FamilyFiles:
    label = FAMILY_LABELS[family]
    return FamilyFiles(unsupported=f"preset '{preset}' has no {label} model; choose another preset "
                                   f"or use an {'SDXL' if family == 'sd15' else 'SD1.5'} checkpoint")


_LIGHT = "LIGHT - SD1.5 only (low strength)"
_FULL = "FULL FACE - SD1.5 only (portraits stronger)"
_FID_PLUS = "FACEID PLUS - SD1.5 only"
_UNNORM = "FACEID PORTRAIT UNNORM - SDXL only (strong)"

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset(_LIGHT, "vit-h",
           sd15=FamilyFiles((_ext(r"sd15.light.v11"), _ext(r"sd15.light")), ("light", "base"),
                            "ip-adapter_sd15_light_v11.bin"),
           sdxl=_unsupported(_LIGHT, "sdxl")),
    Preset("STANDARD (medium strength)", "vit-h",
           sd15=FamilyFiles((_ext(r"ip.adapter.sd15"),), ("base",), "ip-adapter_sd15.safetensors"),
           sdxl=FamilyFiles((_ext(r"ip.adapter.sdxl.vit.h"),), ("base",),
                            "ip-adapter_sdxl_vit-h.safetensors")),
    Preset("VIT-G (medium strength)", "vit-bigG",
           sd15=FamilyFiles((_ext(r"sd15.vit.g"),), ("base",), "ip-adapter_sd15_vit-G.safetensors"),
           sdxl=FamilyFiles((_ext(r"ip.adapter.sdxl"),), ("base",), "ip-adapter_sdxl.safetensors")),
    Preset("PLUS (high strength)", "vit-h",
           sd15=FamilyFiles((_ext(r"ip.adapter.plus.sd15"),), ("plus",), "ip-adapter-plus_sd15.safetensors"),
           sdxl=FamilyFiles((_ext(r"plus.sdxl.vit.h"),), ("plus",), "ip-adapter-plus_sdxl_vit-h.safetensors")),
    Preset("PLUS FACE (portraits)", "vit-h",
           sd15=FamilyFiles((_ext(r"plus.face.sd15"),), ("plus-face", "plus"),
                            "ip-adapter-plus-face_sd15.safetensors"),
           sdxl=FamilyFiles((_ext(r"plus.face.sdxl.vit.h"),), ("plus-face", "plus"),
                            "ip-adapter-plus-face_sdxl_vit-h.safetensors")),
    Preset(_FULL, "vit-h",
           sd15=FamilyFiles((_ext(r"full.face.sd15"),), ("full-face",), "ip-adapter-full-face_sd15.safetensors"),
           sdxl=_unsupported(_FULL, "sdxl")),
    # FaceID presets (IPAdapterUnifiedLoaderFaceID): insightface and a LoRA besides the two files.
    Preset("FACEID", "vit-h", insightface=True, loader="IPAdapterUnifiedLoaderFaceID",
           sd15=FamilyFiles((_ext(r"faceid.sd15"),), ("faceid",), "ip-adapter-faceid_sd15.bin",
                            lora=(r"faceid.sd15.lora\.safetensors$",)),
           sdxl=FamilyFiles((_ext(r"faceid.sdxl"),), ("faceid",), "ip-adapter-faceid_sdxl.bin",
                            lora=(r"faceid.sdxl.lora\.safetensors$",))),
    Preset(_FID_PLUS, "vit-h", insightface=True, loader="IPAdapterUnifiedLoaderFaceID",
           sd15=FamilyFiles((_ext(r"faceid.plus.sd15"),), ("faceid-plus",), "ip-adapter-faceid-plus_sd15.bin",
                            lora=(r"faceid.plus.sd15.lora\.safetensors$",)),
           sdxl=_unsupported(_FID_PLUS, "sdxl")),
    Preset("FACEID PLUS V2", "vit-h", insightface=True, loader="IPAdapterUnifiedLoaderFaceID",
           sd15=FamilyFiles((_ext(r"faceid.plusv2.sd15"),), ("faceid-plus",),
                            "ip-adapter-faceid-plusv2_sd15.bin",
                            lora=(r"faceid.plusv2.sd15.lora\.safetensors$",)),
           sdxl=FamilyFiles((_ext(r"faceid.plusv2.sdxl"),), ("faceid-plus",),
                            "ip-adapter-faceid-plusv2_sdxl.bin",
                            lora=(r"faceid.plusv2.sdxl.lora\.safetensors$",))),
    Preset("FACEID PORTRAIT (style transfer)", "vit-h", insightface=True, loader="IPAdapterUnifiedLoaderFaceID",
           sd15=FamilyFiles((_ext(r"portrait.v11.sd15"), _ext(r"portrait.sd15")), ("portrait",),
                            "ip-adapter-faceid-portrait-v11_sd15.bin"),
           sdxl=FamilyFiles((_ext(r"portrait.sdxl"),), ("portrait",), "ip-adapter-faceid-portrait_sdxl.bin")),
    Preset(_UNNORM, "vit-h", insightface=True, loader="IPAdapterUnifiedLoaderFaceID",
           sd15=_unsupported(_UNNORM, "sd15"),
           sdxl=FamilyFiles((_ext(r"portrait.sdxl.unnorm"),), ("portrait-unnorm",),
                            "ip-adapter-faceid-portrait_sdxl_unnorm.bin")),
    # Community presets (IPAdapterUnifiedLoaderCommunity): found by name only.
    Preset("Composition", "vit-h", loader="IPAdapterUnifiedLoaderCommunity",
           sd15=FamilyFiles((r"plus.composition.sd15\.safetensors$",), (), "ip_plus_composition_sd15.safetensors"),
           sdxl=FamilyFiles((r"plus.composition.sdxl\.safetensors$",), (),
                            "ip_plus_composition_sdxl.safetensors")),
    Preset("Kolors", "clip-l-336", loader="IPAdapterUnifiedLoaderCommunity",
           sd15=FamilyFiles(unsupported="preset 'Kolors' is only supported for Kolors models"),
           sdxl=FamilyFiles((_ext(r"(ip_adapter_plus_general|kolors.ip.adapter.plus)"),), (),
                            "Kolors-IP-Adapter-Plus.bin")),
)}


def presets_for(loader: str) -> list[str]:
    """Preset names of one loader node, in the widget's order."""
    return [p.name for p in PRESETS.values() if p.loader == loader]


class PresetFileNotFoundError(FileNotFoundError):
    """No file in the model folders fits the preset."""


class PresetUnsupportedError(ValueError):
    """The preset has no model for the checkpoint's family."""


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (the UI string), or a ValueError listing the known presets."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown IP-Adapter preset '{name}'; known presets: {', '.join(PRESETS)}") from None


def _matches(patterns: Iterable[str], names: list[str]) -> list[str]:
    """Names matching the first pattern that matches anything (sorted order), else []."""
    for pattern in patterns:
        rx = re.compile(pattern, re.IGNORECASE)
        hits = [n for n in names if rx.search(n)]
        if hits:
            return hits
    return []


def _model_files(names: Iterable[str]) -> list[str]:
    return sorted(n for n in names if re.search(_MODEL_EXT, n, re.IGNORECASE) or n.lower().endswith(".pt"))


def _claimed_by_other(name: str, preset: Preset, family: str) -> bool:
    """True if another preset's adapter patterns for ``family`` claim this file name."""
    for other in PRESETS.values():
        if other.name == preset.name:
            continue
        rule = other.family(family)
        if any(re.search(p, name, re.IGNORECASE) for p in rule.patterns):
            return True
    return False


# ---- content detection ----------------------------------------------------------------------------

def detect_adapter(path: str) -> Any | None:
    """The AdapterSpec of an adapter file from its key names and shapes, or None when it is not one."""
    from . import adapter, checkpoint  # lazy: only needed when names did not settle it

    try:
        return adapter.detect(checkpoint.read_layout(path), os.path.basename(path))
    except Exception:  # noqa: BLE001 - an unreadable or foreign file simply does not fit
        return None


def encoder_widths(path: str) -> tuple[int, int] | None:
    """(hidden_size, projection_dim) of a CLIP vision file or transformers folder, read without loading it.

    Reads ``config.json`` next to the weights when present, else the tensor shapes in a safetensors
    header. Returns None when the widths cannot be read.
    """
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    config = os.path.join(folder, "config.json")
    if os.path.isfile(config):
        try:
            with open(config, encoding="utf-8") as fh:
                cfg = json.load(fh)
            cfg = cfg.get("vision_config", cfg)
            return int(cfg["hidden_size"]), int(cfg["projection_dim"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    weights = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
    if not weights.lower().endswith(".safetensors") or not os.path.isfile(weights):
        return None
    try:
        from safetensors import safe_open

        with safe_open(weights, framework="pt") as f:
            for key in f.keys():
                if key.endswith("visual_projection.weight"):
                    projection, hidden = f.get_slice(key).get_shape()
                    return int(hidden), int(projection)
    except Exception:  # noqa: BLE001 - a broken header means "unknown widths"
        return None
    return None


def encoder_fits(spec: Any, widths: tuple[int, int]) -> bool:
    """Whether an encoder with ``widths`` = (hidden, projection) gives the CLIP feature the adapter needs."""
    needed = getattr(spec, "clip_width", getattr(spec, "encoder_width", None))
    if needed is None:  # face-embedding-only kinds: any encoder will do
        return True
    hidden, projection = widths
    return needed == (projection if "image_embeds" in getattr(spec, "feature", "") else hidden)


def _encoder_path(folders: Any, name: str) -> str:
    """Full path for a clip_vision entry; a transformers folder is returned as the folder."""
    path = folders.get_full_path("clip_vision", name)
    if path and os.path.basename(path).lower() in ("model.safetensors", "pytorch_model.bin") \
            and os.path.isfile(os.path.join(os.path.dirname(path), "config.json")):
        return os.path.dirname(path)
    return path


# ---- finding ----------------------------------------------------------------------------------------

def _adapter_by_name(rule: FamilyFiles, folders: Any) -> str | None:
    hits = _matches(rule.patterns, _model_files(folders.get_filename_list("ipadapter")))
    return folders.get_full_path("ipadapter", hits[0]) if hits else None


def _clip_by_name(p: Preset, folders: Any) -> str | None:
    hits = _matches(p.clip_vision_patterns, _model_files(folders.get_filename_list("clip_vision")))
    return _encoder_path(folders, hits[0]) if hits else None


def _adapter_by_content(p: Preset, family: str, rule: FamilyFiles, folders: Any, detect: Callable[[str], Any],
                        widths: tuple[int, int] | None) -> str | None:
    """First adapter (sorted) whose weights fit the preset: family, kind, and the encoder when known.

    Files whose names claim another preset are skipped. ``widths`` are those of the preset's encoder when
    it was found, so that e.g. STANDARD and VIT-G are told apart even for encoders without a public name.
    """
    if not rule.kinds:
        return None
    for name in _model_files(folders.get_filename_list("ipadapter")):
        if _claimed_by_other(name, p, family):
            continue
        path = folders.get_full_path("ipadapter", name)
        spec = detect(path)
        if spec is None or spec.family != family or spec.kind not in rule.kinds:
            continue
        if getattr(spec, "encoder_hint", None) not in (None, p.encoder):
            continue
        if widths is not None and not encoder_fits(spec, widths):
            continue
        return path
    return None


def _clip_by_content(folders: Any, spec: Any) -> str | None:
    for name in _model_files(folders.get_filename_list("clip_vision")):
        path = _encoder_path(folders, name)
        widths = encoder_widths(path)
        if widths is not None and encoder_fits(spec, widths):
            return path
    return None


def find_ipadapter(preset: str, family: str, folders: Any = None,
                   detect: Callable[[str], Any] | None = None) -> str:
    """Full path of the IP-Adapter file for ``preset`` on a ``family`` model (by name, else by content)."""
    return find_files(preset, family, folders, detect, need_clip_vision=False)[1]


def find_files(preset: str, family: str, folders: Any = None, detect: Callable[[str], Any] | None = None,
               need_clip_vision: bool = True) -> tuple[str | None, str]:
    """(clip_vision_path, ipadapter_path) for ``preset`` on a ``family`` (``sd15``/``sdxl``) model.

    ``folders`` is anything with ``get_filename_list(folder)``, ``get_full_path(folder, name)`` and
    ``get_folder_paths(folder)`` (default: :mod:`core.folders`). ``detect(path) -> AdapterSpec | None``
    overrides adapter detection (default: :func:`detect_adapter`). A file found by name is never read.
    A transformers encoder folder is returned as the folder.
    """
    folders = folders or default_folders
    detect = detect or detect_adapter
    p = get_preset(preset)
    rule = p.family(family)
    if rule.unsupported:
        raise PresetUnsupportedError(rule.unsupported)
    clip_path = _clip_by_name(p, folders) if need_clip_vision else None
    adapter_path = _adapter_by_name(rule, folders)
    if adapter_path is None:
        widths = encoder_widths(clip_path) if clip_path else None
        adapter_path = _adapter_by_content(p, family, rule, folders, detect, widths)
    if adapter_path is None:
        label = FAMILY_LABELS[family]
        raise PresetFileNotFoundError(_not_found_message(
            p, "IP-Adapter", "ipadapter", folders, rule.patterns, rule.example,
            f"an {label} adapter of kind {'/'.join(rule.kinds)}" if rule.kinds else ""))
    if need_clip_vision and clip_path is None:
        spec = detect(adapter_path)
        clip_path = _clip_by_content(folders, spec) if spec is not None else None
        if clip_path is None:
            needs = f"a {p.encoder} encoder"
            if spec is not None and getattr(spec, "clip_width", getattr(spec, "encoder_width", None)):
                needs = f"an encoder giving the {spec.encoder_width}-d {spec.feature} that '{adapter_path}' needs"
            raise PresetFileNotFoundError(_not_found_message(
                p, "CLIP vision", "clip_vision", folders, p.clip_vision_patterns, _CLIP_EXAMPLES[p.encoder],
                needs))
    return clip_path, adapter_path


def _not_found_message(p: Preset, what: str, folder: str, folders: Any, patterns: tuple[str, ...],
                       example: str, content: str) -> str:
    searched = ", ".join(folders.get_folder_paths(folder)) or "(no folders configured)"
    return (f"IPAdapterUnifiedLoader: no {what} file for preset '{p.name}' in the '{folder}' folders "
            f"({searched}). Expected a file name matching {' or '.join(repr(x) for x in patterns)} "
            f"(e.g. '{example}', sub-folders allowed){f', or {content} under any name' if content else ''}. "
            f"Put the file into one of those folders and run again.")
