"""Embeds files: writing our ``.safetensors`` embeds files and reading them and the legacy layouts back.

What we write is one ``.safetensors`` file holding ``cond`` and ``uncond`` (and, for FaceID-Plus,
``clip_cond``/``clip_uncond``) exactly as they are (dtype and bits), with string metadata naming the
format, its version, the feature, the encoder width and the row count.  A file is never overwritten:
bytes go to a hidden temporary file in the target folder, which is then linked to the final name only if
that name is still free; nothing is left behind on any error, KeyboardInterrupt included.

What we read (the container is recognised from the first bytes, not the suffix):

* our ``.safetensors`` files;
* ``.ipadpt`` files of ComfyUI_IPAdapter_plus, which are ``torch.save`` pickles.  Its first version
  (before 2024-03) saved ``stack([cond, uncond])`` (``[2, N, E]`` or ``[2, N, 257, H]``, cond *first*);
  the current version saves one EMBEDS socket, i.e. a single side ``[N, E]`` / ``[N, 257, H]`` (its
  Encoder has separate pos/neg outputs).  A single side loads as cond with a zero uncond and
  ``uncond_known=False``, so a node can build the pack's uncond (a black image's features) itself;
* diffusers' ``prepare_ip_adapter_image_embeds`` output saved with ``torch.save``: a list with one
  tensor per adapter, or one tensor, each ``[2B, n, ...]`` with the uncond half *first*.

Pickles are only ever read with ``torch.load(weights_only=True)``; one that asks to import or call
anything but torch's tensor rebuilders is refused, never executed.

Telling ``[cond, uncond]`` (pack v1) from ``[uncond, cond]`` (diffusers) in a bare ``[2, ...]`` tensor:
``layout="auto"`` looks at the content first (the half that is all zeros, or whose rows are all the
same encoding of one blank image, is the uncond); when the content does not tell, a list is read as
diffusers' and a bare tensor as the pack's.  Pass ``layout=`` to decide explicitly.
"""
from __future__ import annotations

import os
import pickle
import pickletools
import re
import secrets
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from . import folders
from .embeds import Embeds

FORMAT_NAME = "ipadapter_nodes.embeds"
FORMAT_VERSION = 1
FEATURES = ("image_embeds", "hidden_states", "face")
LAYOUTS = ("auto", "ipadapter_nodes", "diffusers", "ipadapter_plus_v1", "ipadapter_plus")
FACE_WIDTH = 512  # insightface embeddings; no CLIP encoder an IP-Adapter uses is 512 wide
_RESERVED_METADATA = ("format", "format_version", "feature", "count", "encoder_width", "face_width",
                      "tokens", "has_clip", "dtype")
# Globals torch.save itself writes; any other global in a refused pickle means code would run.
_TORCH_GLOBAL = re.compile(r"^(torch\.|collections\.OrderedDict$|builtins\.(set|frozenset|slice|bytearray)$)")


class EmbedsFileError(ValueError):
    """An embeds file is missing, unreadable, corrupt, unsafe or not embeds; the message names the file."""


@dataclass(frozen=True)
class EmbedsFile:
    """What :func:`read_embeds_file` found: the Embeds, the layout it was read as, whether the file held
    an uncond side (False for the pack's single-side files; ``embeds.uncond`` is then zeros) and the
    string metadata (ours only)."""

    embeds: Embeds
    layout: str
    uncond_known: bool = True
    metadata: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ writing
