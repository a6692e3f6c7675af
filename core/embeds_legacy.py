"""Pickled embeds files: the existing pack's ``.ipadpt`` and diffusers' ``prepare_ip_adapter_image_embeds``.

* ``.ipadpt`` files of ComfyUI_IPAdapter_plus are ``torch.save`` pickles.  Its first version
  (before 2024-03) saved ``stack([cond, uncond])`` (``[2, N, E]`` or ``[2, N, 257, H]``, cond *first*);
  the current version saves one EMBEDS socket, i.e. a single side ``[N, E]`` / ``[N, 257, H]`` (its
  Encoder has separate pos/neg outputs).  A single side loads as cond with a zero uncond and
  ``uncond_known=False``, so a node can build the pack's uncond (a black image's features) itself;
* diffusers' ``prepare_ip_adapter_image_embeds`` output saved with ``torch.save``: a list with one
  tensor per adapter, or one tensor, each ``[2B, n, ...]`` with the uncond half *first*.

Pickles are only ever read with ``torch.load(weights_only=True)``; one that asks to import or call
anything but torch's tensor rebuilders is refused, never executed (its opcodes are scanned, not run, to
name what it asks for).

Telling ``[cond, uncond]`` (pack v1) from ``[uncond, cond]`` (diffusers) in a bare ``[2, ...]`` tensor:
``layout="auto"`` looks at the content first (the half that is all zeros, or whose rows are all the
same encoding of one blank image, is the uncond); when the content does not tell, a list is read as
diffusers' and a bare tensor as the pack's.  Pass ``layout=`` to decide explicitly.
"""
from __future__ import annotations

import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from .embeds import Embeds
from .embeds_file import FACE_WIDTH, EmbedsFile, EmbedsFileError

# Globals torch.save itself writes; any other global in a refused pickle means code would run.
_TORCH_GLOBAL = re.compile(r"^(torch\.|collections\.OrderedDict$|builtins\.(set|frozenset|slice|bytearray)$)")


def read_pickled_embeds(path: Path, layout: str, index: int | None, feature: str | None) -> EmbedsFile:
    """Read a ``torch.save`` embeds file (see the module docstring); ``core.embeds_io.read_embeds_file``
    explains the arguments.  Raises :class:`EmbedsFileError` naming the file."""
    return _from_object(_torch_load(path), path, layout, index, feature)


# ------------------------------------------------------------------------------------------ safe loading
def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        code = _code_globals(path, str(error))
        if code:
            raise EmbedsFileError(
                f"refused to load embeds file '{path.name}': loading it would execute code (it asks to import "
                f"and call {', '.join(repr(c) for c in code[:3])}), so it is refused. Embeds files hold only "
                f"tensors; save them again with IPAdapterSaveEmbeds (.safetensors)") from error
        raise EmbedsFileError(
            f"embeds file '{path.name}' cannot be read by the safe (weights-only) loader "
            f"({_weights_only_detail(str(error))}); it is corrupt or holds more than tensors") from error
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        detail = (str(error).splitlines() or [type(error).__name__])[0].split(". ")[0]
        raise EmbedsFileError(f"embeds file '{path.name}' is truncated or corrupt ({detail}); "
                              f"save or copy it again") from error


def _weights_only_detail(text: str) -> str:
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    return found.group(1).strip() if found else "unsupported content"


def _code_globals(path: Path, message: str) -> list[str]:
    """Names of non-torch globals a refused pickle would import (read by scanning opcodes, never run)."""
    found: list[str] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                data = archive.read(name) if name else b""
        else:
            data = path.read_bytes()
        found += _pickle_globals(data)
    except (OSError, zipfile.BadZipFile, KeyError):
        pass
    found = found or re.findall(r"Unsupported global: GLOBAL (\S+)", message)
    found = [re.sub(r"^__builtin__\.", "builtins.", name) for name in found]  # protocol 2 spells it so
    return [name for name in dict.fromkeys(found) if not _TORCH_GLOBAL.match(name)]


