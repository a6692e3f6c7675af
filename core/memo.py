"""Memoized encoder outputs: CLIP vision features and face analyses, keyed by what they are computed from.

Re-running a workflow after changing only a weight, a start/end or a weight type re-executes the apply node,
which would encode the same reference images again.  The encoders are by far the most expensive part of an
apply, so their outputs are kept here, keyed by

* the image content: a hash of the tensor's bytes plus its shape and dtype (:func:`tensor_key`), so a
  reloaded image with the same pixels hits and any changed pixel misses;
* the encoder: its file (real path + modification time + dtype/device) when it came from one, else the
  object itself (:func:`encoder_key`, a token that dies with the object, never a reused ``id``);
* the preprocessing: crop mode, feature kind, uncond convention, crop size, face index, ... (the caller's
  ``parts``).

The store is an LRU bounded by an entry count and a byte budget (:class:`EncoderMemo`).  A stored tensor
that someone changed in place (its version counter moved) is treated as a miss and dropped, so a caller that
mutates what it got cannot poison later results.

Because only outputs are kept, an encoder can be dropped from memory once it has encoded: an
:func:`on_demand_clip_vision` handle loads its weights when an encode needs them and releases them when the
outermost :func:`encoder_session` around that encode ends (the unified loader's ``free_clip_vision`` option).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import os
import threading
import weakref
from collections import OrderedDict
from typing import Any, Callable, Iterator

import torch

DEFAULT_MAX_ENTRIES = 64
DEFAULT_MAX_BYTES = 512 * 1024 * 1024


# ---- keys -------------------------------------------------------------------------------------------------

def tensor_key(tensor: torch.Tensor | None) -> tuple | None:
    """(content hash, shape, dtype) of a tensor: equal for equal bytes, whatever the object or device."""
    if tensor is None:
        return None
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    # viewing the bytes as uint8 works for every dtype, bfloat16 included (numpy has no bfloat16)
    data = flat.view(torch.uint8).numpy() if flat.numel() else b""
    digest = hashlib.blake2b(memoryview(data), digest_size=16).hexdigest()
    return digest, tuple(tensor.shape), str(tensor.dtype)


_tokens: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()
_token_counter = itertools.count(1)
_token_lock = threading.Lock()


def _object_token(obj: Any) -> tuple:
    """A number unique to ``obj`` for its lifetime and never reused (``id`` may be reused after collection)."""
    try:
        with _token_lock:
            token = _tokens.get(obj)
            if token is None:
                token = _tokens[obj] = next(_token_counter)
        return ("object", type(obj).__name__, token)
    except TypeError:  # not weak-referenceable: nothing safe to key it by, so never share its results
        return ("unshared", next(_token_counter))


def file_stamp(path: str) -> tuple:
    """Modification times (ns) and sizes of a file, or of the files directly inside a folder."""
    if os.path.isdir(path):
        return tuple(sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size)
                            for e in os.scandir(path) if e.is_file()))
    stat = os.stat(path)
    return (stat.st_mtime_ns, stat.st_size)


def encoder_key(encoder: Any) -> tuple:
    """Identity of an encoder for memo keys.

    A CLIP vision tower loaded from a file is its real path, that file's stamp and the dtype/device it runs
    in, so a reloaded (or released and reloaded) encoder of an unchanged file shares its outputs; an
    InsightFace pack is its folder, model name, providers and files' stamps.  Anything else (an encoder built
    in memory, ComfyUI's ClipVisionModel behind a wrapper) is keyed by the object itself.
    """
    inner = getattr(encoder, "comfy_model", None)  # core.encode's wrapper of ComfyUI's model: key the model
    if inner is not None:
        return _object_token(inner)
    source = getattr(encoder, "source", None)
    if isinstance(source, (str, os.PathLike)) and os.path.exists(source):
        described = getattr(encoder, "describe", None)
        detail = described() if callable(described) else (str(getattr(encoder, "dtype", "")),
                                                            str(getattr(encoder, "device", "")))
        return ("file", os.path.realpath(source), file_stamp(os.fspath(source)), detail)
    model_dir = getattr(encoder, "model_dir", None)
    if model_dir and os.path.isdir(str(model_dir)):
        return ("insightface", os.path.realpath(str(model_dir)), getattr(encoder, "name", ""),
                tuple(getattr(encoder, "ort_providers", ()) or ()), file_stamp(str(model_dir)))
    return _object_token(encoder)


# ---- the store ----------------------------------------------------------------------------------------------

def _tensors_in(value: Any) -> list[torch.Tensor]:
    """The tensors a memoized value holds (tensors, tuples/lists of them, dataclasses of them)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors_in(item)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [t for f in dataclasses.fields(value) for t in _tensors_in(getattr(value, f.name))]
    return []