def next_free_path(folder: str | os.PathLike, prefix: str, ext: str = ".safetensors") -> Path:
    """The next ``<prefix>_%05d_<ext>`` in ``folder``, numbered after the highest counter already there.

    As ComfyUI's save nodes: ``prefix`` may name sub-folders (``"embeds/IP_embeds"``), which are created;
    one that leaves ``folder`` raises :class:`core.folders.PathOutsideFolderError`.
    """
    prefix = prefix.replace("\\", "/")
    subfolder, _, base = prefix.rpartition("/")
    if not base:
        raise ValueError(f"filename_prefix '{prefix}' has no file name part; give e.g. 'IP_embeds'")
    if os.path.isabs(prefix):
        raise folders.PathOutsideFolderError(
            f"filename_prefix '{prefix}' is absolute; use a name relative to the output folder '{folder}'")
    target = folders.resolve_inside(folder, subfolder or ".", what="filename_prefix")
    target.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(re.escape(base) + r"_(\d+)_")
    counters = [int(m.group(1)) for entry in os.scandir(target) if (m := pattern.match(entry.name))]
    return target / f"{base}_{max(counters, default=0) + 1:05d}_{ext}"


def save_embeds(embeds: Embeds, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``embeds`` to a new ``.safetensors`` file at ``path`` and return the path.

    Never overwrites: an existing ``path`` raises FileExistsError (pick a name with :func:`next_free_path`
    or use :func:`save_embeds_numbered`).  ``metadata`` adds string entries (e.g. the adapter's name);
    the format's own keys cannot be overridden.  Written atomically; on any error the folder is unchanged.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"embeds file '{path}' already exists and is never overwritten; choose another "
                              f"name (the Save Embeds node numbers its files <prefix>_00001_ onward)")
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_new(path, _serialize(embeds, metadata))
    return path


def save_embeds_numbered(embeds: Embeds, folder: str | os.PathLike, prefix: str,
                         metadata: Mapping[str, str] | None = None) -> Path:
    """Save under the next free ``<prefix>_%05d_.safetensors`` in ``folder`` (retrying if a concurrent
    writer takes that name first) and return the path."""
    for _ in range(100):  # another writer may take each free name first; a few retries suffice
        try:
            return save_embeds(embeds, next_free_path(folder, prefix), metadata)
        except FileExistsError:
            continue
    raise FileExistsError(f"could not find a free '{prefix}_NNNNN_' name in '{folder}' after 100 tries")


def _serialize(embeds: Embeds, extra: Mapping[str, str] | None) -> bytes:
    from safetensors.torch import save

    if embeds.feature not in FEATURES:
        raise ValueError(f"Embeds feature {embeds.feature!r} is not one of {list(FEATURES)}")
    # safetensors wants contiguous tensors that share no storage (fit_rows gives expanded views).
    tensors = {"cond": embeds.cond, "uncond": embeds.uncond}
    if embeds.clip_cond is not None:
        tensors.update(clip_cond=embeds.clip_cond, clip_uncond=embeds.clip_uncond)
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    clip = embeds.clip_cond if embeds.clip_cond is not None else (None if embeds.feature == "face" else embeds.cond)
    meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "feature": embeds.feature,
            "count": str(embeds.count), "has_clip": str(embeds.clip_cond is not None).lower(),
            "dtype": str(embeds.cond.dtype).removeprefix("torch.")}
    if clip is not None:
        meta["encoder_width"] = str(clip.shape[-1])
        if clip.dim() == 3:
            meta["tokens"] = str(clip.shape[1])
    if embeds.feature == "face":
        meta["face_width"] = str(embeds.cond.shape[-1])
    for key, value in (extra or {}).items():
        if key in _RESERVED_METADATA:
            raise ValueError(f"metadata key {key!r} is reserved by the embeds format; use another name")
        meta[str(key)] = str(value)
    return save(tensors, metadata=meta)


def _write_all(handle: Any, data: bytes) -> None:
    """Write ``data`` in chunks (a separate step so tests can interrupt a write half-way)."""
    view = memoryview(data)
    for start in range(0, len(view), 1 << 20):
        handle.write(view[start:start + (1 << 20)])


