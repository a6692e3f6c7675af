"""Reading IP-Adapter checkpoint files into the two-part state dict every loader uses.

An IP-Adapter file holds two parts (see the formats reference):

* ``image_proj``: the state dict of the projection module (image features -> IP tokens);
* ``ip_adapter``: the per-attention-layer weights, keyed ``"{N}.to_k_ip.weight"`` etc., where N is the
  position of the layer in the UNet's attention-processor order (FaceID files add LoRA tensors).

Two containers exist: a ``.safetensors`` file with one flat namespace (``image_proj.<key>``,
``ip_adapter.<key>``), and a ``torch.save`` pickle (``.bin``/``.pt``/``.pth``/``.ckpt``) holding the
nested dict ``{"image_proj": {...}, "ip_adapter": {...}}``. Training checkpoints name the parts
``image_proj_model`` and ``adapter_modules``; both spellings are accepted in both containers.

The container is recognised from the file's first bytes (a renamed file still loads); pickles are only
ever read with ``torch.load(weights_only=True)``, which refuses anything but tensors and plain
containers. Tensors come back exactly as stored (fp16, bf16 and fp32 parts may be mixed); casting is the
loader's job (``core/adapter.py``).
"""
from __future__ import annotations

import os
import pickle
import re
import struct
from pathlib import Path
from typing import Mapping

import torch

IMAGE_PROJ = "image_proj"
IP_ADAPTER = "ip_adapter"
# Every spelling of the two parts, as a top-level dict key or as a flat-key prefix.
PART_NAMES = {
    "image_proj": IMAGE_PROJ,
    "image_proj_model": IMAGE_PROJ,  # training checkpoints (tutorial_train*.py)
    "ip_adapter": IP_ADAPTER,
    "adapter_modules": IP_ADAPTER,
}
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")

StateDict = dict[str, dict[str, torch.Tensor]]

# safetensors dtype names -> torch dtypes, for reading shapes without reading data.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class ModelFileError(ValueError):
    """A model file is unreadable (truncated, corrupt) or unsafe (a pickle that would run code)."""


class AdapterFileError(ModelFileError):
    """An IP-Adapter file is missing, unreadable, unsafe or not an IP-Adapter; the message names the file."""


def load_state_dict(path: str | os.PathLike) -> StateDict:
    """Read an IP-Adapter file into ``{"image_proj": {...}, "ip_adapter": {...}}`` (tensors as stored).

    Raises :class:`AdapterFileError` for a missing file, a truncated or corrupt file, a pickle that holds
    anything but tensors (it is refused, never executed), a non-dict, or a dict with neither part.
    """
    path = Path(path)
    container = _container_of(path)
    if container == "safetensors":
        flat = _read_safetensors(path, meta=False)
        return _split_flat(flat, path)
    return _parts_from_object(_read_torch(path, mmap=False), path)


def read_layout(path: str | os.PathLike) -> StateDict:
    """Like :func:`load_state_dict`, but every tensor is an empty tensor on the ``meta`` device.

    Only key names, shapes and dtypes are read (a safetensors header, or a memory-mapped pickle), so
    describing a 1.5 GB file costs milliseconds. Detection (``core.adapter.detect``) works on the result.
    """
    path = Path(path)
    container = _container_of(path)
    if container == "safetensors":
        return _split_flat(_read_safetensors(path, meta=True), path)
    parts = _parts_from_object(_read_torch(path, mmap=True), path)
    return {part: {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in sd.items()}
            for part, sd in parts.items()}


# ----------------------------------------------------------------------------------------------------
# containers


def _container_of(path: Path) -> str:
    """``"safetensors"`` or ``"torch"``, from the first bytes (the suffix only breaks ties)."""
    if not path.exists():
        raise AdapterFileError(f"IP-Adapter file '{path}' does not exist; check the name and the folder")
    if not path.is_file():
        raise AdapterFileError(f"IP-Adapter path '{path}' is not a file")
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head[:4] == b"PK\x03\x04":  # torch.save's zip container
        return "torch"
    if head[:1] == b"\x80":  # a bare pickle (torch.save's legacy format starts with a pickle protocol byte)
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: u64 header length, then a JSON header
        return "safetensors"
    if path.suffix.lower() in TORCH_SUFFIXES:
        return "torch"
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return "safetensors"
    raise AdapterFileError(
        f"IP-Adapter file '{path.name}' is neither a .safetensors file nor a torch checkpoint "
        f"(first bytes {head[:8]!r}); it may be corrupt or not a model file"
    )