@dataclasses.dataclass
class _Entry:
    value: Any
    nbytes: int
    versions: tuple[int, ...]


@dataclasses.dataclass
class MemoStats:
    """Counters since the last :meth:`EncoderMemo.clear`: lookups that hit, that computed, evictions."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0



def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place version counter; None for inference tensors (ComfyUI runs nodes under
    ``torch.inference_mode``), which keep no counter, so in-place changes to them go unnoticed."""
    return None if tensor.is_inference() else tensor._version

class EncoderMemo:
    """A thread-safe LRU of encoder outputs bounded by ``max_entries`` and ``max_bytes`` (0 entries: off).

    A value larger than the whole byte budget is computed and returned but not stored.
    """

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_entries = int(max_entries)
        self.max_bytes = int(max_bytes)
        self.stats = MemoStats()
        self._entries: "OrderedDict[tuple, _Entry]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored tensors."""
        return self._bytes

    def clear(self) -> None:
        """Forget every entry and reset the counters."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self.stats = MemoStats()

    def configure(self, max_entries: int | None = None, max_bytes: int | None = None) -> None:
        """Change the bounds (evicting what no longer fits); ``max_entries=0`` turns memoization off."""
        with self._lock:
            if max_entries is not None:
                self.max_entries = int(max_entries)
            if max_bytes is not None:
                self.max_bytes = int(max_bytes)
            self._evict()

    def get_or_compute(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """The value stored under ``key``, or ``compute()`` stored under it (computed outside the lock)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and self._unchanged(entry):
                self._entries.move_to_end(key)
                self.stats.hits += 1
                return entry.value
            if entry is not None:  # a caller changed a stored tensor in place: the entry is no longer true
                self._drop(key)
            self.stats.misses += 1
        value = compute()
        self._store(key, value)
        return value

    @staticmethod
    def _unchanged(entry: _Entry) -> bool:
        return tuple(_version(t) for t in _tensors_in(entry.value)) == entry.versions

    def _store(self, key: tuple, value: Any) -> None:
        tensors = _tensors_in(value)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if self.max_entries <= 0 or nbytes > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                self._drop(key)
            self._entries[key] = _Entry(value, nbytes, tuple(_version(t) for t in tensors))
            self._bytes += nbytes
            self._evict()

    def _drop(self, key: tuple) -> None:
        self._bytes -= self._entries.pop(key).nbytes

    def _evict(self) -> None:
        while self._entries and (len(self._entries) > self.max_entries or self._bytes > self.max_bytes):
            self._drop(next(iter(self._entries)))
            self.stats.evictions += 1


ENCODER_MEMO = EncoderMemo()


