"""Reference-noise images: the math behind IPAdapterNoise (an ``image_negative`` made from noise).

An adapter's uncond side is normally a blank image's features; feeding a noisy or scrambled version of
the reference instead (``image_negative``) pushes the result away from that noise and often cleans up
the image.  The base is the optional image (center-cropped to the target aspect and resized, 224 px by
default) or, as in the existing pack, a black image.  The types (``strength`` s in 0..1):

* ``fade``: ``lerp(image, U(0,1), s)``;
* ``dissolve``: every value is replaced by U(0,1) with probability s;
* ``gaussian``: ``image + N(0,1)·s``;
* ``shuffle``: an elastic displacement (per-pixel random offsets up to ``75·s`` px at 224, smoothed by a
  Gaussian of sigma ``(1-s)·3.5``, so pixels scramble more as s grows), both flips, then
  ``x·(1-n)+n`` with ``n = N(0,1)·0.75·s``;
* ``blur`` (ours; the pack only has the separate blur input): a Gaussian blur whose kernel grows to 33 px
  at s = 1.

The result is clamped to 0..1 and then blurred with a ``blur``-px kernel (made odd) when ``blur`` > 0.
Unlike the pack, whose shuffle always flips and distorts, strength 0 returns the base image unchanged for
every type.  Randomness comes only from a ``torch.Generator`` seeded with ``seed``: the same arguments
give the same image, whatever the global RNG state.  :func:`image_seed` derives a seed from the image's
content (the pack seeds from the image too), for a node without a seed input.
"""
from __future__ import annotations

import hashlib
from typing import Callable

import torch
import torch.nn.functional as F

NOISE_TYPES = ("fade", "dissolve", "gaussian", "shuffle", "blur")
SHUFFLE_ALPHA = 75.0       # displacement scale of the shuffle's elastic transform (pixels at 224 px, s = 1)
SHUFFLE_SIGMA = 3.5        # smoothing of the displacement field at s = 0 (none at s = 1)
SHUFFLE_NOISE = 0.75       # amplitude of the shuffle's multiplicative noise at s = 1
BLUR_TYPE_MAX_RADIUS = 16  # the blur type's kernel radius at s = 1


def image_seed(image: torch.Tensor) -> int:
    """A seed derived from the image content, for a node without a seed input.

    The pack seeds from ``int(sum(image))``, so images with about the same total brightness collide; a
    hash of the pixel values does not.
    """
    data = image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") & (2**63 - 1)


