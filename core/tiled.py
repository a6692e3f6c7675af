"""Tiling a reference image for IPAdapterTiled: one adapter application per 256-px tile, each masked to its
tile's region of the picture.

CLIP vision sees a centre-cropped square, so a wide or tall reference loses its sides.  Tiling keeps all of
it: the reference is resized so its short side is 256 px (an almost square one, 0.75 < H/W < 1.33, is
centre-cropped to a square and resized to 512 px, i.e. 2 x 2 tiles; one beyond 4:1 is centre-cropped to
256 x 1024 after the resize), cut into ``ceil(side / 256)`` tiles per side that overlap evenly, and each
tile drives the part of the generated picture it came from through an attention mask that is zero outside
the tile (inside it, the user's mask, resized with the image).  The masks are in the resized reference's
pixels; the engine scales them to each layer's token grid, so the generated picture should have the
reference's aspect ratio.  256 rather than CLIP's 224 is the existing pack's choice (it divides latent
sizes more often; the encoder downsizes each tile to 224).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .prep_image import contrast_adaptive_sharpening

TILE_SIZE = 256
SQUARE_RANGE = (0.75, 1.33)  # H/W strictly inside: treated as a square (2 x 2 tiles)
MAX_TILES = 4                # along the long side


@dataclass(frozen=True)
class Tile:
    """One tile: its pixels [B,256,256,C], its mask over the whole resized reference [Bm,H,W], and where
    it starts (x, y) in that reference."""

    image: torch.Tensor
    mask: torch.Tensor
    x: int
    y: int


def _center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Centre crop of the last two dimensions."""
    top, left = (x.shape[-2] - height) // 2, (x.shape[-1] - width) // 2
    return x[..., top:top + height, left:left + width]


def _resize_lanczos(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """IMAGE [B,H,W,C] resized with PIL's LANCZOS, per channel in 32-bit float (no 8-bit rounding)."""
    arrays = images.detach().to("cpu", torch.float32).numpy()
    out = np.empty((arrays.shape[0], height, width, arrays.shape[3]), dtype=np.float32)
    for b in range(arrays.shape[0]):
        for c in range(arrays.shape[3]):
            channel = Image.fromarray(np.ascontiguousarray(arrays[b, :, :, c]), mode="F")
            out[b, :, :, c] = np.asarray(channel.resize((width, height), resample=Image.Resampling.LANCZOS))
    return torch.from_numpy(out).clamp_(0.0, 1.0)


def _resize_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """MASK [B,H,W] resized bicubic with antialiasing, kept within 0..1."""
    if tuple(mask.shape[-2:]) == (height, width):
        return mask
    resized = F.interpolate(mask.unsqueeze(1).float(), size=(height, width), mode="bicubic", antialias=True)
    return resized.squeeze(1).clamp_(0.0, 1.0)


def resized_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) the reference is resized to (after the square crop of an almost square one)."""
    ratio = height / width
    if SQUARE_RANGE[0] < ratio < SQUARE_RANGE[1]:
        return 2 * TILE_SIZE, 2 * TILE_SIZE
    if height < width:
        return TILE_SIZE, int(TILE_SIZE * width / height)
    return int(TILE_SIZE * height / width), TILE_SIZE


def tile_starts(side: int) -> list[int]:
    """Start offsets of the tiles along one side of ``side`` px: ``ceil(side/256)`` tiles, evenly overlapping."""
    count = math.ceil(side / TILE_SIZE)
    overlap = max(0.0, (count * TILE_SIZE - side) / (count - 1 if count > 1 else 1))
    return [int(i * (TILE_SIZE - overlap)) for i in range(count)]


def prepare_reference(image: torch.Tensor, mask: torch.Tensor | None = None,
                      sharpening: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference IMAGE [B,H,W,C] and its MASK resized and cropped for tiling (module docstring).

    ``mask`` (MASK [Bm,h,w] or [h,w], any size; None = everything) is first resized to the image.
    ``sharpening`` (0..1) applies contrast-adaptive sharpening to the resized image.
    """
    if image.ndim != 4 or image.shape[0] == 0:
        raise ValueError(f"IPAdapterTiled: 'image' must be an IMAGE batch [B,H,W,C], got {tuple(image.shape)}")
    _, height, width, _ = image.shape
    no_mask = mask is None
    if no_mask:
        mask = torch.ones(1, height, width)
    elif mask.ndim == 2:
        mask = mask.unsqueeze(0)
    mask = _resize_mask(mask, height, width)
    ratio = height / width
    if SQUARE_RANGE[0] < ratio < SQUARE_RANGE[1]:
        side = min(height, width)
        image = _center_crop(image.movedim(-1, 1), side, side).movedim(1, -1)
        mask = _center_crop(mask, side, side)
    new_h, new_w = resized_size(height, width)
    image = _resize_lanczos(image, new_h, new_w)
    # no mask: exact ones (a bicubic resize of ones is only nearly 1)
    mask = torch.ones(1, new_h, new_w) if no_mask else _resize_mask(mask, new_h, new_w)
    if ratio > MAX_TILES or ratio < 1 / MAX_TILES:
        crop = (TILE_SIZE, TILE_SIZE * MAX_TILES) if height < width else (TILE_SIZE * MAX_TILES, TILE_SIZE)
        image = _center_crop(image.movedim(-1, 1), *crop).movedim(1, -1)
        mask = _center_crop(mask, *crop)
    if sharpening > 0:
        image = contrast_adaptive_sharpening(image, sharpening)
    return image, mask


def make_tiles(image: torch.Tensor, mask: torch.Tensor | None = None, sharpening: float = 0.0) -> list[Tile]:
    """The tiles of a reference, row by row, each with its region mask (see the module docstring)."""
    image, mask = prepare_reference(image, mask, sharpening)
    _, height, width, _ = image.shape
    tiles = []
    for y in tile_starts(height):
        for x in tile_starts(width):
            region = torch.zeros_like(mask)
            region[:, y:y + TILE_SIZE, x:x + TILE_SIZE] = mask[:, y:y + TILE_SIZE, x:x + TILE_SIZE]
            tiles.append(Tile(image[:, y:y + TILE_SIZE, x:x + TILE_SIZE, :], region, x, y))
    return tiles
