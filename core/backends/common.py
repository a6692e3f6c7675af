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
from ..attention import ImageAttentionTerm, Weight, select_chunks

# ComfyUI's percent_to_sigma(0): "before the first step", larger than any real sigma.
SIGMA_BEFORE_START = 999999999.9

Entry = tuple[PreparedApplication, float, float]


def in_window(sigma: float | None, sigma_start: float, sigma_end: float) -> bool:
    """True when ``sigma`` lies in the step range ``[sigma_end, sigma_start]`` (or is unknown)."""
    return sigma is None or sigma_end <= sigma <= sigma_start


def is_active(entry: Entry, layer: int, sigma: float | None) -> bool:
    """True when the entry's application adds a term at cross-attention ``layer`` and ``sigma``."""
    prepared, sigma_start, sigma_end = entry
    return prepared.application.acts_at(layer) and in_window(sigma, sigma_start, sigma_end)


def any_active(entries: Iterable[Entry], layer: int, sigma: float | None) -> bool:
    """True when at least one entry is active at ``layer`` and ``sigma``."""
    return any(is_active(entry, layer, sigma) for entry in entries)


def row_weights(per_frame: Sequence[float], cond_or_uncond: Sequence[int], batch: int,
                sides: tuple[int, ...] = (0, 1)) -> Weight:
    """The weight of every row of a UNet batch of ``len(cond_or_uncond)`` equal chunks.

    ``per_frame`` holds one weight per latent (frame) of a chunk, or a single weight for all; a chunk whose
    kind is not in ``sides`` gets 0 (kinds other than 1 count as cond, 0).  Returns a float when every
    row has the same weight, else a ``[batch]`` tensor.
    """
    chunks = len(cond_or_uncond)
    per_chunk = batch // chunks
    frames = [float(w) for w in per_frame]
    rows: list[float] = []
    for kind in cond_or_uncond:
        if (1 if kind == 1 else 0) not in sides:
            rows.extend([0.0] * per_chunk)
        elif len(frames) == 1:
            rows.extend(frames * per_chunk)
        else:  # one weight per latent: the last repeats, extra ones are dropped (as the references)
            rows.extend(frames[min(j, len(frames) - 1)] for j in range(per_chunk))
    if all(w == rows[0] for w in rows):
        return rows[0]
    return torch.tensor(rows, dtype=torch.float32)


def _combine_masks(attn: torch.Tensor | None, image: torch.Tensor | None) -> torch.Tensor | None:
    if attn is None:
        return image
    return attn if image is None else attn * image


def image_terms(entries: Iterable[Entry], layer: int, sigma: float | None, cond_or_uncond: Sequence[int],
                batch: int, device: torch.device, dtype: torch.dtype, *, query_len: int | None = None,
                latent_hw: Sequence[int] | None = None, grid: Sequence[int] | None = None
                ) -> list[ImageAttentionTerm]:
    """The image-attention terms of the active entries at ``layer``, in entry order.

    ``cond_or_uncond`` describes the UNet batch of ``batch`` rows (ComfyUI's convention: equal chunks,
    0 = cond, 1 = uncond).  Per application, at its layer weights ``lw`` (cond) and ``ulw`` (reference on
    uncond, see :class:`~core.application.Application`): the cond chunks get ``lw * A(q, K_ref, V_ref)``,
    the uncond chunks ``lw * A(q, K_neg, V_neg) + ulw * A(q, K_ref, V_ref)``; each is its own term under
    the application's ``embeds_scaling``, and a term (or a chunk) of weight 0 adds nothing.  Masks
    (needing ``query_len`` and the latent size ``latent_hw`` or the layer's ``grid``) multiply both terms.
    With ``image_masks`` each reference image makes its own pair of terms.  Keys/values come from the
    prepared application's cache, on ``device`` in ``dtype`` (the query's).
    """
    chunks = len(cond_or_uncond)
    if chunks == 0 or batch % chunks:
        raise ValueError(f"UNet batch {batch} does not split into {chunks} cond/uncond chunks {list(cond_or_uncond)}")
    terms = []
    for entry in entries:
        if not is_active(entry, layer, sigma):
            continue
        prepared = entry[0]
        app = prepared.application
        attn_mask, image_masks = prepared.layer_masks(query_len or 0, latent_hw, batch, chunks, device, dtype,
                                                      grid) if _has_masks(app) else (None, None)
        if image_masks is None:
            groups = [(prepared.keys_values(layer, device, dtype), 1.0, attn_mask)]
        else:
            scales = app.image_weights or (1.0,) * app.embeds.count
            groups = [(kv, scale, _combine_masks(attn_mask, image_masks[n]))
                      for n, (kv, scale) in enumerate(zip(prepared.image_keys_values(layer, device, dtype), scales))]
        main = row_weights(app.cond_weights(layer), cond_or_uncond, batch)
        swap_frames = app.swap_weights(layer)
        swap = None if swap_frames is None else row_weights(swap_frames, cond_or_uncond, batch, sides=(1,))
        for (k_cond, v_cond, k_uncond, v_uncond), scale, mask in groups:
            common = dict(embeds_scaling=app.embeds_scaling, tokens_per_image=prepared.tokens_per_image, mask=mask)
            terms.append(ImageAttentionTerm(
                key=select_chunks(k_cond, k_uncond, cond_or_uncond, batch),
                value=select_chunks(v_cond, v_uncond, cond_or_uncond, batch),
                weight=main * scale, **common))
            if swap is not None:  # the reference tokens on the uncond rows (its cond rows weigh 0)
                terms.append(ImageAttentionTerm(
                    key=select_chunks(k_cond, k_cond, cond_or_uncond, batch),
                    value=select_chunks(v_cond, v_cond, cond_or_uncond, batch),
                    weight=swap * scale, **common))
    return terms


def _has_masks(application: Any) -> bool:
    return application.attn_mask is not None or application.image_masks is not None


def adapter_label(adapter: Any) -> str:
    """How an error message names an adapter: its file and what it is."""
    name = getattr(adapter, "name", None) or getattr(adapter, "path", None) or getattr(adapter, "file", None)
    spec = getattr(adapter, "spec", None)
    what = f"{getattr(spec, 'family', '?')} {getattr(spec, 'kind', '?')}" if spec is not None else "adapter"
    return f"IP-Adapter {str(name)!r} ({what})" if name else f"the {what} IP-Adapter"