def _pickle_globals(data: bytes) -> list[str]:
    """Module-qualified names a pickle's GLOBAL/STACK_GLOBAL/INST opcodes refer to (best effort)."""
    names: list[str] = []
    strings: list[str] = []
    memo: dict[int, Any] = {}
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("GLOBAL", "INST"):
                names.append(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL":
                names.append(".".join(strings[-2:]) if len(strings) >= 2 else "<unknown>")
            elif opcode.name == "MEMOIZE":
                memo[len(memo)] = strings[-1] if strings else None
            elif opcode.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[int(arg)] = strings[-1] if strings else None
            elif opcode.name in ("BINGET", "LONG_BINGET", "GET") and isinstance(memo.get(int(arg)), str):
                strings.append(memo[int(arg)])
            elif isinstance(arg, str):  # the string opcodes that push a module or attribute name
                strings.append(arg)
    except Exception:  # a truncated pickle: keep what was read
        pass
    return names


# ------------------------------------------------------------------------------------------ legacy layouts
def _from_object(obj: Any, path: Path, layout: str, index: int | None, feature: str | None) -> EmbedsFile:
    if layout == "ipadapter_nodes":
        raise EmbedsFileError(f"embeds file '{path.name}' is a torch.save file, not our .safetensors format")
    container = "tensor"
    if isinstance(obj, (list, tuple)):
        container = "list"
        if not obj or not all(isinstance(t, torch.Tensor) for t in obj):
            raise EmbedsFileError(f"embeds file '{path.name}' holds a list that is not a list of tensors "
                                  f"(diffusers' ip_adapter_image_embeds layout has one tensor per adapter)")
        if len(obj) > 1 and index is None:
            shapes = ", ".join(f"{i}: {list(t.shape)}" for i, t in enumerate(obj))
            raise EmbedsFileError(f"embeds file '{path.name}' holds embeds for {len(obj)} IP-Adapters ({shapes}); "
                                  f"say which one to load (index 0..{len(obj) - 1})")
        position = 0 if index is None else index
        if not -len(obj) <= position < len(obj):
            raise EmbedsFileError(f"embeds file '{path.name}' holds {len(obj)} adapters' embeds; index {index} "
                                  f"is out of range")
        obj = obj[position]
    if not isinstance(obj, torch.Tensor):
        raise EmbedsFileError(f"embeds file '{path.name}' holds a {type(obj).__name__}, not a tensor or a list of "
                              f"tensors; it is not an IP-Adapter embeds file")
    try:
        return _from_tensor(obj, container, layout, feature)
    except ValueError as error:
        raise EmbedsFileError(f"embeds file '{path.name}' (tensor {list(obj.shape)}): {error}") from error


def _is_token_count(n: int) -> bool:
    """CLIP hidden states have k*k patch tokens plus a class token (50, 197, 257, 577, ...)."""
    root = int(round((n - 1) ** 0.5)) if n > 1 else 0
    return root >= 7 and root * root + 1 == n


def _from_tensor(t: torch.Tensor, container: str, layout: str, feature: str | None) -> EmbedsFile:
    single = t.dim() == 2 or (t.dim() == 3 and _is_token_count(t.shape[1]))
    if layout == "ipadapter_plus" or (layout == "auto" and single):
        if t.dim() not in (2, 3):
            raise ValueError("a single-side embeds tensor must be [N, E] or [N, tokens, H]")
        side_feature = _feature_of(t, feature)
        return EmbedsFile(Embeds(t, torch.zeros_like(t), side_feature), "ipadapter_plus", uncond_known=False)
    if t.dim() not in (3, 4) or t.shape[0] % 2:
        raise ValueError("expected a stacked [2B, n, E] or [2B, n, tokens, H] tensor (an even first dimension)")
    half = t.shape[0] // 2
    first, second = _one_copy(t[:half]), _one_copy(t[half:])
    if layout == "auto":
        layout = _guess_order(first, second, container, t.shape[0])
    if layout == "ipadapter_plus_v1" and t.shape[0] != 2:
        raise ValueError("the pack's first version stacked exactly [cond, uncond] (first dimension 2)")
    cond, uncond = (second, first) if layout == "diffusers" else (first, second)
    if cond.dim() == 3 and cond.shape[1] == 1 and cond.shape[2] == FACE_WIDTH:  # diffusers' [2, n, 1, 512]
        cond, uncond = cond[:, 0], uncond[:, 0]
    return EmbedsFile(Embeds(cond, uncond, _feature_of(cond, feature)), layout)


def _one_copy(side: torch.Tensor) -> torch.Tensor:
    """diffusers repeats the same images for every prompt of the batch: keep one copy [n, ...]."""
    if side.shape[0] > 1 and not all(torch.equal(side[0], side[i]) for i in range(1, side.shape[0])):
        raise ValueError(f"the {side.shape[0]} prompt copies of each half differ; per-prompt reference images are "
                         f"not supported (diffusers applies one set to every prompt); save one set [2, n, ...]")
    return side[0]


def _uncond_like(side: torch.Tensor) -> bool:
    """All zeros, or every row the same (one blank image's encoding repeated): what an uncond looks like."""
    if not bool(side.any()):
        return True
    return side.shape[0] > 1 and all(torch.equal(side[0], side[i]) for i in range(1, side.shape[0]))


def _guess_order(first: torch.Tensor, second: torch.Tensor, container: str, rows: int) -> str:
    first_u, second_u = _uncond_like(first), _uncond_like(second)
    if first_u and not second_u:
        return "diffusers"
    if second_u and not first_u:
        return "ipadapter_plus_v1"
    # The content does not tell: the pack's v1 only ever saved one bare [2, ...] tensor.
    return "ipadapter_plus_v1" if container == "tensor" and rows == 2 else "diffusers"


def _feature_of(side: torch.Tensor, feature: str | None) -> str:
    guessed = "hidden_states" if side.dim() == 3 else ("face" if side.shape[-1] == FACE_WIDTH else "image_embeds")
    if feature is None:
        return guessed
    if (feature == "hidden_states") != (side.dim() == 3):
        raise ValueError(f"feature {feature!r} does not fit per-side shape {list(side.shape)} "
                         f"(hidden_states are [N, tokens, H]; image_embeds and face are [N, E])")
    return feature
