"""The FaceID attention LoRA: the one stored inside FaceID checkpoints, and the separate ``*_lora`` files.

FaceID adapters were trained together with a rank-128 LoRA on every attention projection of the UNet
(``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of attn1 and attn2).  It reaches a model in one of two forms:

* inside the checkpoint's ``ip_adapter`` part as ``N.to_q_lora.down.weight`` / ``.up.weight`` ... where N is
  the position in diffusers' ``unet.attn_processors`` order (even N = attn1, odd N = attn2); no alpha, so
  the delta is ``up @ down`` (:attr:`core.adapter.IPAdapter.lora` keeps these tensors);
* as a separate kohya-style file in ``loras/`` (``ip-adapter-faceid_sd15_lora.safetensors``, ...) with keys
  ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / optional ``.alpha``, ``<module>`` written
  with ``_`` for ``.`` in the diffusers layout (the SD1.5 files) or the original LDM layout.

Both become a table {diffusers module name: [LowRankDelta]} built from the family's attention layout (no
UNet needed), then either a :class:`core.weight_patches.WeightPatch` on a headless ``DiffusersModel`` (the
sampler applies it around the loop) or ``"diff"`` weight patches on a clone of a ComfyUI ModelPatcher (keys
``diffusion_model.<LDM name>.weight``), whose key names ComfyUI uses for every checkpoint it loads.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from .adapter import attn2_layer_names
from .weight_patches import LowRankDelta, WeightPatch

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")
# the LoRA's name for a projection → the module it patches inside an Attention block
_MODULE_OF = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_INTERNAL_KEY = re.compile(r"^(\d+)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_KOHYA_KEY = re.compile(r"^lora_unet_(?P<module>.+)\.(?P<role>lora_down\.weight|lora_up\.weight|alpha)$")
# SD1.5 and SDXL UNets both have two ResNet layers per down level: the LDM numbering follows from it
_LAYERS_PER_BLOCK = 2

logger = logging.getLogger(__name__)


class FaceIDLoraError(ValueError):
    """A FaceID LoRA that cannot be read or does not fit the model."""


# ---- names ------------------------------------------------------------------------------------------------

def attention_names(family: str) -> tuple[str, ...]:
    """diffusers names of every attention block (attn1 then attn2 of each transformer block), in
    ``unet.attn_processors`` order: index N here is the checkpoint LoRA's ``N``."""
    names = []
    for attn2 in attn2_layer_names(family):
        names += [attn2[: -len("attn2")] + "attn1", attn2]
    return tuple(names)


def ldm_name(diffusers_name: str) -> str:
    """The original LDM (ComfyUI) path of a module inside a UNet transformer, from its diffusers path.

    ``down_blocks.i.attentions.j`` → ``input_blocks.{1 + 3i + j}.1``, ``up_blocks.i.attentions.j`` →
    ``output_blocks.{3i + j}.1``, ``mid_block.attentions.0`` → ``middle_block.1``; the rest is unchanged.
    """
    parts = diffusers_name.split(".")
    step = _LAYERS_PER_BLOCK + 1
    if parts[0] == "down_blocks" and parts[2] == "attentions":
        head = f"input_blocks.{1 + step * int(parts[1]) + int(parts[3])}.1"
        return ".".join([head] + parts[4:])
    if parts[0] == "up_blocks" and parts[2] == "attentions":
        head = f"output_blocks.{step * int(parts[1]) + int(parts[3])}.1"
        return ".".join([head] + parts[4:])
    if parts[0] == "mid_block" and parts[1] == "attentions":
        return ".".join(["middle_block.1"] + parts[3:])
    raise FaceIDLoraError(f"'{diffusers_name}' is not a module inside a UNet attention block")


def projection_modules(family: str) -> tuple[str, ...]:
    """diffusers names of every module the FaceID LoRA patches, for a family (``sd15``/``sdxl``)."""
    return tuple(f"{attn}.{_MODULE_OF[p]}" for attn in attention_names(family) for p in PROJECTIONS)


def _kohya_table(family: str) -> dict[str, str]:
    """kohya module spelling (diffusers or LDM layout, ``.`` → ``_``) → diffusers module name."""
    table = {}
    for module in projection_modules(family):
        table[module.replace(".", "_")] = module
        table[ldm_name(module).replace(".", "_")] = module
    return table


# ---- reading the two forms ----------------------------------------------------------------------------------

