"""CONDITIONING lists made ready for the sampler, and the per-pixel blending of their predictions.

What follows ComfyUI (``comfy/samplers.py``: ``resolve_areas_and_cond_masks_multidim``,
``create_cond_with_same_area_if_none``, ``get_area_and_mult``, ``calc_cond_batch``; ``comfy/model_base.py``
``concat_cond``):

* every entry of a side (positive or negative) is run; its prediction is weighted per pixel by
  ``strength × mask × mask_strength`` (an entry without a mask covers everything with its strength), and the
  side's prediction is the weighted sum divided by the sum of weights (+1e-37);
* a mask (ConditioningSetMask) is resized bilinearly to the latent; "mask bounds" (``set_area_to_bounds``)
  crops the entry to the mask's bounding box (at least 8 latent pixels a side): the UNet then runs on that
  crop only; an area without a mask gets ComfyUI's 8-pixel feathered edges;
* an entry with an area on one side gets a twin on the other side, with the same area, mask, strength and
  control but the text of the smallest entry there that contains the area;
* ``start_percent`` / ``end_percent`` (ConditioningSetTimestepRange) switch an entry off outside
  ``[percent_to_sigma(end), percent_to_sigma(start)]``;
* 9-channel (inpainting) UNets get ``cat([x, mask, masked image latent])``: the entry's
  ``concat_mask`` / ``concat_latent_image`` if it has them, else the LATENT's noise_mask (rounded) and the
  LATENT itself, else an all-ones mask and the latent of a black image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from ..core.backends.diffusers import NoiseSchedule

COND, UNCOND = 0, 1
SIDE_NAMES = {COND: "positive", UNCOND: "negative"}
_REFUSED_KEYS = ("gligen", "hooks")
# ComfyUI's latent of an all-black image for SD1.5-style VAEs (scaled latents), fed to inpainting UNets
# when no mask is given.
_BLANK_INPAINT_LATENT = (0.8223, -0.6876, 0.6364, 0.1380)
_MIN_BOUNDS = 8  # "mask bounds" areas are at least 8 latent pixels a side
_FEATHER = 8


Area = tuple[int, int, int, int]  # (height, width, y, x) in latent pixels


@dataclass(frozen=True, eq=False)
class CondEntry:
    """One conditioning entry made ready for UNet batches of the latent's size."""

    side: int                        # COND or UNCOND (ComfyUI's cond_or_uncond value)
    context: torch.Tensor            # [B, tokens, D]
    added: dict | None               # SDXL: text_embeds [B, P], time_ids [B, 6]
    mult: torch.Tensor               # [B, 1, h, w] weights over the area (or the whole latent)
    area: Area | None
    sigma_range: tuple[float, float] | None  # (start, end): active while end <= sigma <= start
    control: Any                     # runtime.controlnet.ControlHint or None
    concat: torch.Tensor | None      # [B, 5, H, W] inpainting channels over the whole latent

    def active(self, sigma: float) -> bool:
        return self.sigma_range is None or self.sigma_range[1] <= sigma <= self.sigma_range[0]


