"""The v1 node pack's own behaviour, for workflows saved before its 2024 rewrite (the ``…(legacy)`` nodes).

The v1 nodes map onto today's engine except in three places, which live here:

* **weight_type** meant the K/V scaling: ``original`` scaled the adapter's attention output (today's
  ``embeds_scaling`` ``V only``), ``linear`` scaled its keys and values (``K+V``), ``channel penalty``
  scaled the keys and the values' token mean, by ``C/1280`` (``K+mean(V) w/ C penalty``).  Every layer got
  the same weight (today's ``weight_type`` ``linear``).
* **noise** (0..1) replaced the blank uncond image by a scrambled copy of the reference.  v1 centre-cropped
  the reference to a 224 px square, displaced its pixels elastically, flipped it both ways and added Gaussian
  noise, with the torch seed fixed at 0.  The scrambling *fell* as ``noise`` rose (the displacement field's
  smoothing was ``3.5·noise``, the added noise ``0.3 − 0.25·noise``; v1's README: "0.01 adds a lot of noise,
  1.0 removes most of it"), and 0 meant "no noise image".  :func:`noise_negative` maps that onto
  ``core.noise.make_noise``'s ``shuffle`` (the same three steps) at strength ``1 − noise``, seed 0: the
  direction and the meaning of the ends are v1's, the exact pixels are not (different elastic and noise
  laws; at ``noise`` = 1 ours returns the unscrambled crop where v1 still flipped it and added a little noise).
  FaceID Plus scrambled the aligned face crops, not the whole picture (:func:`face_noise_negative`); plain
  FaceID ignored ``noise`` (its uncond is zeros).
* **IPAdapterTilesMasked** cut the reference into 224 px tiles, ``short_side_tiles`` along the short side
  (:func:`masked_tiles`), each applied through a mask over its region holding ``tile_weight``.

Deviations from v1, on purpose: tiles are exactly 224 px (v1 made a centred grid's tiles ``224 + offset``
px, a slip), and the whole-picture tiles' masks are computed at full size rather than resized bicubically.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from . import faceid, faceid_apply, noise

#: v1 weight_type → today's embeds_scaling (the first entry is v1's default).
EMBEDS_SCALING_FOR: dict[str, str] = {
    "original": "V only",
    "linear": "K+V",
    "channel penalty": "K+mean(V) w/ C penalty",
}
WEIGHT_TYPES: tuple[str, ...] = tuple(EMBEDS_SCALING_FOR)

NOISE_TYPE = "shuffle"   # make_noise's type closest to v1's scrambled reference
NOISE_SEED = 0           # v1 called torch.manual_seed(0) before every noise image
NOISE_SIZE = (224, 224)  # v1's centre crop resize

TILE_SIZE = 224          # v1's tile side (CLIP's input size)
# A long side's leftover of at least a quarter tile earns one more tile (aligned with the far edge); a
# smaller leftover is split evenly on both sides and left out.
EXTRA_TILE_FRACTION = 4
PAD_AROUND = 30          # PrepImageForInsightFace: white border around a 580 px image → 640 px
INSIGHTFACE_SIZE = 640   # the detector's input size


def embeds_scaling_for(weight_type: str, node: str) -> str:
    """Today's ``embeds_scaling`` for a v1 ``weight_type``; a ValueError names the node and the choices."""
    try:
        return EMBEDS_SCALING_FOR[weight_type]
    except KeyError:
        raise ValueError(f"{node}: weight_type '{weight_type}' is not a v1 weight type; expected one of: "
                         f"{', '.join(WEIGHT_TYPES)}") from None


