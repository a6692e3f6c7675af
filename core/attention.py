"""Decoupled cross-attention: the text attention plus one image-attention term per adapter.

Plain tensors in, tensors out; the backends (diffusers processors, ComfyUI attn2 patches) only gather the
inputs.  Layouts:

* ``query``: ``[B, heads, L, head_dim]``, the cross-attention query already split into heads.
* ``key`` / ``value`` of the image tokens: ``[B, T, C]`` with ``C = heads * head_dim`` (the layer's inner
  width); ``T`` is every image token of the adapter, several images concatenated along the token axis.
* Attention outputs: ``[B, L, C]`` (heads merged), in the query's dtype.

The four ``embeds_scaling`` modes are those of the existing node pack; ``"V only"`` is the paper's (and
diffusers') ``weight * Attn(q, K_ip, V_ip)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
import torch.nn.functional as F

EMBEDS_SCALING_MODES: tuple[str, ...] = ("V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty")

# The channel penalty of the existing pack divides by the widest SD1.5 attention width, so the penalty
# is 1 at SD1.5's deepest layers and smaller at the shallow (narrower) ones.
C_PENALTY_WIDTH = 1280.0

Weight = Union[float, torch.Tensor]  # a number, or one weight per batch item ([B])


@dataclass(frozen=True)
class ImageAttentionTerm:
    """One adapter's contribution at one layer: its image keys/values and how to weigh them."""

    key: torch.Tensor            # [B, T, C]
    value: torch.Tensor          # [B, T, C]
    weight: Weight
    embeds_scaling: str = "V only"
    tokens_per_image: int = 0    # 0: treat all T tokens as one image (only "K+mean(V)" cares)
    mask: torch.Tensor | None = None  # [B, L, 1] or broadcastable; multiplies the term's output


def check_embeds_scaling(mode: str) -> str:
    """Return ``mode`` if it is one of :data:`EMBEDS_SCALING_MODES`, else raise a ValueError naming them."""
    if mode not in EMBEDS_SCALING_MODES:
        raise ValueError(f"embeds_scaling {mode!r} is not known; expected one of {list(EMBEDS_SCALING_MODES)}")
    return mode


def is_zero_weight(weight: Weight) -> bool:
    """True when the weight switches the term off entirely (so the term is skipped, not multiplied by 0)."""
    if isinstance(weight, torch.Tensor):
        return bool((weight == 0).all())
    return weight == 0


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Softmax attention of ``query`` [B,h,L,d] over ``key``/``value`` [B,T,h*d]; returns [B,L,h*d]."""
    batch, heads, _, head_dim = query.shape
    key = key.to(query.dtype).view(batch, -1, heads, head_dim).transpose(1, 2)
    value = value.to(query.dtype).view(batch, -1, heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)


def _per_item(weight: Weight, like: torch.Tensor) -> Weight:
    """A per-batch weight [B] as [B,1,1] on ``like``'s device/dtype, so it broadcasts over tokens and channels."""
    if isinstance(weight, torch.Tensor):
        return weight.to(device=like.device, dtype=like.dtype).reshape(-1, 1, 1)
    return weight