def _read_safetensors(path: Path, meta: bool) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    check_safetensors_file(path, "IP-Adapter file", AdapterFileError)
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                if meta:
                    piece = handle.get_slice(key)
                    dtype = _SAFETENSORS_DTYPES.get(piece.get_dtype(), torch.float32)
                    tensors[key] = torch.empty(piece.get_shape(), dtype=dtype, device="meta")
                else:
                    tensors[key] = handle.get_tensor(key)
        return tensors
    except AdapterFileError:
        raise
    except Exception as error:  # safetensors raises its own (Rust) error type for every corruption
        raise AdapterFileError(
            f"IP-Adapter file '{path.name}' is not a readable safetensors file ({error}); it is probably "
            f"truncated (an interrupted download) or corrupt: download it again"
        ) from error


def check_safetensors_file(path: str | os.PathLike, what: str = "model file",
                           error: type[Exception] = ModelFileError) -> None:
    """Refuse a cut-off or corrupt ``.safetensors`` file before its reader does, with a message that names
    the file (``what 'name'``), what its header promised and what was found.

    Compares the size the header promises with the file size, so a cut-off download is named as such.
    """
    import json

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise error(f"{what} '{path.name}' is empty or cut off ({size} bytes); download it again")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise error(
                f"{what} '{path.name}' is truncated or corrupt: its safetensors header claims "
                f"{header_len} bytes but the file has {size}; download it again"
            )
        try:
            header = json.loads(handle.read(header_len))
        except ValueError as exc:
            raise error(
                f"{what} '{path.name}' has a corrupt safetensors header ({exc}); download it again"
            ) from exc
    if not isinstance(header, dict):
        raise error(f"{what} '{path.name}' has a corrupt safetensors header (a JSON "
                    f"{type(header).__name__}, expected an object); download it again")
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2 and isinstance(entry["data_offsets"][1], int)]
    needed = 8 + header_len + max(ends, default=0)
    if needed > size:
        raise error(
            f"{what} '{path.name}' is truncated: the safetensors header describes {needed} bytes "
            f"but the file has only {size}; it was probably cut off while downloading, download it again"
        )