def repeat_to_batch(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """Cut or tile ``tensor`` along dim 0 to ``batch`` rows (ComfyUI's repeat_to_batch_size)."""
    if tensor.shape[0] != batch:
        tensor = tensor.repeat(math.ceil(batch / tensor.shape[0]), *[1] * (tensor.ndim - 1))[:batch]
    return tensor


def resize_center(tensor: torch.Tensor, height: int, width: int, mode: str = "bilinear") -> torch.Tensor:
    """``[B,C,h,w]`` → ``[B,C,height,width]``: centre-crop to the target aspect, then resize with ``mode``
    (ComfyUI's ``common_upscale(..., mode, "center")``)."""
    old_h, old_w = tensor.shape[-2:]
    if (old_h, old_w) == (height, width):
        return tensor
    old_aspect, new_aspect = old_w / old_h, width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    return F.interpolate(tensor[..., y:old_h - y, x:old_w - x], size=(height, width), mode=mode)


def _resolve_area(area: Any, mask: torch.Tensor | None, bounds: bool, hw: tuple[int, int]) -> Area | None:
    if mask is not None and bounds:
        union = mask.abs().amax(dim=0)
        if not bool((union != 0).any()):
            return (_MIN_BOUNDS, _MIN_BOUNDS, 0, 0)  # an empty mask: the smallest area, weighted 0 anyway
        ys, xs = torch.where(union != 0)
        y, x = int(ys.min()), int(xs.min())
        area = (max(_MIN_BOUNDS, int(ys.max()) - y + 1), max(_MIN_BOUNDS, int(xs.max()) - x + 1), y, x)
    if area is None:
        return None
    if area[0] == "percentage":
        h, w, y, x = area[1:5]
        area = (max(1, round(h * hw[0])), max(1, round(w * hw[1])), round(y * hw[0]), round(x * hw[1]))
    h, w, y, x = (int(v) for v in area[:4])
    return (min(hw[0] - y, h), min(hw[1] - x, w), y, x)  # clamped to the latent as ComfyUI does


def crop(tensor: torch.Tensor, area: Area | None) -> torch.Tensor:
    """The area's part of a ``[..., H, W]`` tensor (all of it for None)."""
    if area is None:
        return tensor
    h, w, y, x = area
    return tensor[..., y:y + h, x:x + w]


def _feather(mult: torch.Tensor, area: Area, hw: tuple[int, int]) -> torch.Tensor:
    """ComfyUI's soft edges for an area without a mask: a linear ramp over up to 8 pixels on inner sides."""
    mult = mult.clone()
    h, w, y, x = area
    for dim, (size, offset, full) in enumerate(((h, y, hw[0]), (w, x, hw[1]))):
        axis = dim + 2
        ramp = min(_FEATHER, mult.shape[axis] // 4)
        if offset != 0:
            for t in range(ramp):
                mult.narrow(axis, t, 1).mul_((1.0 / ramp) * (t + 1))
        if size + offset < full:
            for t in range(ramp):
                mult.narrow(axis, size - 1 - t, 1).mul_((1.0 / ramp) * (t + 1))
    return mult


# ----------------------------------------------------------------------------------------------- entries
def _added(options: dict, which: str, index: int, batch: int, hw: tuple[int, int]) -> dict:
    pooled = options.get("pooled_output")
    if pooled is None:
        raise ValueError(f"KSampler: '{which}' conditioning entry {index} has no pooled_output, which an SDXL "
                         "model needs; encode the prompt with the SDXL checkpoint's CLIP")
    height, width = options.get("height", hw[0] * 8), options.get("width", hw[1] * 8)
    # diffusers' order: original_size (h, w) + crops_coords_top_left (h, w) + target_size (h, w)
    time_ids = torch.tensor([[height, width, options.get("crop_h", 0), options.get("crop_w", 0),
                              options.get("target_height", height), options.get("target_width", width)]],
                            dtype=torch.float32)
    return {"text_embeds": repeat_to_batch(pooled.to(torch.float32), batch), "time_ids": time_ids.repeat(batch, 1)}


def _inpaint_concat(options: dict, shape: torch.Size, latent_image: torch.Tensor | None,
                    denoise_mask: torch.Tensor | None) -> torch.Tensor:
    batch, (h, w) = shape[0], tuple(shape[2:])
    image = options.get("concat_latent_image")
    image = latent_image if image is None else image.to(torch.float32)
    mask = options.get("concat_mask", denoise_mask)
    if mask is None:
        ones = torch.ones(batch, 1, h, w)
        blank = torch.tensor(_BLANK_INPAINT_LATENT).view(1, 4, 1, 1).expand(batch, 4, h, w)
        return torch.cat([ones, blank], dim=1)
    mask = mask.to(torch.float32)
    mask = mask[:, :1] if mask.ndim == 4 else mask
    mask = resize_center(mask.reshape(-1, 1, *mask.shape[-2:]), h, w)
    image = repeat_to_batch(resize_center(image, h, w), batch)
    return torch.cat([repeat_to_batch(mask.round(), batch), image], dim=1)


def prepare_entries(conditioning: list, side: int, family: str, shape: torch.Size, schedule: NoiseSchedule,
                    in_channels: int = 4, latent_image: torch.Tensor | None = None,
                    denoise_mask: torch.Tensor | None = None) -> list[CondEntry]:
    """The entries of one side of a CONDITIONING list for a latent of ``shape`` [B,4,h,w]."""
    which = SIDE_NAMES[side]
    if not conditioning:
        raise ValueError(f"KSampler: the '{which}' conditioning is empty; connect a CLIPTextEncode output")
    batch, hw = shape[0], (int(shape[2]), int(shape[3]))
    entries = []
    for index, (cond, options) in enumerate(conditioning):
        refused = [k for k in _REFUSED_KEYS if options.get(k) is not None]
        if refused:
            raise NotImplementedError(
                f"KSampler: '{which}' conditioning entry {index} carries {', '.join(refused)}, which is not "
                "supported headless; remove the GLIGEN/hook node or run the workflow in ComfyUI")
        mask = options.get("mask")
        if mask is not None:
            mask = mask.to(torch.float32)
            mask = mask.reshape(-1, 1, *mask.shape[-2:])
            if tuple(mask.shape[-2:]) != hw:
                mask = F.interpolate(mask, size=hw, mode="bilinear")
            mask = mask[:, 0]
        area = _resolve_area(options.get("area"), mask, bool(options.get("set_area_to_bounds")), hw)
        if mask is not None:
            mult = repeat_to_batch(crop(mask, area), batch)[:, None] * float(options.get("mask_strength", 1.0))
        else:
            mult = torch.ones(batch, 1, *(area[:2] if area else hw))
            if area is not None:
                mult = _feather(mult, area, hw)
        mult = mult * float(options.get("strength", 1.0))
        sigma_range = None
        if "start_percent" in options or "end_percent" in options:
            sigma_range = (schedule.percent_to_sigma(options.get("start_percent", 0.0)),
                           schedule.percent_to_sigma(options.get("end_percent", 1.0)))
        concat = (_inpaint_concat(options, shape, latent_image, denoise_mask) if in_channels == 9 else None)
        added = _added(options, which, index, batch, hw) if family == "sdxl" else None
        entries.append(CondEntry(side, repeat_to_batch(cond.to(torch.float32), batch), added, mult, area,
                                 sigma_range, options.get("control"), concat))
    return entries


def _inside(inner: Area, outer: Area) -> bool:
    return (inner[2] >= outer[2] and inner[3] >= outer[3]
            and inner[0] + inner[2] <= outer[0] + outer[2] and inner[1] + inner[3] <= outer[1] + outer[3])


def pair_areas(cond: list[CondEntry], uncond: list[CondEntry]) -> None:
    """Give every area entry of one side a twin with the same area on the other side (in place)."""
    for source, target in ((cond, uncond), (uncond, cond)):
        for entry in list(source):
            if entry.area is None:
                continue
            smallest = None
            for other in target:
                if other.area is not None and _inside(entry.area, other.area):
                    if (smallest is None or smallest.area is None
                            or math.prod(smallest.area[:2]) > math.prod(other.area[:2])):
                        smallest = other
                elif other.area is None and smallest is None:
                    smallest = other
            if smallest is None or smallest.area == entry.area:
                continue
            target.append(replace(entry, side=smallest.side, context=smallest.context, added=smallest.added,
                                  concat=smallest.concat))


def unet_batches(entries: list[CondEntry]) -> list[list[CondEntry]]:
    """Entries that can share one UNet call (same area, same control), in first-seen order."""
    groups: dict[tuple, list[CondEntry]] = {}
    for entry in entries:
        groups.setdefault((entry.area, id(entry.control)), []).append(entry)
    return list(groups.values())


def cat_contexts(contexts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along the batch; token counts differ (77 vs 154) → tile each to their least common
    multiple, which leaves cross-attention unchanged (repeated keys keep the softmax weights' ratios)."""
    tokens = math.lcm(*[c.shape[1] for c in contexts])
    return torch.cat([c.repeat(1, tokens // c.shape[1], 1) for c in contexts], dim=0)


class Blend:
    """Per-pixel weighted sum of one side's predictions: ``sum(p·m) / (sum(m) + 1e-37)``."""

    def __init__(self, like: torch.Tensor):
        self.total = torch.zeros_like(like)
        self.weight = torch.zeros(like.shape[0], 1, *like.shape[2:], dtype=like.dtype, device=like.device)

    def add(self, prediction: torch.Tensor, mult: torch.Tensor, area: Area | None) -> None:
        mult = mult.to(prediction.device, prediction.dtype)
        crop(self.total, area).add_(prediction * mult)
        crop(self.weight, area).add_(mult)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(blended prediction, coverage): coverage is ``sum(m) / (sum(m) + 1e-37)``, 1 wherever an entry
        had weight and 0 where none had, as the share of ``x`` in ComfyUI's blend of x0 predictions."""
        denominator = self.weight + 1e-37
        return self.total / denominator, self.weight / denominator