def make_noise(kind: str, strength: float, blur: int, image: torch.Tensor | None = None,
               size: tuple[int, int] = (224, 224), batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A noise IMAGE ``[B, height, width, 3]`` (0..1) of type ``kind`` (one of :data:`NOISE_TYPES`).

    ``image``: optional IMAGE [B,H,W,C] to noise (its batch size wins over ``batch``); without it the base is
    black.  ``size``: (height, width) of the output.  ``blur``: Gaussian blur kernel in pixels applied last
    (0 = none).  ``seed`` seeds a private generator: same arguments, same output.
    """
    if kind not in _KINDS:
        raise ValueError(f"noise type {kind!r} is not known; expected one of {list(NOISE_TYPES)}")
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"noise strength must be within 0..1, got {strength}")
    if int(blur) < 0:
        raise ValueError(f"noise blur must be 0 or more pixels, got {blur}")
    height, width = int(size[0]), int(size[1])
    if height < 1 or width < 1:
        raise ValueError(f"noise size must be positive (height, width), got {size}")
    base = _base_image(image, height, width, batch)
    generator = torch.Generator().manual_seed(int(seed))
    out = _KINDS[kind](base, float(strength), generator).clamp(0.0, 1.0)
    if int(blur) > 0:
        out = gaussian_blur(out, int(blur) | 1)  # an even kernel is made odd, as the pack does
    return out.permute(0, 2, 3, 1).contiguous()


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: float | None = None) -> torch.Tensor:
    """Separable Gaussian blur of ``x`` [B,C,H,W] with an odd ``kernel_size``; edges reflected.

    ``sigma`` defaults to the usual rule for a kernel size, ``0.3·((k-1)/2 - 1) + 0.8``.
    """
    if kernel_size % 2 == 0 or kernel_size < 1:
        raise ValueError(f"blur kernel size must be odd and positive, got {kernel_size}")
    if kernel_size == 1:
        return x
    if sigma is None:
        sigma = 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8
    radius = kernel_size // 2
    offsets = torch.arange(kernel_size, dtype=torch.float32) - radius
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights = (weights / weights.sum()).to(x.dtype)
    channels = x.shape[1]
    # Reflection needs the pad to be smaller than the side; tiny images fall back to repeating the edge.
    mode = "reflect" if radius < min(x.shape[-2:]) else "replicate"
    x = F.pad(x, (radius, radius, radius, radius), mode=mode)
    x = F.conv2d(x, weights.view(1, 1, kernel_size, 1).expand(channels, 1, kernel_size, 1), groups=channels)
    return F.conv2d(x, weights.view(1, 1, 1, kernel_size).expand(channels, 1, 1, kernel_size), groups=channels)


def _base_image(image: torch.Tensor | None, height: int, width: int, batch: int) -> torch.Tensor:
    """[B,3,height,width] float32: black, or ``image`` center-cropped to the aspect and resized."""
    if image is None:
        if batch < 1:
            raise ValueError(f"noise batch must be 1 or more, got {batch}")
        return torch.zeros(batch, 3, height, width)
    if image.dim() != 4:
        raise ValueError(f"noise image must be an IMAGE [B,H,W,C], got shape {list(image.shape)}")
    x = image.detach().float().cpu()
    x = x[..., :3] if x.shape[-1] >= 3 else x[..., :1].expand(*x.shape[:-1], 3)
    x = x.permute(0, 3, 1, 2)
    in_h, in_w = x.shape[-2:]
    if (in_h, in_w) == (height, width):
        return x.contiguous()
    # Center crop to the target aspect (a square at the default size, as the pack does), then resize.
    crop_h, crop_w = min(in_h, round(in_w * height / width)), min(in_w, round(in_h * width / height))
    top, left = (in_h - crop_h) // 2, (in_w - crop_w) // 2
    x = x[:, :, top:top + crop_h, left:left + crop_w]
    x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return x.clamp(0.0, 1.0)  # bicubic overshoots


def _fade(x: torch.Tensor, s: float, gen: torch.Generator) -> torch.Tensor:
    return torch.lerp(x, torch.rand(x.shape, generator=gen), s)


def _dissolve(x: torch.Tensor, s: float, gen: torch.Generator) -> torch.Tensor:
    chosen = torch.rand(x.shape, generator=gen) < s
    return torch.where(chosen, torch.rand(x.shape, generator=gen), x)


def _gaussian(x: torch.Tensor, s: float, gen: torch.Generator) -> torch.Tensor:
    return x + torch.randn(x.shape, generator=gen) * s


def _shuffle(x: torch.Tensor, s: float, gen: torch.Generator) -> torch.Tensor:
    if s == 0.0:
        return x
    batch, _, height, width = x.shape
    displacement = torch.rand((batch, 2, height, width), generator=gen) * 2 - 1
    sigma = (1.0 - s) * SHUFFLE_SIGMA
    if sigma > 0:
        displacement = gaussian_blur(displacement, int(8 * sigma + 1) | 1, sigma)
    # grid_sample works in normalized coordinates (2 units per side): alpha px at 224 px, scaled by s.
    scale = torch.tensor([2 * SHUFFLE_ALPHA / 224, 2 * SHUFFLE_ALPHA / 224]).view(1, 2, 1, 1) * s
    ys = torch.linspace(-1 + 1 / height, 1 - 1 / height, height)
    xs = torch.linspace(-1 + 1 / width, 1 - 1 / width, width)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([grid_x, grid_y], dim=-1).unsqueeze(0) + (displacement * scale).permute(0, 2, 3, 1)
    moved = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    moved = moved.flip(dims=(2, 3))
    noise = torch.randn(moved.shape, generator=gen) * (SHUFFLE_NOISE * s)
    return moved * (1 - noise) + noise


def _blur(x: torch.Tensor, s: float, gen: torch.Generator) -> torch.Tensor:
    return gaussian_blur(x, 2 * round(s * BLUR_TYPE_MAX_RADIUS) + 1)


_KINDS: dict[str, Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]] = {
    "fade": _fade, "dissolve": _dissolve, "gaussian": _gaussian, "shuffle": _shuffle, "blur": _blur,
}