def internal_deltas(lora: Mapping[str, torch.Tensor], family: str, label: str = "the FaceID checkpoint"
                    ) -> dict[str, tuple[LowRankDelta, ...]]:
    """{diffusers module: (delta,)} of the attention LoRA stored in a FaceID checkpoint (``IPAdapter.lora``).

    Scale 1 (no alpha in these files).  Raises :class:`FaceIDLoraError` when the processor count does not
    match the family's attention layout or a pair is incomplete.
    """
    names = attention_names(family)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in lora.items():
        match = _INTERNAL_KEY.match(key)
        if match is None:
            raise FaceIDLoraError(f"{label}: LoRA key '{key}' is not of the form 'N.to_q_lora.down.weight'")
        pairs.setdefault((int(match.group(1)), match.group(2)), {})[match.group(3)] = tensor
    highest = max((n for n, _ in pairs), default=-1)
    if highest >= len(names):
        raise FaceIDLoraError(
            f"{label}: its attention LoRA covers {highest + 1} attention blocks but a {family} UNet has "
            f"{len(names)}; the adapter was made for another model family")
    deltas: dict[str, tuple[LowRankDelta, ...]] = {}
    for (index, projection), factors in sorted(pairs.items()):
        if set(factors) != {"down", "up"}:
            raise FaceIDLoraError(f"{label}: LoRA '{index}.{projection}_lora' lacks its "
                                  f"{'up' if 'down' in factors else 'down'} weight; the file is incomplete")
        module = f"{names[index]}.{_MODULE_OF[projection]}"
        deltas[module] = (LowRankDelta(factors["up"].float(), factors["down"].float(), 1.0),)
    return deltas