def memoized(kind: str, encoder: Any, parts: tuple, compute: Callable[[], Any]) -> Any:
    """``compute()`` memoized under (``kind``, the encoder's identity, ``parts``) in :data:`ENCODER_MEMO`.

    ``parts`` must name everything else the result depends on: image contents as :func:`tensor_key`, and
    every preprocessing option.
    """
    if ENCODER_MEMO.max_entries <= 0:
        return compute()
    return ENCODER_MEMO.get_or_compute((kind, encoder_key(encoder)) + tuple(parts), compute)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the body without memoization (benchmarks of the cold path); the stored entries are kept."""
    previous = ENCODER_MEMO.max_entries
    ENCODER_MEMO.max_entries = 0
    try:
        yield
    finally:
        ENCODER_MEMO.max_entries = previous


# ---- encoders that let go of their weights -----------------------------------------------------------------

@contextlib.contextmanager
def encoder_session(encoder: Any) -> Iterator[None]:
    """Around a group of encodes with ``encoder``: an on-demand encoder releases its weights when the outermost
    session ends; any other encoder is left alone."""
    hold = getattr(encoder, "hold", None)
    if not callable(hold):
        yield
        return
    with hold():
        yield


class OnDemandEncoder:
    """Mixin for a :class:`core.encode.ClipVision` that loads its weights on use and lets go after a session.

    It keeps the encoder's description (size, mean/std, widths, source) so memo keys and width checks need no
    weights; ``model`` loads them through ``load`` (the cached loader) when an encode needs them.
    """

    def _init_on_demand(self, path: str, load: Callable[[str], Any], forget: Callable[[str], None]) -> None:
        loaded = load(path)
        for name in ("image_size", "image_mean", "image_std", "hidden_size", "projection_dim", "num_layers",
                     "source"):
            setattr(self, name, getattr(loaded, name))
        self._path, self._load, self._forget = path, load, forget
        self._detail = (str(loaded.dtype), str(loaded.device))
        self._loaded: Any = None  # held only while a session runs
        self._depth = 0
        self._lock = threading.RLock()
        self.loads = 1

    @property
    def model(self) -> torch.nn.Module:
        with self._lock:
            if self._loaded is None:
                self._loaded = self._load(self._path)
                self.loads += 1
            return self._loaded.model

    @property
    def is_loaded(self) -> bool:
        """Whether the weights are held right now."""
        return self._loaded is not None

    def describe(self) -> tuple:
        """(dtype, device) without loading the weights (for :func:`encoder_key`)."""
        return self._detail

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Keep the weights (once loaded) until the outermost ``hold`` ends, then release them."""
        with self._lock:
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    self.release()

    def release(self) -> None:
        """Drop this handle's weights and the loader cache's entry for its file."""
        with self._lock:
            self._loaded = None
            self._forget(self._path)


def is_on_demand(encoder: Any) -> bool:
    """Whether ``encoder`` is an on-demand handle (holds its weights only while encoding)."""
    return isinstance(encoder, OnDemandEncoder)


_on_demand_type: type | None = None
# one handle per file and stamp, so a re-run (even by a new executor) reads no weights just to describe it
_handles: dict[str, tuple[tuple, Any]] = {}
_handles_lock = threading.Lock()


def on_demand_clip_vision(path: str | os.PathLike) -> Any:
    """A CLIP_VISION value for ``path`` that holds its weights only while encoding (see :class:`OnDemandEncoder`).

    It is a :class:`core.encode.ClipVision` (every consumer accepts it).  The first call for a file loads the
    weights once to read the encoder's description, then releases them; later calls for the unchanged file
    return the same handle.
    """
    global _on_demand_type
    from . import encode  # pulls in transformers: only when this option is used

    real = os.path.realpath(os.fspath(path))
    if not os.path.exists(real):
        raise FileNotFoundError(f"CLIP vision model '{path}' does not exist")
    stamp = file_stamp(real)
    with _handles_lock:
        cached = _handles.get(real)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        if _on_demand_type is None:  # built lazily so importing this module never imports transformers
            _on_demand_type = type("OnDemandClipVision", (OnDemandEncoder, encode.ClipVision), {})
        handle = _on_demand_type.__new__(_on_demand_type)
        handle._init_on_demand(real, encode.load_clip_vision, _forget_clip_vision)
        handle.release()
        _handles[real] = (stamp, handle)
        return handle


def _forget_clip_vision(path: str) -> None:
    """Remove core.encode's cache entry of ``path`` so the weights can be collected."""
    from . import encode

    encode.forget_clip_vision(path)
