"""ClipVision Enhancer: CLIP features of the whole reference enriched with those of its tiles.

An idea from "Scaling on Scales": CLIP sees a 224-px picture, so fine detail of a large reference is lost.
The enhancer also encodes an ``n x n`` grid of tiles of the *original* image (no overlap, each tile
preprocessed as usual: shortest side to 224, centre crop) and merges the tiles' features back into the
shape of one image's features:

* hidden states ``[T, C]`` (``T = 1 + g*g`` patch tokens, 257 for 224-px ViTs): the tiles' patch grids are
  laid side by side into an ``n*g x n*g`` grid, average-pooled back to ``g x g``; the class token is the mean
  of the tiles' class tokens;
* pooled ``image_embeds`` ``[E]``: the vector is read as an ``r x c`` "picture" and merged the same way.  The
  existing pack uses ``r = c = sqrt(E)`` and therefore only works for square widths (1024, ViT-H); here
  ``r x c`` is the most square factorisation of ``E`` (1024 = 32x32 as in the pack, 1280 = 32x40 for
  ViT-bigG, 768 = 24x32 for CLIP-L), so every encoder works and square widths give the pack's numbers.

The merged features are combined with the whole-image features with ``ratio`` r: one reference gives two
feature rows, ``r * whole`` and ``merged`` (which the apply's ``combine_embeds`` then joins), several
references give ``r * whole + (1 - r) * merged`` each.  Only the cond side is enhanced; the uncond side
(negative image or blank) is encoded as usual.  ``tiles`` is capped at 16 and 1 means no enhancement.

Also here, the other pixel-side variant of encoding: :func:`encode_masked` (IPAdapterEncoder's mask), which
multiplies the normalised pixels by a mask before the encoder, so masked-out parts read as the mean colour.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F

from .attention import fit_batch
from .embeds import Embeds

MAX_TILES = 16


def embeds_grid(width: int) -> tuple[int, int]:
    """(rows, cols) with rows * cols == ``width`` and rows <= cols as close as possible (most square)."""
    if width < 1:
        raise ValueError(f"embedding width must be positive, got {width}")
    rows = max(d for d in range(1, math.isqrt(width) + 1) if width % d == 0)
    return rows, width // rows


def split_tiles(image: torch.Tensor, tiles: int) -> torch.Tensor:
    """IMAGE [B,H,W,C] -> [B, tiles*tiles, H//tiles, W//tiles, C], tiles row by row (a remainder is dropped)."""
    _, height, width, _ = image.shape
    h, w = height // tiles, width // tiles
    if h < 1 or w < 1:
        raise ValueError(f"ClipVision Enhancer: a {height}x{width} image cannot be cut into {tiles}x{tiles} tiles; "
                         f"use fewer enhance_tiles or a larger image")
    parts = [image[:, i * h:(i + 1) * h, j * w:(j + 1) * w, :] for i in range(tiles) for j in range(tiles)]
    return torch.stack(parts, dim=1)


def _merge_grids(grids: torch.Tensor, tiles: int) -> torch.Tensor:
    """[tiles*tiles, r, c, D] laid out row by row into one [tiles*r, tiles*c, D] grid, pooled to [r, c, D]."""
    _, rows, cols, depth = grids.shape
    mosaic = grids.reshape(tiles, tiles, rows, cols, depth).permute(0, 2, 1, 3, 4).reshape(
        tiles * rows, tiles * cols, depth)
    pooled = F.adaptive_avg_pool2d(mosaic.permute(2, 0, 1).unsqueeze(0), (rows, cols))
    return pooled.squeeze(0).permute(1, 2, 0)


def merge_hidden_states(states: torch.Tensor, tiles: int) -> torch.Tensor:
    """The tiles' hidden states [tiles*tiles, 1+g*g, C] merged into one image's [1, 1+g*g, C]."""
    patches = states.shape[1] - 1
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"ClipVision Enhancer: hidden states with {states.shape[1]} tokens are not a class token "
                         f"plus a square patch grid; this encoder cannot be enhanced")
    grids = states[:, 1:, :].reshape(-1, side, side, states.shape[-1])
    merged = _merge_grids(grids, tiles).reshape(1, patches, states.shape[-1])
    cls = states[:, :1, :].mean(dim=0, keepdim=True)
    return torch.cat([cls, merged], dim=1)