def _write_new(final: Path, data: bytes) -> None:
    temp = final.parent / f".{final.name}.{secrets.token_hex(6)}.part"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            _write_all(handle, data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            try:
                os.link(temp, final)  # fails if the name was taken meanwhile: never overwrites
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: reserve the name exclusively, then replace it
                os.close(os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                try:
                    os.replace(temp, final)
                except BaseException:
                    final.unlink(missing_ok=True)
                    raise
        except FileExistsError:
            raise FileExistsError(f"embeds file '{final}' already exists and is never overwritten") from None
    finally:
        temp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ reading
def load_embeds(path: str | os.PathLike, *, layout: str = "auto", index: int | None = None,
                feature: str | None = None) -> Embeds:
    """The Embeds in an embeds file (ours, the pack's ``.ipadpt``, or diffusers' layout); see
    :func:`read_embeds_file` for the arguments and errors."""
    return read_embeds_file(path, layout=layout, index=index, feature=feature).embeds


def read_embeds_file(path: str | os.PathLike, *, layout: str = "auto", index: int | None = None,
                     feature: str | None = None) -> EmbedsFile:
    """Read an embeds file into an :class:`EmbedsFile`.

    ``layout``: one of :data:`LAYOUTS` (``"auto"`` decides as the module docstring says).  ``index``
    picks one adapter's tensor from a diffusers list holding several.  ``feature`` overrides the feature
    a legacy file's shapes suggest (2-D per side: ``image_embeds``, or ``face`` when 512 wide; 3-D:
    ``hidden_states``).  Raises :class:`EmbedsFileError` naming the file for a missing, truncated or
    corrupt file, a pickle that would run code (refused), or content in none of the known layouts.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"embeds layout {layout!r} is not known; expected one of {list(LAYOUTS)}")
    if feature is not None and feature not in FEATURES:
        raise ValueError(f"embeds feature {feature!r} is not known; expected one of {list(FEATURES)}")
    path = Path(path)
    if not path.is_file():
        raise EmbedsFileError(f"embeds file '{path}' does not exist or is not a file; check the name and folder")
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: u64 header length, then a JSON header
        return _read_ours(path)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save zip, or a bare pickle
        return _from_object(_torch_load(path), path, layout, index, feature)
    raise EmbedsFileError(f"embeds file '{path.name}' is empty or neither a .safetensors file nor a torch.save "
                          f"file (first bytes {head[:8]!r}); it is corrupt or not an embeds file")


def _read_ours(path: Path) -> EmbedsFile:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            meta = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error type for every corruption
        raise EmbedsFileError(f"embeds file '{path.name}' is not a readable safetensors file ({error}); it is "
                              f"probably truncated or corrupt: save the embeds again") from error
    if meta.get("format") != FORMAT_NAME:
        raise EmbedsFileError(f"'{path.name}' is a safetensors file but not an IP-Adapter embeds file (metadata "
                              f"format={meta.get('format')!r}, tensors {sorted(tensors)}); expected format "
                              f"{FORMAT_NAME!r} as written by IPAdapterSaveEmbeds")
    version = int(meta.get("format_version", "0") or 0)
    if version > FORMAT_VERSION:
        raise EmbedsFileError(f"embeds file '{path.name}' has format version {version}, newer than this pack "
                              f"reads ({FORMAT_VERSION}); update the node pack")
    missing = [k for k in ("cond", "uncond") if k not in tensors]
    if meta.get("has_clip") == "true":
        missing += [k for k in ("clip_cond", "clip_uncond") if k not in tensors]
    if missing or meta.get("feature") not in FEATURES:
        raise EmbedsFileError(f"embeds file '{path.name}' is incomplete: missing tensors {missing}, feature "
                              f"{meta.get('feature')!r}; save the embeds again")
    try:
        embeds = Embeds(tensors["cond"], tensors["uncond"], meta["feature"],
                        tensors.get("clip_cond"), tensors.get("clip_uncond"))
    except ValueError as error:
        raise EmbedsFileError(f"embeds file '{path.name}' is inconsistent: {error}") from error
    return EmbedsFile(embeds, "ipadapter_nodes", True, meta)


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