def read_safetensors(path: str | os.PathLike, what: str = "model file",
                     error: type[Exception] = ModelFileError) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, string metadata) of a ``.safetensors`` file; any damage raises ``error`` naming the file."""
    from safetensors import safe_open

    path = Path(path)
    check_safetensors_file(path, what, error)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
    except Exception as exc:  # safetensors raises its own (Rust) error type for every corruption
        raise error(f"{what} '{path.name}' is not a readable safetensors file ({exc}); it is probably "
                    f"truncated or corrupt: download it again") from exc


def load_torch_weights(path: str | os.PathLike, what: str = "model file",
                       error: type[Exception] = ModelFileError) -> object:
    """``torch.load(weights_only=True)`` of a pickled checkpoint; a pickle that would import or call code is
    refused (never run) and any damage raises ``error`` naming the file and what to do."""
    return _read_torch(Path(path), mmap=False, what=what, error=error)


def _weights_only_detail(text: str) -> str:
    found = re.search(r"WeightsUnpickler error: \s*([^\n]+)", text)
    return found.group(1).strip() if found else "unsupported content"


def _read_torch(path: Path, mmap: bool, what: str = "IP-Adapter file",
                error: type[Exception] = AdapterFileError) -> object:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as exc:
            if mmap and "mmap" in str(exc):  # legacy (non-zip) pickles cannot be memory-mapped
                return torch.load(path, map_location="cpu", weights_only=True)
            raise
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "weights only load failed" in text.lower():
            found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            if found:
                raise error(
                    f"refusing to unpickle {what} '{path.name}': it asks to run Python code "
                    f"('{found.group(1)}'), not just to load tensors. Use a .safetensors copy of this file, "
                    f"or convert it to .safetensors on a machine where you trust the file"
                ) from exc
            raise error(
                f"refusing to unpickle {what} '{path.name}': the safe (weights-only) loader cannot read "
                f"it ({_weights_only_detail(text)}). It is corrupt, or a pickle holding more than tensors; "
                f"download it again or convert it to .safetensors"
            ) from exc
        raise error(
            f"{what} '{path.name}' is not a readable torch checkpoint ({exc}); it is probably "
            f"corrupt or truncated: download it again"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise error(
            f"{what} '{path.name}' is not a readable torch checkpoint ({exc}); it is probably "
            f"corrupt or truncated: download it again"
        ) from exc


# ----------------------------------------------------------------------------------------------------
# parts


def _split_flat(flat: Mapping[str, torch.Tensor], path: Path) -> StateDict:
    """Split flat ``"<part>.<key>"`` names into the two parts; other keys are ignored."""
    parts: StateDict = {IMAGE_PROJ: {}, IP_ADAPTER: {}}
    for key, value in flat.items():
        prefix, _, rest = key.partition(".")
        if prefix in PART_NAMES and rest:
            parts[PART_NAMES[prefix]][rest] = value
    if not parts[IMAGE_PROJ] and not parts[IP_ADAPTER]:
        raise AdapterFileError(_not_an_adapter_message(path, list(flat)))
    return parts


def _parts_from_object(obj: object, path: Path) -> StateDict:
    """Accept the nested form, a flat form with part prefixes, or the training-prefix spellings."""
    if not isinstance(obj, Mapping):
        raise AdapterFileError(
            f"IP-Adapter file '{path.name}' holds a {type(obj).__name__}, not a dict of weights; "
            f"expected {{'image_proj': {{...}}, 'ip_adapter': {{...}}}}"
        )
    parts: StateDict = {IMAGE_PROJ: {}, IP_ADAPTER: {}}
    flat: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        key = str(key)
        if key in PART_NAMES and isinstance(value, Mapping):
            parts[PART_NAMES[key]].update({str(k): v for k, v in value.items()})
        elif isinstance(value, torch.Tensor):
            flat[key] = value
    if flat and not parts[IMAGE_PROJ] and not parts[IP_ADAPTER]:
        try:
            parts = _split_flat(flat, path)
        except AdapterFileError:
            raise AdapterFileError(_not_an_adapter_message(path, list(obj))) from None
    if not parts[IMAGE_PROJ] and not parts[IP_ADAPTER]:
        raise AdapterFileError(_not_an_adapter_message(path, list(obj)))
    for part, sd in parts.items():
        bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise AdapterFileError(
                f"IP-Adapter file '{path.name}': '{part}' should hold only tensors, but "
                f"{', '.join(bad[:5])} {'is' if len(bad) == 1 else 'are'} not"
            )
    return parts


def _not_an_adapter_message(path: Path, keys: list) -> str:
    shown = ", ".join(repr(str(k)) for k in keys[:8]) + (f", ... ({len(keys)} keys)" if len(keys) > 8 else "")
    return (
        f"'{path.name}' is not an IP-Adapter: it has neither 'image_proj' nor 'ip_adapter' weights. "
        f"Found top-level keys: {shown or 'none'}. {_guess_what_it_is([str(k) for k in keys])}"
        f"Put IP-Adapter files in the 'ipadapter' folder and other models in their own folders."
    ).rstrip()


def _guess_what_it_is(keys: list[str]) -> str:
    """A hint for the common mix-ups (a LoRA, a full checkpoint, an image encoder in the wrong folder)."""
    joined = " ".join(keys[:200])
    if "lora" in joined.lower():
        return "This looks like a LoRA. "
    if "model.diffusion_model." in joined or "state_dict" in keys or "down_blocks." in joined:
        return "This looks like a Stable Diffusion checkpoint or UNet. "
    if "vision_model." in joined or "visual." in joined:
        return "This looks like a CLIP vision encoder (it belongs in 'clip_vision'). "
    return ""