def merge_image_embeds(embeds: torch.Tensor, tiles: int) -> torch.Tensor:
    """The tiles' pooled embeddings [tiles*tiles, E] merged into one [1, E] (read as ``embeds_grid(E)``)."""
    rows, cols = embeds_grid(embeds.shape[-1])
    grids = embeds.reshape(-1, rows, cols, 1)
    return _merge_grids(grids, tiles).reshape(1, -1)


def _encode(clip_vision: Any, images: torch.Tensor, feature: str, batch_size: int) -> torch.Tensor:
    from .encode import as_clip_vision  # transformers is only imported when encoding

    encoder = as_clip_vision(clip_vision)
    key = "image_embeds" if feature == "image_embeds" else "penultimate_hidden_states"
    size = images.shape[0] if batch_size <= 0 else min(batch_size, images.shape[0])
    return torch.cat([encoder.encode(chunk)[key].float() for chunk in images.split(size)])


def enhance_features(clip_vision: Any, image: torch.Tensor, whole: torch.Tensor, feature: str, tiles: int,
                     ratio: float, encode_batch_size: int = 0) -> torch.Tensor:
    """Cond features of ``image`` [B,H,W,C] enhanced with its tiles (module docstring).

    ``whole`` are the features of the whole images ([B,E] or [B,T,C]) as already encoded; ``feature`` is
    ``"image_embeds"`` or ``"hidden_states"``.  Returns ``whole`` unchanged for ``tiles`` <= 1.
    """
    if feature not in ("image_embeds", "hidden_states"):
        raise ValueError(f"ClipVision Enhancer works on CLIP features, not on {feature!r} (FaceID adapters take "
                         f"face embeddings); use another apply node for this adapter")
    tiles = min(int(tiles), MAX_TILES)
    if tiles <= 1:
        return whole
    if whole.shape[0] != image.shape[0]:
        raise ValueError(f"ClipVision Enhancer: {whole.shape[0]} feature rows for {image.shape[0]} images")
    split = split_tiles(image, tiles)
    merge = merge_image_embeds if feature == "image_embeds" else merge_hidden_states
    merged = torch.cat([merge(_encode(clip_vision, parts, feature, encode_batch_size), tiles) for parts in split])
    ratio = float(ratio)
    if image.shape[0] > 1:
        return whole * ratio + merged * (1.0 - ratio)
    return torch.cat([whole * ratio, merged])


def enhance_embeds(embeds: Embeds, clip_vision: Any, image: torch.Tensor, tiles: int, ratio: float,
                   encode_batch_size: int = 0) -> Embeds:
    """``embeds`` (of ``image``, as encoded for an adapter) with the cond side enhanced; the uncond rows are
    matched to the new cond rows."""
    cond = enhance_features(clip_vision, image, embeds.cond, embeds.feature, tiles, ratio, encode_batch_size)
    return dataclasses.replace(embeds, cond=cond, uncond=fit_batch(embeds.uncond, cond.shape[0]))


def encode_masked(clip_vision: Any, image: torch.Tensor, mask: torch.Tensor, feature: str) -> torch.Tensor:
    """Features of ``image`` [B,H,W,C] encoded with its normalised pixel values multiplied by ``mask``.

    ``mask`` (MASK [1 or B, h, w] or [h, w], 0..1) is centre-cropped to a square and resized (bicubic,
    antialiased) to the encoder's input size, matching the encoder's own centre crop of an image with the
    mask's aspect ratio.  ``feature``: ``"image_embeds"`` or ``"hidden_states"``.
    """
    from .encode import as_clip_vision

    if feature not in ("image_embeds", "hidden_states"):
        raise ValueError(f"IPAdapterEncoder: a mask applies to CLIP features, not to {feature!r}")
    encoder = as_clip_vision(clip_vision)
    pixels = encoder.preprocess(image)
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3 or mask.shape[0] not in (1, image.shape[0]):
        raise ValueError(f"IPAdapterEncoder: 'mask' must be a MASK [1 or {image.shape[0]}, H, W], got "
                         f"{tuple(mask.shape)}")
    side = min(mask.shape[-2:])
    top, left = (mask.shape[-2] - side) // 2, (mask.shape[-1] - side) // 2
    square = mask[:, top:top + side, left:left + side].unsqueeze(1).float()
    size = tuple(pixels.shape[-2:])
    if tuple(square.shape[-2:]) != size:
        square = F.interpolate(square, size=size, mode="bicubic", antialias=True)
    weighted = pixels * fit_batch(square.to(pixels.device, pixels.dtype), pixels.shape[0])
    out = encoder.encode_pixels(weighted)
    key = "image_embeds" if feature == "image_embeds" else "penultimate_hidden_states"
    return out[key].float()
