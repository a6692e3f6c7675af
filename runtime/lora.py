"""LoRA files: read kohya/sd-scripts and diffusers/PEFT layouts, map them onto diffusers module names.

Layouts read (one file may mix UNet and text-encoder entries):

==================  ===========================================================================================
kohya / sd-scripts  ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``; ``lora_te_``
                    (SD1.5), ``lora_te1_`` / ``lora_te2_`` (SDXL).  ``<module>`` is a module path with every
                    ``.`` written as ``_``: the diffusers UNet's (SD1.5 trainers) or the original LDM UNet's
                    (``input_blocks_4_1_...``, SDXL trainers), or the transformers text encoder's.
PEFT (diffusers)    ``unet.<module>.lora_A.weight`` / ``.lora_B.weight``; ``text_encoder.`` /
                    ``text_encoder_2.``; alpha from ``<module>.alpha`` keys or the ``lora_adapter_metadata``
                    JSON diffusers writes into the safetensors header (no alpha: scale 1, diffusers' rule)
diffusers (older)   ``<module>.lora.down.weight`` / ``.lora.up.weight``, ``.lora_linear_layer.down/up``, and the
                    attention-processor form ``<attn>.processor.to_q_lora.down.weight`` (``to_out_lora`` is
                    ``to_out.0``; on text encoders ``q_proj`` ... ``out_proj``)
==================  ===========================================================================================

Because ``_`` cannot be told from ``.`` in kohya names, they are matched against tables built from the
model's own module names (``named_modules()``), never by guessing.  The result is a pair of
:class:`core.weight_patches.WeightPatch` — one for the UNet, one for the text encoders, whose module names
start with ``text_encoder.`` / ``text_encoder_2.`` (the handle's patch root, ``TextEncoderHandle.patch_root``).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..core.checkpoint import load_torch_weights, read_safetensors
from ..core.weight_patches import LowRankDelta, WeightPatch

TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                   "lora_te2_": "text_encoder_2"}
# (key suffix, role): longest first, so '.lora.down.weight' wins over '.down.weight'
_SUFFIXES = (
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".down.weight", "down"), (".up.weight", "up"),
    (".alpha", "alpha"),
)
# the attention-processor form names the projection inside the processor
_PROCESSOR_FORM = re.compile(r"^(?P<attn>.*?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora$")
_UNET_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TEXT_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_UNSUPPORTED = ("hada_w1", "lokr_w1", "lora_mid", "dora_scale", "lora_magnitude_vector", ".diff", "oft_")


class LoraFormatError(ValueError):
    """A LoRA file that cannot be read or does not fit the model."""


@dataclass(frozen=True, eq=False)
class LoraEntry:
    """One low-rank pair of a file, before it is matched to a module."""

    stem: str                    # the key without its role suffix
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None          # None: no alpha stored (scale 1)


@dataclass(frozen=True, eq=False)
class LoraFile:
    """The entries of one LoRA file, and the alpha settings diffusers stored in its header."""

    path: str
    entries: tuple[LoraEntry, ...]
    peft_alphas: Mapping[str, dict]   # component → {"lora_alpha", "alpha_pattern", "use_rslora"}

    @property
    def label(self) -> str:
        return f"LoRA '{Path(self.path).name}'"


# ---------------------------------------------------------------------------------------------- reading
def _read_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.lower().endswith((".safetensors", ".sft")):
        return read_safetensors(path, "LoRA file")
    data = load_torch_weights(path, "LoRA file")  # weights_only: a pickle that would run code is refused
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise LoraFormatError(f"LoRA '{Path(path).name}': expected a dictionary of tensors, found {type(data).__name__}")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}, {}


def _peft_alphas(metadata: Mapping[str, str]) -> dict[str, dict]:
    """Per component (``unet``, ``text_encoder``, ...) the PEFT alpha settings diffusers saved, if any."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        table = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    found: dict[str, dict] = {}
    for key, value in table.items():
        component, _, field = key.partition(".")
        if field in ("lora_alpha", "alpha_pattern", "use_rslora", "use_dora"):
            found.setdefault(component, {})[field] = value
    return found


