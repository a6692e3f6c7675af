"""Embeds files: writing our ``.safetensors`` embeds files and reading them and the legacy layouts back.

What we write is one ``.safetensors`` file holding ``cond`` and ``uncond`` (and, for FaceID-Plus,
``clip_cond``/``clip_uncond``) exactly as they are (dtype and bits), with string metadata naming the
format, its version, the feature, the encoder width and the row count.  A file is never overwritten:
bytes go to a hidden temporary file in the target folder, which is then linked to the final name only if
that name is still free; nothing is left behind on any error, KeyboardInterrupt included.

What we read (the container is recognised from the first bytes, not the suffix): our ``.safetensors``
files here, and the ``torch.save`` pickles of the existing pack (``.ipadpt``) and of diffusers in
``core.embeds_legacy``, which says how their layouts are told apart and how unsafe pickles are refused.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from . import files
from .embeds import Embeds
from .embeds_file import FACE_WIDTH, FEATURES, LAYOUTS, EmbedsFile, EmbedsFileError
from .embeds_legacy import read_pickled_embeds

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "next_free_path", "save_embeds", "save_embeds_numbered", "load_embeds",
    "read_embeds_file",
    # re-exported from core.embeds_file, where they live
    "FACE_WIDTH", "FEATURES", "LAYOUTS", "EmbedsFile", "EmbedsFileError",
]

FORMAT_NAME = "ipadapter_nodes.embeds"
FORMAT_VERSION = 1
_RESERVED_METADATA = ("format", "format_version", "feature", "count", "encoder_width", "face_width",
                      "tokens", "has_clip", "dtype")


# ------------------------------------------------------------------------------------------------ writing
def next_free_path(folder: str | os.PathLike, prefix: str, ext: str = ".safetensors") -> Path:
    """The next ``<prefix>_%05d_<ext>`` in ``folder``, numbered after the highest counter already there.

    As ComfyUI's save nodes: ``prefix`` may name sub-folders (``"embeds/IP_embeds"``), which are created;
    one that leaves ``folder`` raises :class:`core.folders.PathOutsideFolderError`.
    """
    target, _, base, counter = files.numbered_target(
        folder, prefix,
        outside=lambda given: (f"filename_prefix '{given}' points outside the output folder '{folder}'; use a "
                               f"name relative to it without '..' or an absolute path, e.g. 'embeds/IP_embeds'"))
    return target / f"{base}_{counter:05d}_{ext}"


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
    try:
        files.write_new(final, lambda handle: _write_all(handle, data))
    except FileExistsError:
        raise FileExistsError(f"embeds file '{final}' already exists and is never overwritten") from None


# ------------------------------------------------------------------------------------------------ reading
def load_embeds(path: str | os.PathLike, *, layout: str = "auto", index: int | None = None,
                feature: str | None = None) -> Embeds:
    """The Embeds in an embeds file (ours, the pack's ``.ipadpt``, or diffusers' layout); see
    :func:`read_embeds_file` for the arguments and errors."""
    return read_embeds_file(path, layout=layout, index=index, feature=feature).embeds


def read_embeds_file(path: str | os.PathLike, *, layout: str = "auto", index: int | None = None,
                     feature: str | None = None) -> EmbedsFile:
    """Read an embeds file into an :class:`EmbedsFile`.

    ``layout``: one of :data:`LAYOUTS` (``"auto"`` decides as ``core.embeds_legacy`` explains).  ``index``
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
        return read_pickled_embeds(path, layout, index, feature)
    if path.suffix.lower() in (".safetensors", ".sft"):  # name the damage precisely (cut off, bad header)
        from .checkpoint import check_safetensors_file

        check_safetensors_file(path, "embeds file", EmbedsFileError)
    raise EmbedsFileError(f"embeds file '{path.name}' is empty or neither a .safetensors file nor a torch.save "
                          f"file (first bytes {head[:8]!r}); it is corrupt or not an embeds file: save the "
                          f"embeds again")


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
