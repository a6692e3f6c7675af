"""What both backends decide the same way: is an application active here, and which image terms it adds.

The diffusers backend (processors on a diffusers UNet) and the ComfyUI backend (attn2 replace patches) only
differ in how they get the query, the text attention and the sampling state; given those, the image terms
of one cross-attention call come from :func:`image_terms`, so both give the same numbers.

An *entry* is ``(prepared, sigma_start, sigma_end)``: a :class:`~core.application.PreparedApplication` and
its step range as sigmas (ComfyUI's ``percent_to_sigma(start_at)`` / ``percent_to_sigma(end_at)``).  An
application is active at ``sigma`` when ``sigma_end <= sigma <= sigma_start`` (a sigma of None, i.e. a
call outside sampling, counts as inside) and its weight at the layer is not 0.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from ..application import PreparedApplication
from ..attention import ImageAttentionTerm, select_chunks

# ComfyUI's percent_to_sigma(0): "before the first step", larger than any real sigma.
SIGMA_BEFORE_START = 999999999.9

Entry = tuple[PreparedApplication, float, float]


def in_window(sigma: float | None, sigma_start: float, sigma_end: float) -> bool:
    """True when ``sigma`` lies in the step range ``[sigma_end, sigma_start]`` (or is unknown)."""
    return sigma is None or sigma_end <= sigma <= sigma_start


def is_active(entry: Entry, layer: int, sigma: float | None) -> bool:
    """True when the entry's application adds a term at cross-attention ``layer`` and ``sigma``."""
    prepared, sigma_start, sigma_end = entry
    return prepared.application.layer_weight(layer) != 0 and in_window(sigma, sigma_start, sigma_end)


def any_active(entries: Iterable[Entry], layer: int, sigma: float | None) -> bool:
    """True when at least one entry is active at ``layer`` and ``sigma``."""
    return any(is_active(entry, layer, sigma) for entry in entries)


def image_terms(entries: Iterable[Entry], layer: int, sigma: float | None, cond_or_uncond: Sequence[int],
                batch: int, device: torch.device, dtype: torch.dtype) -> list[ImageAttentionTerm]:
    """The image-attention terms of the active entries at ``layer``, in entry order.

    ``cond_or_uncond`` describes the UNet batch of ``batch`` rows (ComfyUI's convention: equal chunks,
    0 = cond, 1 = uncond); each chunk gets the cond or uncond image keys/values.  Keys/values come from the
    prepared application's cache, on ``device`` in ``dtype`` (the query's).
    """
    terms = []
    for entry in entries:
        if not is_active(entry, layer, sigma):
            continue
        prepared = entry[0]
        k_cond, v_cond, k_uncond, v_uncond = prepared.keys_values(layer, device, dtype)
        terms.append(ImageAttentionTerm(
            key=select_chunks(k_cond, k_uncond, cond_or_uncond, batch),
            value=select_chunks(v_cond, v_uncond, cond_or_uncond, batch),
            weight=prepared.application.layer_weight(layer),
            embeds_scaling=prepared.application.embeds_scaling,
            tokens_per_image=prepared.tokens_per_image,
        ))
    return terms


def adapter_label(adapter: Any) -> str:
    """How an error message names an adapter: its file and what it is."""
    name = getattr(adapter, "name", None) or getattr(adapter, "path", None) or getattr(adapter, "file", None)
    spec = getattr(adapter, "spec", None)
    what = f"{getattr(spec, 'family', '?')} {getattr(spec, 'kind', '?')}" if spec is not None else "adapter"
    return f"IP-Adapter {str(name)!r} ({what})" if name else f"the {what} IP-Adapter"
