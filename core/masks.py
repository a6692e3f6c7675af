"""Attention masks for IP-Adapter: a mask of any size → each cross-attention layer's token weights.

An IP-Adapter mask multiplies only the adapter's image-attention output (``ImageAttentionTerm.mask``,
``[B, L, 1]``); the text attention is untouched.  A layer sees the latent as a grid of ``h_l x w_l`` query
tokens (``L = h_l * w_l``): the latent ``h x w`` halved once per UNet down level, rounding up (a stride-2
conv with padding 1 gives ``ceil(n / 2)``).  A layer only knows ``L``, so the grid is recovered from ``L`` and
an aspect ratio, as diffusers and the ComfyUI IP-Adapter pack both do.

Two downsampling methods, each reproducing its origin exactly:

``"diffusers"`` (default; the diffusers-equality path, ``IPAdapterMaskProcessor.downsample``)
    aspect ratio from the *mask's own* height/width; ``mask_h = int(sqrt(L / ratio))`` (+1 when it does not
    divide ``L``), ``mask_w = L // mask_h``; **bicubic** resize; a grid that does not multiply out to ``L`` is
    zero-padded / truncated **at the end** of the token sequence.  Masks should have the output's aspect
    ratio (``prepare_masks`` resizes them to the output size, as diffusers' processor does).
``"ipadapter_plus"`` (the ComfyUI pack's ``attn_mask``)
    aspect ratio from the *latent*: ``f = sqrt(h * w / L)``, ``mask_h = int(h / f)`` (+1 when it does not
    divide ``L``), ``mask_w = L // mask_h``; **bilinear** resize, so a mask of any size or aspect ratio is
    stretched over the latent; a mismatching grid is zero-padded **symmetrically** / **center-cropped**.

Both formulas give the exact UNet grid for outputs whose sides are multiples of 64 px (checked in the tests
for 512x512, 512x768, 832x1216 and 1344x768 on every SD1.5 and SDXL layer) but not always otherwise: the
conv rounding (ceil) changes the deeper grids' aspect ratio, and both formulas miss for about 8% of the
(latent size, level) pairs with latent sides 8..259 (e.g. a 125x124 latent: level 1 is 63x62, the formulas
say 62x63 and the mask lands transposed).  So by default (``exact_grid=True``) the grid is first looked up
among the latent's true UNet grids (:func:`unet_grid`, one per level, unique by token count); the method's
formula is only the fallback (a layer that is no UNet level, or no latent size given).  Where the formula
is right this changes nothing; a mask of another aspect ratio is then stretched onto the true grid, also
with ``"diffusers"`` (which itself would pad a wrong grid).  ``exact_grid=False`` reproduces the origin bit
for bit, misses included.  When the backend knows a layer's grid (ComfyUI passes the transformer's
activations shape) it can pass ``grid=``.

Which to use: the diffusers-equality path (masks from :func:`prepare_masks`, output-sized) uses
``"diffusers"``; the apply nodes' ``attn_mask`` (any size, as the pack documents) is the pack's behaviour,
``"ipadapter_plus"``.

Batches: a mask batch of 1 is used for every batch item; a batch equal to the query batch is used as is; a
batch equal to the prompt batch (query batch / ``chunks``, the cond/uncond halves) is tiled over the chunks.
Anything else is an error naming the sizes (the pack silently repeats the last mask or truncates).
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

DOWNSAMPLE_METHODS: tuple[str, ...] = ("diffusers", "ipadapter_plus")
PREPARE_RESAMPLING: tuple[str, ...] = ("lanczos", "nearest")
VAE_SCALE_FACTOR = 8  # diffusers' IPAdapterMaskProcessor rounds output sizes down to this multiple

# Per method: the resize mode and whether a grid of the wrong area is fixed symmetrically (the pack) or at
# the end of the token sequence (diffusers).  Data, not branches.
_RESIZE_MODE = {"diffusers": "bicubic", "ipadapter_plus": "bilinear"}
_SYMMETRIC_FIX = {"diffusers": False, "ipadapter_plus": True}
_MAX_LEVELS = 8  # deeper than any UNet; the search stops at a 1x1 grid anyway


def check_method(method: str) -> str:
    """Return ``method`` if it is one of :data:`DOWNSAMPLE_METHODS`, else raise a ValueError naming them."""
    if method not in DOWNSAMPLE_METHODS:
        raise ValueError(f"mask downsample method {method!r} is not known; expected one of "
                         f"{list(DOWNSAMPLE_METHODS)}")
    return method


def as_mask_batch(mask: torch.Tensor, what: str = "attn_mask") -> torch.Tensor:
    """A MASK as float32 ``[N, H, W]``; accepts ``[H, W]``, ``[N, H, W]`` and ``[N, 1, H, W]``."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{what}: expected a MASK tensor, got {type(mask).__name__}")
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    elif mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim != 3 or mask.shape[-1] == 0 or mask.shape[-2] == 0 or mask.shape[0] == 0:
        raise ValueError(f"{what}: expected a mask of shape [H, W], [N, H, W] or [N, 1, H, W], got "
                         f"{list(mask.shape)}")
    return mask.to(torch.float32)


