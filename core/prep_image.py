"""Preparing a reference image for a CLIP vision encoder: square it, resize it to 224 px, sharpen it.

What PrepImageForClipVision does.  CLIP's own preprocessing centre-crops; squaring the image first lets
the user choose which part is kept (``top``/``bottom``/``left``/``right``/``center``) or keep all of it
(``pad``: black borders).  Resizing uses PIL's filters, which antialias when shrinking.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CLIP_SIZE = 224

INTERPOLATIONS = ("LANCZOS", "BICUBIC", "HAMMING", "BILINEAR", "BOX", "NEAREST")
CROP_POSITIONS = ("top", "bottom", "left", "right", "center", "pad")


def square(images: torch.Tensor, crop_position: str = "center") -> torch.Tensor:
    """Make ``images`` [B,H,W,C] square: crop the longer side at ``crop_position``, or pad with black.

    ``pad`` keeps the whole image, centred (an odd difference puts the extra row/column after it).
    ``top``/``bottom`` only move a crop of a tall image and ``left``/``right`` one of a wide image; on the
    other orientation they crop at the centre.
    """
    if crop_position not in CROP_POSITIONS:
        raise ValueError(f"crop_position must be one of {', '.join(CROP_POSITIONS)}; got '{crop_position}'")
    _, h, w, _ = images.shape
    if h == w:
        return images
    if crop_position == "pad":
        diff = abs(h - w)
        before, after = diff // 2, diff - diff // 2
        # F.pad pads the last dimensions first: (C), (W), (H)
        pad = (0, 0, before, after, 0, 0) if h > w else (0, 0, 0, 0, before, after)
        return F.pad(images, pad, value=0.0)
    side = min(h, w)
    y, x = (h - side) // 2, (w - side) // 2
    if crop_position == "top":
        y = 0
    elif crop_position == "bottom":
        y = h - side
    elif crop_position == "left":
        x = 0
    elif crop_position == "right":
        x = w - side
    return images[:, y:y + side, x:x + side, :]


def resize(images: torch.Tensor, size: int = CLIP_SIZE, interpolation: str = "LANCZOS") -> torch.Tensor:
    """Resize square ``images`` [B,H,W,C] to ``size``×``size`` with a PIL filter.

    Each channel is resized as a 32-bit float image, so no 8-bit rounding is added; results are clamped
    to 0..1 (LANCZOS and BICUBIC overshoot at edges).
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}; got '{interpolation}'")
    resample = Image.Resampling[interpolation]
    arrays = images.detach().to("cpu", torch.float32).numpy()
    out = np.empty((arrays.shape[0], size, size, arrays.shape[3]), dtype=np.float32)
    for b in range(arrays.shape[0]):
        for c in range(arrays.shape[3]):
            channel = Image.fromarray(np.ascontiguousarray(arrays[b, :, :, c]), mode="F")
            out[b, :, :, c] = np.asarray(channel.resize((size, size), resample=resample), dtype=np.float32)
    return torch.from_numpy(out).clamp_(0.0, 1.0)


def contrast_adaptive_sharpening(images: torch.Tensor, amount: float) -> torch.Tensor:
    """Contrast-adaptive sharpening (AMD FidelityFX CAS) of ``images`` [B,H,W,C], ``amount`` in 0..1.

    Each pixel gets a negative-lobe cross filter whose strength falls where the local 3×3 neighbourhood
    already has high contrast, so edges sharpen without ringing. 0 returns the input unchanged.
    """
    if amount <= 0:
        return images
    x = images.permute(0, 3, 1, 2)
    # replicate edges so border pixels are sharpened like the others
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    h, w = x.shape[2], x.shape[3]

    def at(dy: int, dx: int) -> torch.Tensor:
        return p[:, :, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    centre, up, down, left, right = at(0, 0), at(-1, 0), at(1, 0), at(0, -1), at(0, 1)
    cross = torch.stack([centre, up, down, left, right])
    diagonal = torch.stack([at(-1, -1), at(-1, 1), at(1, -1), at(1, 1)])
    # CAS uses the cross extrema plus the full 3×3 extrema (a softer, rounder estimate of local range)
    lo = cross.amin(0) + torch.minimum(cross.amin(0), diagonal.amin(0))
    hi = cross.amax(0) + torch.maximum(cross.amax(0), diagonal.amax(0))
    amplify = torch.sqrt(torch.clamp(torch.minimum(lo, 2.0 - hi) / hi.clamp_min(1e-6), 0.0, 1.0))
    peak = -1.0 / (8.0 - 3.0 * float(amount))          # lerp(8, 5, amount): stronger as amount grows
    weight = amplify * peak
    out = (centre + weight * (up + down + left + right)) / (1.0 + 4.0 * weight)
    return out.clamp(0.0, 1.0).permute(0, 2, 3, 1)


def prep_image(images: torch.Tensor, interpolation: str = "LANCZOS", crop_position: str = "center",
               sharpening: float = 0.0, size: int = CLIP_SIZE) -> torch.Tensor:
    """Square, resize to ``size`` (224) and optionally sharpen ``images`` [B,H,W,C] (0..1) → [B,size,size,C]."""
    if images.dim() != 4:
        raise ValueError(f"expected an IMAGE tensor [B,H,W,C]; got shape {tuple(images.shape)}")
    out = resize(square(images, crop_position), size, interpolation)
    return contrast_adaptive_sharpening(out, sharpening)