def _check_noise(value: float, node: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{node}: noise must be within 0..1 (0 = no noise image), got {value}")
    return value


def noise_negative(image: torch.Tensor, amount: float, node: str = "IPAdapterApply") -> torch.Tensor | None:
    """The uncond image v1's ``noise`` input stood for: None at 0, else a scrambled copy of ``image``.

    ``image`` IMAGE [B,H,W,C]; the result is [B,224,224,3], ``make_noise("shuffle", 1 - amount)`` of it with
    seed 0 (module docstring): the same image and amount always give the same negative.
    """
    amount = _check_noise(amount, node)
    if amount == 0.0:
        return None
    return noise.make_noise(NOISE_TYPE, 1.0 - amount, 0, image=image, size=NOISE_SIZE, seed=NOISE_SEED)


def face_noise_negative(adapter: Any, insightface: Any, image: torch.Tensor, amount: float, family: str,
                        node: str = "IPAdapterApplyFaceID") -> torch.Tensor | None:
    """v1 FaceID's noise image: the scrambled aligned face crops, for FaceID Plus only (None otherwise).

    Plain FaceID and Portrait have no CLIP side, so v1 ignored ``noise`` for them; without ``insightface``
    this returns None and the apply step reports the missing model.
    """
    amount = _check_noise(amount, node)
    if amount == 0.0 or insightface is None or not faceid_apply.is_faceid(adapter) \
            or not faceid_apply.needs_clip_vision(adapter):
        return None
    try:
        faces = faceid.analyze_faces(insightface, image, crop_size=faceid_apply.crop_size(family))
    except (faceid.FaceNotFoundError, IndexError) as error:
        raise type(error)(f"{node}: {error}") from None
    return noise_negative(faces.crops, amount, node)


# ---- IPAdapterTilesMasked -----------------------------------------------------------------------------

def tiled_size(height: int, width: int, short_side_tiles: int) -> tuple[int, int]:
    """(height, width) of the reference resized so its short side holds ``short_side_tiles`` tiles."""
    if width < height:
        new_width = TILE_SIZE * short_side_tiles
        return height * new_width // width, new_width
    new_height = TILE_SIZE * short_side_tiles
    return new_height, width * new_height // height


def tile_starts(side: int) -> list[int]:
    """Tile offsets along a side of ``side`` px (at least one tile long)."""
    count, leftover = divmod(side, TILE_SIZE)
    if leftover >= TILE_SIZE // EXTRA_TILE_FRACTION:
        return [i * TILE_SIZE for i in range(count)] + [side - TILE_SIZE]
    offset = leftover // 2
    return [offset + i * TILE_SIZE for i in range(count)]


def _resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """IMAGE [B,H,W,C] resized bicubically (antialiased when shrinking), kept within 0..1."""
    if tuple(image.shape[1:3]) == (height, width):
        return image
    x = F.interpolate(image.movedim(-1, 1).float(), size=(height, width), mode="bicubic", align_corners=False,
                      antialias=True)
    return x.clamp(0.0, 1.0).movedim(1, -1)


def _grid(image: torch.Tensor, short_side_tiles: int) -> tuple[torch.Tensor, list[int], list[int]]:
    """The reference resized for ``short_side_tiles`` and its tile offsets (rows, columns)."""
    height, width = tiled_size(image.shape[1], image.shape[2], short_side_tiles)
    return _resize(image, height, width), tile_starts(height), tile_starts(width)


def masked_tiles(image: torch.Tensor, short_side_tiles: int, tile_weight: float,
                 node: str = "IPAdapterTilesMasked") -> tuple[torch.Tensor, torch.Tensor]:
    """v1's masked tiling of the first reference image: (tiles [N,224,224,C], masks [N,H',W']).

    The image is resized so its short side is ``224·short_side_tiles`` px and cut into 224 px tiles; tile
    n's mask is zero except over its own region, where it holds ``tile_weight`` (1.0 when there is a single
    row or column of tiles).  With several rows *and* columns, the tiles of the one-tile-short-side grid
    come first, each masked with 1.0 over the region it covers, so CLIP also sees the whole picture.
    """
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[0] == 0:
        raise ValueError(f"{node}: 'image' must be an IMAGE batch [B,H,W,C]; got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    if int(short_side_tiles) < 1:
        raise ValueError(f"{node}: short_side_tiles must be 1 or more to tile (0 applies the whole image), "
                         f"got {short_side_tiles}")
    if not 0.0 <= float(tile_weight) <= 1.0:
        raise ValueError(f"{node}: tile_weight must be within 0..1, got {tile_weight}")
    reference = image[:1]  # v1 tiled only the first image
    resized, rows, cols = _grid(reference, int(short_side_tiles))
    height, width = resized.shape[1:3]
    value = 1.0 if len(rows) == 1 or len(cols) == 1 else float(tile_weight)
    tiles, masks = [], []
    if len(rows) > 1 and len(cols) > 1:
        whole, whole_rows, whole_cols = _grid(reference, 1)
        scale_y, scale_x = height / whole.shape[1], width / whole.shape[2]
        for y in whole_rows:
            for x in whole_cols:
                tiles.append(whole[:, y:y + TILE_SIZE, x:x + TILE_SIZE])
                mask = torch.zeros(1, height, width)
                mask[:, round(y * scale_y):round((y + TILE_SIZE) * scale_y),
                     round(x * scale_x):round((x + TILE_SIZE) * scale_x)] = 1.0
                masks.append(mask)
    for y in rows:
        for x in cols:
            tiles.append(resized[:, y:y + TILE_SIZE, x:x + TILE_SIZE])
            mask = torch.zeros(1, height, width)
            mask[:, y:y + TILE_SIZE, x:x + TILE_SIZE] = value
            masks.append(mask)
    return torch.cat(tiles), torch.cat(masks)


# ---- PrepImageForInsightFace --------------------------------------------------------------------------

def prep_for_insightface(image: torch.Tensor, crop_position: str = "center", sharpening: float = 0.0,
                         pad_around: bool = True) -> torch.Tensor:
    """v1's PrepImageForInsightFace: square crop, LANCZOS resize and sharpening to 640 px, or to 580 px plus
    a 30 px white border (``pad_around``: keeps a face near the edge detectable).

    v1 padded with 255 on the 0..1 scale, which InsightFace saw as white; the border here is 1.0.
    """
    from . import prep_image

    if crop_position == "pad":  # today's crop list has it; v1's InsightFace one did not
        raise ValueError("PrepImageForInsightFace: crop_position must be one of center, top, bottom, left, right; "
                         "got 'pad'")
    size = INSIGHTFACE_SIZE - 2 * PAD_AROUND if pad_around else INSIGHTFACE_SIZE
    out = prep_image.prep_image(image, "LANCZOS", crop_position, float(sharpening), size=size)
    if pad_around:
        out = F.pad(out, (0, 0, PAD_AROUND, PAD_AROUND, PAD_AROUND, PAD_AROUND), value=1.0)
    return out