def token_grid(query_len: int, size_hw: Sequence[int], method: str = "diffusers") -> tuple[int, int]:
    """The ``(h_l, w_l)`` token grid of a layer with ``query_len`` tokens, from an aspect ratio.

    ``size_hw`` is the (height, width) whose aspect ratio is used: the mask's for ``"diffusers"``, the
    latent's for ``"ipadapter_plus"`` (see the module docstring).  The result need not multiply out to
    ``query_len`` when the aspect ratio is not the latent's; :func:`layer_mask` then pads or crops.
    """
    check_method(method)
    if query_len <= 0:
        raise ValueError(f"query_len must be positive, got {query_len}")
    height, width = int(size_hw[0]), int(size_hw[1])
    if method == "diffusers":
        grid_h = int(math.sqrt(query_len / (width / height)))
    else:
        grid_h = int(height / math.sqrt(height * width / query_len))
    grid_h = max(grid_h, 1)  # an extreme aspect ratio must not divide by zero below
    grid_h += int(query_len % grid_h != 0)
    return grid_h, query_len // grid_h


def unet_grid(latent_hw: Sequence[int], level: int) -> tuple[int, int]:
    """The true token grid of a UNet level: the latent halved ``level`` times, rounding up (stride-2 convs)."""
    height, width = int(latent_hw[0]), int(latent_hw[1])
    for _ in range(level):
        height, width = -(-height // 2), -(-width // 2)
    return height, width


def layer_grid(query_len: int, latent_hw: Sequence[int] | None, mask_hw: Sequence[int],
               method: str = "diffusers", exact_grid: bool = True) -> tuple[int, int]:
    """The token grid a mask is resized to at a layer with ``query_len`` tokens (see the module docstring).

    With ``exact_grid`` and a ``latent_hw``, the latent's UNet level with ``query_len`` tokens wins;
    otherwise (or when no level matches) :func:`token_grid` with the method's aspect ratio: the mask's
    (``mask_hw``) for ``"diffusers"``, the latent's for ``"ipadapter_plus"``.
    """
    check_method(method)
    if exact_grid and latent_hw is not None:
        for level in range(_MAX_LEVELS):
            grid = unet_grid(latent_hw, level)
            if grid[0] * grid[1] == query_len:
                return grid
            if grid == (1, 1):
                break
    if method == "diffusers":
        return token_grid(query_len, mask_hw, method)
    if latent_hw is None:
        raise ValueError("the 'ipadapter_plus' mask method needs the latent size (latent_hw)")
    return token_grid(query_len, latent_hw, method)


def match_batch(mask: torch.Tensor, batch: int, chunks: int = 1, what: str = "attn_mask") -> torch.Tensor:
    """Match a mask batch ``[N, ...]`` to a query batch of ``batch`` = ``chunks`` x prompt batch.

    1 mask → every item; ``batch`` masks → as is; ``batch // chunks`` masks (one per latent) → tiled over
    the cond/uncond chunks, in the chunks' order.  Any other count raises a ValueError naming the sizes.
    """
    count = mask.shape[0]
    if count == batch:
        return mask
    if count == 1:
        return mask.expand(batch, *mask.shape[1:])
    if chunks > 1 and batch % chunks == 0 and count == batch // chunks:
        return mask.repeat(chunks, *([1] * (mask.ndim - 1)))
    per_prompt = batch // chunks if chunks > 0 and batch % chunks == 0 else batch
    raise ValueError(f"{what}: {count} masks do not match the batch of {per_prompt} latent(s)"
                     + (f" ({batch} rows with cond/uncond)" if per_prompt != batch else "")
                     + f"; give 1 mask (used for every latent) or {per_prompt} masks (one per latent)")


def _fix_length(flat: torch.Tensor, query_len: int, symmetric: bool) -> torch.Tensor:
    """Pad with zeros or crop ``flat`` ``[B, n]`` to ``[B, query_len]`` (symmetric: the pack; else diffusers)."""
    have = flat.shape[1]
    if have == query_len:
        return flat
    warnings.warn(f"the attention mask's aspect ratio does not match the latent's: its {have}-token grid "
                  f"is {'padded' if have < query_len else 'cropped'} to the layer's {query_len} tokens; give "
                  f"a mask with the output image's aspect ratio", UserWarning, stacklevel=3)
    if have < query_len:
        missing = query_len - have
        before = missing // 2 if symmetric else 0
        return F.pad(flat, (before, missing - before), value=0.0)
    start = (have - query_len) // 2 if symmetric else 0
    return flat[:, start:start + query_len]


def layer_mask(mask: torch.Tensor, query_len: int, latent_hw: Sequence[int] | None, batch: int,
               dtype: torch.dtype = torch.float32, device: torch.device | str | None = None, *,
               method: str = "diffusers", chunks: int = 1, grid: Sequence[int] | None = None,
               exact_grid: bool = True, what: str = "attn_mask") -> torch.Tensor:
    """Resize ``mask`` to one attention layer's tokens: ``[batch, query_len, 1]`` in ``dtype`` on ``device``.

    ``mask``: ``[H, W]``, ``[N, H, W]`` or ``[N, 1, H, W]``, any size, values 0..1.  ``query_len``: the
    layer's query tokens.  ``latent_hw``: the latent (height, width) being denoised.  ``batch``: the query
    batch, made of ``chunks`` equal parts (cond/uncond) — see :func:`match_batch`.  ``method``: see the
    module docstring.  ``grid``: the layer's (h, w) when the caller knows it (skips the derivation);
    ``exact_grid``: see :func:`layer_grid`.  The result goes into ``ImageAttentionTerm.mask``: it
    multiplies that adapter's output only.
    """
    check_method(method)
    masks = as_mask_batch(mask, what)
    if grid is not None:
        grid_h, grid_w = int(grid[0]), int(grid[1])
    else:
        grid_h, grid_w = layer_grid(query_len, latent_hw, masks.shape[-2:], method, exact_grid)
    mode = _RESIZE_MODE[method]
    if method == "diffusers":
        # diffusers resizes the masks as channels of one image; kept so the numbers are the same.
        resized = F.interpolate(masks.unsqueeze(0), size=(grid_h, grid_w), mode=mode).squeeze(0)
    else:
        resized = F.interpolate(masks.unsqueeze(1), size=(grid_h, grid_w), mode=mode).squeeze(1)
    resized = match_batch(resized, batch, chunks, what)
    flat = _fix_length(resized.reshape(batch, grid_h * grid_w), query_len, _SYMMETRIC_FIX[method])
    return flat.unsqueeze(-1).to(dtype=dtype, device=device)


def image_layer_masks(masks: torch.Tensor, query_len: int, latent_hw: Sequence[int] | None, batch: int,
                      dtype: torch.dtype = torch.float32, device: torch.device | str | None = None, *,
                      method: str = "diffusers", chunks: int = 1, grid: Sequence[int] | None = None,
                      exact_grid: bool = True, what: str = "attn_mask") -> torch.Tensor:
    """One mask per reference image of one adapter → ``[num_images, batch, query_len, 1]``.

    ``masks``: ``[num_images, H, W]`` or diffusers' per-adapter layout ``[1, num_images, H, W]``.  Each
    image's mask applies to every latent in the batch (as diffusers does).

    How it combines with the images' tokens (diffusers' masked path): a masked adapter does *not* attend to
    all images' tokens in one softmax.  Image ``i`` gets its own term — keys/values of image ``i``'s tokens
    only, weight ``scale[i]``, mask ``result[i]`` — and the terms are added to the output:
    ``out = text + sum_i scale[i] * Attn(q, K_i, V_i) * mask_i``.  (Unmasked, diffusers and the pack
    concatenate every image's tokens into one attention instead.)
    """
    stack = masks
    if isinstance(stack, torch.Tensor) and stack.ndim == 4 and stack.shape[0] == 1:
        stack = stack[0]  # diffusers' [1, num_images, H, W]
    stack = as_mask_batch(stack, what)
    return torch.stack([
        layer_mask(stack[i:i + 1], query_len, latent_hw, batch, dtype, device, method=method, chunks=chunks,
                   grid=grid, exact_grid=exact_grid, what=f"{what}[{i}]")
        for i in range(stack.shape[0])
    ])


def prepare_masks(mask: torch.Tensor, height: int, width: int, resample: str = "lanczos") -> torch.Tensor:
    """What diffusers' ``IPAdapterMaskProcessor().preprocess(masks, height=, width=)`` does, on a MASK.

    The size is rounded down to a multiple of 8 (as diffusers does); each mask is resized to it and
    binarized (``< 0.5`` → 0, ``>= 0.5`` → 1).  ``resample="lanczos"`` is diffusers' path for PIL masks: the
    mask as an 8-bit grayscale image, PIL Lanczos resize, ``/ 255`` (equal to diffusers given the 8-bit
    images the mask was loaded from).  ``"nearest"`` is diffusers' path for tensor masks
    (``F.interpolate``'s default nearest mode).  Returns float32 ``[N, height, width]``.
    """
    if resample not in PREPARE_RESAMPLING:
        raise ValueError(f"mask resample {resample!r} is not known; expected one of {list(PREPARE_RESAMPLING)}")
    masks = as_mask_batch(mask, "mask")
    out_h = int(height) - int(height) % VAE_SCALE_FACTOR
    out_w = int(width) - int(width) % VAE_SCALE_FACTOR
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"mask output size must be at least {VAE_SCALE_FACTOR}x{VAE_SCALE_FACTOR} px, got "
                         f"width {width}, height {height}")
    if resample == "nearest":
        resized = F.interpolate(masks.unsqueeze(1), size=(out_h, out_w)).squeeze(1)
    else:
        resized = torch.stack([_lanczos(m, out_h, out_w) for m in masks.cpu()]).to(masks.device)
    return torch.where(resized >= 0.5, 1.0, 0.0).to(torch.float32)


def _lanczos(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """One ``[H, W]`` mask through an 8-bit grayscale PIL image, Lanczos-resized, back to 0..1 floats."""
    levels = (mask.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()
    image = Image.fromarray(levels).resize((width, height), resample=Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(image).astype(np.float32) / 255.0)


def to_diffusers_layout(masks: torch.Tensor) -> torch.Tensor:
    """``[num_images, H, W]`` masks of one adapter → diffusers' ``ip_adapter_masks`` entry ``[1, N, H, W]``."""
    return as_mask_batch(masks, "mask").unsqueeze(0)