def read_lora_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file (``.safetensors``; ``.bin``/``.pt`` read with ``weights_only``)."""
    path = str(path)
    if path.lower().endswith((".safetensors", ".sft")):
        from safetensors.torch import load_file

        return load_file(path)
    data = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    if not isinstance(data, dict):
        raise FaceIDLoraError(f"LoRA '{Path(path).name}': expected a dictionary of tensors, "
                              f"found {type(data).__name__}")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def file_deltas(tensors: Mapping[str, torch.Tensor], family: str, label: str = "the FaceID LoRA"
                ) -> dict[str, tuple[LowRankDelta, ...]]:
    """{diffusers module: (delta,)} of a kohya-style FaceID LoRA file; scale ``alpha / rank`` (1 without alpha).

    Keys that are not ``lora_unet_`` attention projections raise :class:`FaceIDLoraError` naming a few of
    them (a general LoRA belongs in a LoraLoader node).
    """
    table = _kohya_table(family)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    foreign = []
    for key, tensor in tensors.items():
        match = _KOHYA_KEY.match(key)
        module = table.get(match.group("module")) if match else None
        if module is None:
            foreign.append(key)
            continue
        role = match.group("role").split(".")[0]
        parts.setdefault(module, {})[role] = tensor
    if foreign:
        raise FaceIDLoraError(
            f"{label}: {len(foreign)} keys are not attention-projection LoRA weights of a {family} UNet, e.g. "
            f"{foreign[:3]}; expected kohya keys like 'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_"
            f"attn1_to_q.lora_down.weight'. A LoRA for another model family, or a general LoRA (use LoraLoader)")
    deltas: dict[str, tuple[LowRankDelta, ...]] = {}
    for module, roles in parts.items():
        if "lora_down" not in roles or "lora_up" not in roles:
            missing = "lora_up" if "lora_down" in roles else "lora_down"
            raise FaceIDLoraError(f"{label}: module '{module}' has no {missing} weight; the file is incomplete")
        down, up = roles["lora_down"].float(), roles["lora_up"].float()
        scale = float(roles["alpha"]) / down.shape[0] if "alpha" in roles else 1.0
        deltas[module] = (LowRankDelta(up, down, scale),)
    if not deltas:
        raise FaceIDLoraError(f"{label} holds no LoRA weights")
    return deltas


# ---- applying -----------------------------------------------------------------------------------------------

def _family(model: Any) -> str:
    from .apply import model_family  # the MODEL-type dispatch lives with the apply glue

    return model_family(model)


def patch_model(model: Any, deltas: Mapping[str, tuple[LowRankDelta, ...]], strength: float, label: str) -> Any:
    """A new MODEL with ``deltas`` added at ``strength``; strength 0 returns ``model`` itself.

    Headless (a ``DiffusersModel``): one more :class:`WeightPatch` in ``model.patches``.  ComfyUI: a clone of
    the ModelPatcher with ``"diff"`` patches (the dense ``up @ down · scale``) at ``strength``.
    """
    if strength == 0 or not deltas:
        return model
    patch = WeightPatch(deltas, label).with_strength(float(strength))
    if hasattr(model, "unet") and hasattr(model, "patches"):
        patch.weights(model.unet)  # fail now, naming the modules, rather than when sampling starts
        return model.replace(patches=tuple(model.patches) + (patch,))
    if hasattr(model, "add_patches") and hasattr(model, "clone"):
        return _patch_comfy(model, deltas, float(strength), label)
    raise TypeError(f"{label}: expected a MODEL (DiffusersModel headless or a ComfyUI ModelPatcher), "
                    f"got {type(model).__name__}")


def _patch_comfy(patcher: Any, deltas: Mapping[str, tuple[LowRankDelta, ...]], strength: float, label: str) -> Any:
    state = patcher.model.state_dict()
    patches = {}
    for module, items in deltas.items():
        key = f"diffusion_model.{ldm_name(module)}.weight"
        if key not in state:
            raise FaceIDLoraError(f"{label}: the ComfyUI model has no weight '{key}'; the LoRA was made for "
                                  f"another model family")
        shape = state[key].shape
        total = sum(item.delta(shape) for item in items)
        patches[key] = ("diff", (total,))
    patched = patcher.clone()
    patched.add_patches(patches, strength)
    return patched


def apply_internal_lora(model: Any, adapter: Any, strength: float) -> Any:
    """A new MODEL with the attention LoRA stored in FaceID ``adapter`` at ``strength`` (model unchanged
    when the adapter holds none or the strength is 0)."""
    lora = getattr(adapter, "lora", None) or {}
    if strength == 0 or not lora:
        return model
    name = Path(str(getattr(adapter, "path", "FaceID adapter"))).name
    label = f"FaceID LoRA inside '{name}'"
    return patch_model(model, internal_deltas(lora, _family(model), label), strength, label)


def apply_lora_file(model: Any, path: str | os.PathLike, strength: float) -> Any:
    """A new MODEL with the FaceID LoRA file at ``path`` at ``strength`` (model unchanged at strength 0)."""
    if strength == 0:
        return model
    label = f"FaceID LoRA '{Path(path).name}'"
    return patch_model(model, file_deltas(read_lora_file(path), _family(model), label), strength, label)


def find_lora_file(preset: str, family: str, folders: Any = None) -> str | None:
    """Full path of the FaceID LoRA file the Unified Loader ``preset`` names for ``family``, or None.

    Patterns from :data:`core.presets.PRESETS` (the existing pack's), searched case-insensitively in the
    ``loras`` folders, sub-folders included; the first match in sorted order wins.
    """
    from . import folders as default_folders
    from .presets import get_preset

    folders = folders or default_folders
    patterns = get_preset(preset).family(family).lora
    names = sorted(folders.get_filename_list("loras"))
    for pattern in patterns:
        for name in names:
            if re.search(pattern, name, re.IGNORECASE):
                return folders.get_full_path("loras", name)
    return None


def apply_preset_lora(model: Any, preset: str, adapter: Any, strength: float, folders: Any = None) -> tuple[Any, str]:
    """(MODEL, what was applied) for the FaceID unified loader: the preset's LoRA file from ``loras/`` at
    ``strength``, else the LoRA stored inside the adapter (the same weights), else nothing.

    Presets without a LoRA (Portrait) and strength 0 leave the model unchanged.
    """
    from .presets import get_preset

    family = _family(model)
    if strength == 0 or not get_preset(preset).family(family).lora:
        return model, "none"
    path = find_lora_file(preset, family, folders)
    if path is not None:
        return apply_lora_file(model, path, strength), Path(path).name
    if getattr(adapter, "lora", None):
        return apply_internal_lora(model, adapter, strength), f"the LoRA inside '{Path(str(adapter.path)).name}'"
    logger.warning("FaceID preset '%s': no LoRA file in the 'loras' folders matches %s and '%s' holds no LoRA; "
                   "running without the FaceID LoRA (results are weaker)", preset,
                   " or ".join(get_preset(preset).family(family).lora), Path(str(getattr(adapter, "path", ""))).name)
    return model, "none"