def _split(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Read a LoRA file (``.safetensors``, or ``.pt``/``.bin``/``.ckpt`` with ``weights_only``).

    Raises :class:`LoraFormatError` naming the file and a few keys for entries that are not plain LoRA
    pairs (LoHa, LoKr, DoRA, ...) or a down without its up.
    """
    path = str(path)
    name = Path(path).name
    tensors, metadata = _read_tensors(path)
    if not tensors:
        raise LoraFormatError(f"LoRA '{name}' holds no tensors")
    unsupported = [k for k in tensors if any(marker in k for marker in _UNSUPPORTED)]
    if unsupported:
        raise LoraFormatError(f"LoRA '{name}' is a LyCORIS/DoRA-style file (keys such as {unsupported[:3]}); only "
                              "plain LoRA (down/up pairs with an optional alpha) is supported headless")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    strays = []
    for key, tensor in tensors.items():
        split = _split(key)
        if split is None:
            strays.append(key)
            continue
        parts.setdefault(split[0], {})[split[1]] = tensor
    entries, incomplete = [], []
    for stem, roles in parts.items():
        if "down" not in roles or "up" not in roles:
            if set(roles) != {"alpha"}:
                incomplete.append(stem)
            continue
        alpha = roles.get("alpha")
        entries.append(LoraEntry(stem, roles["down"], roles["up"], None if alpha is None else float(alpha)))
    # alpha keys of the processor/old forms sit beside the module, not beside the factors
    for entry_index, entry in enumerate(entries):
        if entry.alpha is None:
            for candidate in _alpha_candidates(entry.stem):
                if candidate in parts and set(parts[candidate]) == {"alpha"}:
                    entries[entry_index] = LoraEntry(entry.stem, entry.down, entry.up,
                                                     float(parts[candidate]["alpha"]))
                    break
    if strays or incomplete:
        shown = (strays + [s + ".*" for s in incomplete])[:5]
        raise LoraFormatError(f"LoRA '{name}': {len(strays) + len(incomplete)} keys are not LoRA down/up/alpha "
                              f"entries, e.g. {shown}; expected kohya (lora_down/lora_up/alpha) or diffusers/PEFT "
                              "(lora_A/lora_B, lora.down/lora.up) keys")
    return LoraFile(path, tuple(entries), _peft_alphas(metadata))


def _alpha_candidates(stem: str) -> list[str]:
    match = _PROCESSOR_FORM.match(stem)
    if match is None:
        return []
    return [f"{match['attn']}.{_UNET_PROJ[match['proj']]}", f"{match['attn']}.{match['proj']}"]


# ---------------------------------------------------------------------------------------------- mapping
def _ldm_names(unet: Any, names: list[str]) -> dict[str, str]:
    """Original LDM (sgm) module path → diffusers module path for the UNet's weighted modules."""
    from .ldm_convert import unet_to_ldm

    spatial = [n for n in names if "motion_modules" not in n]
    try:
        converted = unet_to_ldm({f"{n}.weight": None for n in spatial}, unet.config)
    except (KeyError, AttributeError, TypeError):  # not a plain SD UNet layout: no LDM names
        return {}
    prefix = "model.diffusion_model."
    ldm = [k[len(prefix):-len(".weight")] for k in converted]
    return dict(zip(ldm, spatial))


@dataclass
class ModuleTables:
    """Module names of the model a LoRA is applied to, per component, with their kohya spellings."""

    dotted: dict[str, dict[str, str]]          # component → name as files spell it → module name
    kohya: dict[str, dict[str, str]]           # component → underscored name → module name

    @classmethod
    def build(cls, unet: Any | None, text_encoders: Sequence[Any] | None) -> "ModuleTables":
        dotted: dict[str, dict[str, str]] = {}
        kohya: dict[str, dict[str, str]] = {}
        components = {}
        if unet is not None:
            components["unet"] = unet
        for name, encoder in zip(TEXT_ENCODER_NAMES, text_encoders or ()):
            components[name] = encoder
        for component, module in components.items():
            names = [n for n, m in module.named_modules() if n and isinstance(getattr(m, "weight", None), torch.Tensor)]
            spelled = {n: n for n in names}
            if component != "unet":
                # LoRA files name text-encoder modules as transformers 4 did (``text_model.encoder...``);
                # transformers 5's CLIPTextModel dropped that level
                spelled.update({f"text_model.{n}": n for n in names
                                if not n.startswith("text_model.") and n != "text_projection"})
            dotted[component] = spelled
            table = {alias.replace(".", "_"): n for alias, n in spelled.items()}
            if component == "unet":
                for ldm, name in _ldm_names(module, names).items():
                    table.setdefault(ldm.replace(".", "_"), name)
            kohya[component] = table
        return cls(dotted, kohya)

    def locate(self, stem: str) -> tuple[str, str] | None:
        """(component, module name) of an entry's stem, or None when the model has no such module."""
        for prefix, component in _KOHYA_PREFIXES.items():
            if stem.startswith(prefix):
                found = self.kohya.get(component, {}).get(stem[len(prefix):])
                return None if found is None else (component, found)
        stem = stem.removeprefix("base_model.model.")
        component, rest = "unet", stem
        for candidate in ("unet",) + TEXT_ENCODER_NAMES:
            if stem.startswith(candidate + "."):
                component, rest = candidate, stem[len(candidate) + 1:]
                break
        match = _PROCESSOR_FORM.match(rest)
        if match is not None:
            table = _TEXT_PROJ if component in TEXT_ENCODER_NAMES else _UNET_PROJ
            rest = f"{match['attn']}.{table[match['proj']]}"
        found = self.dotted.get(component, {}).get(rest)
        return None if found is None else (component, found)


def _scale(entry: LoraEntry, component: str, module: str, peft: Mapping[str, dict]) -> float:
    rank = entry.down.shape[0]
    if entry.alpha is not None:
        return entry.alpha / rank
    settings = peft.get(component)
    if not settings:
        return 1.0  # diffusers/PEFT files without alpha: W + B·A
    alpha = settings.get("lora_alpha", rank)
    for pattern, value in (settings.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern):
            alpha = value
            break
    root = rank ** 0.5 if settings.get("use_rslora") else rank
    return float(alpha) / root


def lora_patches(lora: LoraFile, unet: Any | None, text_encoders: Sequence[Any] | None,
                 strength_model: float = 1.0, strength_clip: float = 1.0) -> tuple[WeightPatch, WeightPatch]:
    """(UNet patch, text-encoder patch) of ``lora`` for these models.

    Entries for a component that is not given (``unet`` or ``text_encoders`` None) are skipped; entries that
    match no module of the given models raise :class:`LoraFormatError` naming the file and a few keys.
    """
    if any(settings.get("use_dora") for settings in lora.peft_alphas.values()):
        raise LoraFormatError(f"{lora.label} is a DoRA LoRA; only plain LoRA is supported headless")
    tables = ModuleTables.build(unet, text_encoders)
    unet_deltas: dict[str, list[LowRankDelta]] = {}
    text_deltas: dict[str, list[LowRankDelta]] = {}
    unmatched = []
    for entry in lora.entries:
        located = tables.locate(entry.stem)
        if located is None:
            if not _skipped_component(entry.stem, unet is not None, text_encoders is not None):
                unmatched.append(entry.stem)
            continue
        component, module = located
        strength = strength_model if component == "unet" else strength_clip
        delta = LowRankDelta(entry.up.float(), entry.down.float(), _scale(entry, component, module, lora.peft_alphas),
                             strength)
        if component == "unet":
            unet_deltas.setdefault(module, []).append(delta)
        else:
            text_deltas.setdefault(f"{component}.{module}", []).append(delta)
    if unmatched:
        raise LoraFormatError(
            f"{lora.label}: {len(unmatched)} of its {len(lora.entries)} entries match no module of the model "
            f"(e.g. {unmatched[:4]}); it was made for another model family (SD1.5 vs SDXL) or another architecture")
    return WeightPatch(unet_deltas, f"{lora.label} (model)"), WeightPatch(text_deltas, f"{lora.label} (clip)")


def _skipped_component(stem: str, have_unet: bool, have_text: bool) -> bool:
    """Whether an unmatched entry belongs to a component the caller did not give (so it is not an error)."""
    is_text = stem.startswith(("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2."))
    return (is_text and not have_text) or (not is_text and not have_unet)


_CACHE: dict[tuple[str, float, int], LoraFile] = {}


def load_lora_file(path: str | os.PathLike) -> LoraFile:
    """:func:`read_lora`, cached per process by path, modification time and size (the last file only)."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_mtime, stat.st_size)
    if key not in _CACHE:
        _CACHE.clear()  # LoRA files are small to re-read; keep at most one in memory
        _CACHE[key] = read_lora(path)
    return _CACHE[key]