def _mean_per_image(value: torch.Tensor, tokens_per_image: int) -> torch.Tensor:
    """Mean of ``value`` [B,T,C] over each image's tokens, broadcast back to [B,T,C]."""
    batch, tokens, channels = value.shape
    per_image = tokens_per_image if tokens_per_image > 0 else tokens
    if tokens % per_image:
        raise ValueError(f"{tokens} image tokens are not a whole number of images of {per_image} tokens")
    grouped = value.view(batch, tokens // per_image, per_image, channels)
    return grouped.mean(dim=2, keepdim=True).expand_as(grouped).reshape(batch, tokens, channels)


def image_attention(query: torch.Tensor, term: ImageAttentionTerm) -> torch.Tensor:
    """The weighted image-attention output [B,L,C] of one term, per its ``embeds_scaling`` mode.

    * ``V only``: ``w * Attn(q, K, V)``
    * ``K+V``: ``Attn(q, w*K, w*V)``
    * ``K+V w/ C penalty``: as K+V with ``w' = w * C / 1280``
    * ``K+mean(V) w/ C penalty``: ``Attn(q, w'*K, (V - mean(V)) + w'*mean(V))``, the mean taken over each
      image's tokens, ``w' = w * C / 1280``
    """
    mode = check_embeds_scaling(term.embeds_scaling)
    key = term.key.to(query.dtype)
    value = term.value.to(query.dtype)
    weight = _per_item(term.weight, key)
    if mode == "V only":
        out = attention(query, key, value) * weight
    elif mode == "K+V":
        out = attention(query, key * weight, value * weight)
    else:
        weight = weight * (key.shape[-1] / C_PENALTY_WIDTH)
        if mode == "K+V w/ C penalty":
            out = attention(query, key * weight, value * weight)
        else:
            mean = _mean_per_image(value, term.tokens_per_image)
            out = attention(query, key * weight, (value - mean) + mean * weight)
    if term.mask is not None:
        out = out * term.mask.to(out.dtype)
    return out.to(query.dtype)


def active_rows(weight: Weight, batch: int) -> torch.Tensor | None:
    """The batch rows a per-item weight ``[B]`` does not switch off, or None when every row is active.

    A term whose weight is 0 on some rows (the cond chunk of a "precise" swap term, a frame of weight 0)
    is computed on the other rows only, so the rows it skips get nothing added, exactly.
    """
    if not isinstance(weight, torch.Tensor) or weight.ndim == 0:
        return None
    flat = weight.reshape(-1)
    if flat.shape[0] != batch:
        raise ValueError(f"a per-item image-attention weight has {flat.shape[0]} entries for a batch of {batch}")
    nonzero = flat != 0
    if bool(nonzero.all()):
        return None
    return nonzero.nonzero().reshape(-1)


def _rows_of(term: ImageAttentionTerm, rows: torch.Tensor) -> ImageAttentionTerm:
    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or t.shape[0] == 1:
            return t  # broadcast over the batch: the same for every row
        return t.index_select(0, rows.to(t.device))

    weight = term.weight.reshape(-1).index_select(0, rows.to(term.weight.device))
    return ImageAttentionTerm(pick(term.key), pick(term.value), weight, term.embeds_scaling,
                              term.tokens_per_image, pick(term.mask))


def decoupled_attention(
    text_out: torch.Tensor, query: torch.Tensor, terms: Sequence[ImageAttentionTerm]
) -> torch.Tensor:
    """``text_out`` [B,L,C] plus every non-zero-weight term's image attention, added in order.

    With no term (or only zero weights) ``text_out`` itself is returned, untouched.  A term with a per-item
    weight is only computed (and added) on the rows where its weight is not 0.
    """
    out = text_out
    for term in terms:
        if is_zero_weight(term.weight):
            continue
        rows = active_rows(term.weight, query.shape[0])
        if rows is None:
            out = out + image_attention(query, term)
        else:
            rows = rows.to(query.device)
            part = image_attention(query.index_select(0, rows), _rows_of(term, rows))
            out = out.index_add(0, rows, part.to(out.dtype))
    return out


def select_chunks(
    cond: torch.Tensor, uncond: torch.Tensor, cond_or_uncond: Sequence[int], batch: int
) -> torch.Tensor:
    """Image keys/values for a UNet batch of ``len(cond_or_uncond)`` equal chunks (0 = cond, 1 = uncond).

    ``cond``/``uncond`` are ``[1, T, C]`` (every latent sees the same tokens) or ``[N, T, C]`` with one row per
    latent of a chunk (unfolded batch: row i drives latent i; the last row repeats, extra rows are dropped).
    Returns ``[batch, T, C]``.
    """
    chunks = len(cond_or_uncond)
    if chunks == 0 or batch % chunks:
        raise ValueError(f"UNet batch {batch} does not split into {chunks} cond/uncond chunks {list(cond_or_uncond)}")
    per_chunk = batch // chunks
    parts = []
    for kind in cond_or_uncond:
        # ComfyUI's DualCFG-style third slot (and anything beyond uncond) takes the cond tokens.
        source = uncond if kind == 1 else cond
        parts.append(fit_batch(source, per_chunk))
    return torch.cat(parts, dim=0)


def fit_batch(rows: torch.Tensor, size: int) -> torch.Tensor:
    """``rows`` [N,...] resized to ``size`` rows: one row is broadcast, more are truncated or the last repeated."""
    count = rows.shape[0]
    if count == 1:
        return rows.expand(size, *rows.shape[1:])
    if count >= size:
        return rows[:size]
    return torch.cat([rows, rows[-1:].expand(size - count, *rows.shape[1:])], dim=0)
