"""The Python API: attach an IP-Adapter to a diffusers pipeline.

::

    from ipadapter_nodes import attach
    handle = attach(pipe, "models/ipadapter/ip-adapter_sd15.safetensors",
                    image_encoder="models/clip_vision/CLIP-ViT-H-14")   # a folder or a single file
    handle.set_image(image, weight=0.8)                                  # PIL, numpy, IMAGE tensor, or a list
    handle.set_image(image, weight_type="style transfer precise")        # the node pack's weight types, or
    handle.set_image(image, weight_type={"up": {"block_0": [0.0, 1.0, 0.0]}})  # InstantStyle block scales
    handle.set_image([face1, face2], weight=[0.7, 0.7], masks=masks)     # = diffusers' ip_adapter_masks
    images = pipe("a photo", num_inference_steps=30).images             # uses the adapter
    handle.detach()                                                      # the pipeline is as before

Works with any pipeline that calls a ``UNet2DConditionModel`` (StableDiffusion / StableDiffusionXL, their
img2img and inpaint variants, ...).  Our attention processors are installed on the UNet's cross-attention
layers at ``attach`` and removed at ``detach``; a forward pre-hook on the UNet reads each call's timestep
(-> sigma, for ``start_at``/``end_at``) and whether the batch is a classifier-free-guidance batch
(``[uncond, cond]``, diffusers' order).  Several ``attach`` calls on one pipeline stack their adapters.

This module imports diffusers/transformers only inside functions, so the pack imports without them.
"""
from __future__ import annotations

import os
import weakref
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .application import Application
from .backends.diffusers import UNetPatch, check_fits, cross_attention_layers
from .embeds import UNCOND_MODES, Embeds, combine_embeds, encode_for_adapter


class _UNetHook:
    """One UNet's patch and pre-hook, shared by every handle attached to it."""

    def __init__(self, pipe: Any, unet: Any):
        config = dict(getattr(getattr(pipe, "scheduler", None), "config", {}) or {})
        self.patch = UNetPatch(unet, config or None)
        self.pipe_ref = weakref.ref(pipe)
        self.handles: list[AdapterHandle] = []
        self.patch.install()
        self.hook = unet.register_forward_pre_hook(self._before_unet, with_kwargs=True)

    def _before_unet(self, module: Any, args: tuple, kwargs: dict) -> None:
        sample = kwargs.get("sample", args[0] if args else None)
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        state = self.patch.state
        schedule = self.patch.schedule
        if timestep is None or schedule is None:
            state.sigma = None  # no schedule to read: every application counts as active
        else:
            state.sigma = schedule.sigma(float(torch.as_tensor(timestep).flatten()[0]))
        pipe = self.pipe_ref()
        guided = bool(getattr(pipe, "do_classifier_free_guidance", False)) if pipe is not None else False
        # diffusers concatenates [uncond, cond] for classifier-free guidance
        state.cond_or_uncond = [1, 0] if guided and sample is not None and sample.shape[0] % 2 == 0 else [0]

    def refresh(self) -> None:
        self.patch.set_applications([h.application for h in self.handles if h.application is not None])

    def close(self) -> None:
        self.hook.remove()
        self.patch.remove()


_HOOKS: "weakref.WeakKeyDictionary[Any, _UNetHook]" = weakref.WeakKeyDictionary()


def _load_adapter(adapter: Any) -> Any:
    if isinstance(adapter, (str, os.PathLike)):
        from .adapter import load_adapter

        return load_adapter(adapter)
    if hasattr(adapter, "spec") and hasattr(adapter, "to_k_ip"):
        return adapter
    raise TypeError(f"attach: expected an IP-Adapter file path or a loaded IPAdapter, got {type(adapter).__name__}")


def _load_encoder(image_encoder: Any) -> Any:
    if image_encoder is None:
        return None
    from .encode import as_clip_vision, load_clip_vision

    if isinstance(image_encoder, (str, os.PathLike)):
        return load_clip_vision(image_encoder)
    return as_clip_vision(image_encoder)


def _one_image(image: Any) -> torch.Tensor:
    """A PIL image, numpy array (HWC / BHWC, uint8 or 0..1 floats) or IMAGE tensor as IMAGE [B,H,W,3]."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        array = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
        image = torch.from_numpy(array)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"set_image: expected PIL images, numpy arrays or IMAGE tensors, got {type(image).__name__}")
    image = image.float()
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"set_image: expected an image [H,W,C] or batch [B,H,W,C] with C=3, got {tuple(image.shape)}")
    if image.shape[-1] == 1:
        image = image.expand(*image.shape[:3], 3)
    return image[..., :3].cpu()


def _image_batches(images: Any) -> list[torch.Tensor]:
    """Reference images grouped into IMAGE batches of equal size (one per size, in order)."""
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ValueError("set_image: no image given")
    batches: list[torch.Tensor] = []
    for tensor in map(_one_image, items):
        if batches and batches[-1].shape[1:] == tensor.shape[1:]:
            batches[-1] = torch.cat([batches[-1], tensor], dim=0)
        else:
            batches.append(tensor)
    return batches


def _mask_stack(masks: Any) -> torch.Tensor:
    """Per-image masks as float32 ``[N, H, W]``: a tensor ``[N,H,W]``/``[1,N,H,W]``/``[N,1,H,W]``/``[H,W]``, or a
    list of PIL images (as grayscale), arrays or tensors (0..1; uint8 arrays are divided by 255)."""
    if isinstance(masks, torch.Tensor):
        stack = masks.float()
        if stack.ndim == 4 and stack.shape[1] == 1:
            stack = stack[:, 0]        # IPAdapterMaskProcessor.preprocess output [N, 1, H, W]
        elif stack.ndim == 4 and stack.shape[0] == 1:
            stack = stack[0]           # diffusers' per-adapter layout [1, N, H, W]
        return stack.unsqueeze(0) if stack.ndim == 2 else stack
    items = list(masks) if isinstance(masks, (list, tuple)) else [masks]
    planes = []
    for item in items:
        if hasattr(item, "convert") and hasattr(item, "size"):  # PIL
            item = np.asarray(item.convert("L"))
        if isinstance(item, np.ndarray):
            item = torch.from_numpy(item.astype(np.float32) / 255.0 if item.dtype == np.uint8 else
                                    item.astype(np.float32))
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"set_image: masks must be tensors, numpy arrays or PIL images, got {type(item).__name__}")
        planes.append(_mask_stack(item))
    if any(p.shape[1:] != planes[0].shape[1:] for p in planes):
        raise ValueError(f"set_image: the masks have different sizes {[list(p.shape[1:]) for p in planes]}; give "
                         "them all the output's size (core.masks.prepare_masks or IPAdapterMaskProcessor)")
    return torch.cat(planes, dim=0)


class AdapterHandle:
    """One adapter attached to a pipeline; ``set_image`` chooses the references, ``detach`` removes it."""

    def __init__(self, adapter: Any, clip_vision: Any, uncond: str, hook: _UNetHook):
        self.adapter = adapter
        self.clip_vision = clip_vision
        self.uncond = uncond
        self.application: Application | None = None
        self._hook: _UNetHook | None = hook

    @property
    def attached(self) -> bool:
        return self._hook is not None

    def set_image(self, image_or_list: Any, weight: float | Sequence[float] = 1.0,
                  weight_type: str | Mapping[str, Any] = "linear", start_at: float = 0.0, end_at: float = 1.0,
                  embeds_scaling: str = "V only", *, image_negative: Any = None,
                  face_embeds: torch.Tensor | None = None, faceid_v2_weight: float | None = None,
                  unfold_batch: bool = False, masks: Any = None, boost: float | None = None) -> "AdapterHandle":
        """Use these reference image(s) from the next pipeline call on.

        Several images concatenate their tokens (every generated image sees all of them; with
        ``unfold_batch`` image i drives latent i).  ``weight_type`` is one of the node pack's weight types
        (``core.weighting.WEIGHT_TYPES``, the "precise" ones included, ``boost`` being their style /
        composition boost), or an InstantStyle block-scales dict as diffusers' ``set_ip_adapter_scale`` takes
        it (``{"up": {"block_0": [0.0, 1.0, 0.0]}}``), multiplied by ``weight``.

        ``masks`` (one per reference image: a MASK tensor ``[N,H,W]``, diffusers' ``[1,N,H,W]`` or
        ``IPAdapterMaskProcessor`` output ``[N,1,H,W]``, or a list of PIL images / arrays, values 0..1) is
        diffusers' ``cross_attention_kwargs={"ip_adapter_masks": ...}``: each image attends on its own and only
        inside its mask.  Binarize and size them to the output as diffusers' ``IPAdapterMaskProcessor`` does
        (``core.masks.prepare_masks``).  ``weight`` may then be a list with one scale per image, as
        ``set_ip_adapter_scale([[0.7, 0.7]])``; with ``unfold_batch`` a list gives one weight per latent.

        FaceID-type adapters take ``face_embeds`` [N,512] (and, for FaceID-Plus, the face crops as the images;
        ``faceid_v2_weight`` switches on the v2 shortcut).  Returns the handle.
        """
        if self._hook is None:
            raise RuntimeError("this IP-Adapter handle was detached; call attach() again")
        embeds = self._encode(image_or_list, image_negative, face_embeds)
        image_masks = None if masks is None else _mask_stack(masks)
        weights = [float(w) for w in weight] if isinstance(weight, (list, tuple)) else [float(weight)]
        if not weights:
            raise ValueError("set_image: the weight list is empty")
        image_weights = None
        if image_masks is not None and len(weights) > 1:
            image_weights, weights = tuple(weights), [1.0]  # one scale per masked image
        elif len(weights) > 1 and not unfold_batch and len(set(weights)) > 1:
            raise ValueError(f"set_image: {len(weights)} different weights need either masks (one scale per "
                             "masked image) or unfold_batch=True (one weight per latent)")
        fields = self._weight_fields(weight_type, weights if unfold_batch else weights[:1], boost)
        self.application = Application(
            adapter=self.adapter, embeds=embeds, weight=weights[0], start_at=float(start_at),
            end_at=float(end_at), embeds_scaling=embeds_scaling, unfold_batch=unfold_batch,
            faceid_v2_weight=faceid_v2_weight, image_masks=image_masks, image_weights=image_weights,
            mask_method="diffusers", **fields,
        )
        self._hook.refresh()
        return self

    def _weight_fields(self, weight_type: str | Mapping[str, Any], frames: list[float],
                       boost: float | None) -> dict:
        """Application weight fields for ``weight_type`` at each frame weight (one frame: no per-frame table)."""
        from .block_scales import block_scales_to_layer_weights
        from .weighting import LayerWeights, layer_weights

        family = self.adapter.spec.family
        if isinstance(weight_type, Mapping):
            if boost is not None:
                raise ValueError("set_image: boost only applies to the precise weight types, not to block scales")
            scales = block_scales_to_layer_weights(weight_type, family)
            tables = [LayerWeights(tuple(w * f for w in scales)) for f in frames]
        elif weight_type == "linear" and boost is None and len(frames) == 1:
            return {}
        else:
            tables = [layer_weights(weight_type, f, family, boost=boost) for f in frames]
        if len(tables) == 1:
            return dict(layer_weights=tables[0].cond, uncond_layer_weights=tables[0].uncond)
        swapped = any(t.uncond is not None for t in tables)
        return dict(frame_layer_weights=tuple(t.cond for t in tables),
                    frame_uncond_layer_weights=tuple(t.uncond or (0.0,) * len(t.cond) for t in tables)
                    if swapped else None)

    def _encode(self, images: Any, image_negative: Any, face_embeds: torch.Tensor | None) -> Embeds:
        spec = self.adapter.spec
        negative = None if image_negative is None else torch.cat(_image_batches(image_negative), dim=0)
        if images is None:
            return encode_for_adapter(self.clip_vision, spec, None, negative, self.uncond, face_embeds=face_embeds)
        parts = [encode_for_adapter(self.clip_vision, spec, batch, negative, self.uncond, face_embeds=face_embeds)
                 for batch in _image_batches(images)]
        return combine_embeds(parts, "concat")

    def detach(self) -> None:
        """Remove this adapter; the last one to go restores the UNet's processors and removes the hook."""
        hook, self._hook = self._hook, None
        if hook is None:
            return
        hook.handles.remove(self)
        if hook.handles:
            hook.refresh()
            return
        hook.close()
        unet = hook.patch.unet
        if unet is not None:
            _HOOKS.pop(unet, None)

    def __enter__(self) -> "AdapterHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()


def attach(pipe: Any, adapter: Any, image_encoder: Any = None, *, uncond: str = "diffusers") -> AdapterHandle:
    """Attach an IP-Adapter to a diffusers pipeline (its ``unet``); returns a handle.

    ``adapter``: an IP-Adapter file (``.safetensors``/``.bin``) or a loaded ``IPAdapter``.
    ``image_encoder``: a CLIP vision folder or single file, or a loaded encoder; None uses the pipeline's own
    ``image_encoder`` if it has one (FaceID adapters without a CLIP branch need none).
    ``uncond``: how the negative image features are made when no negative image is given, ``"diffusers"``
    (default, as diffusers' pipelines) or ``"nodes"`` (as the ComfyUI node pack).
    """
    if uncond not in UNCOND_MODES:
        raise ValueError(f"attach: uncond {uncond!r} is not known; expected one of {list(UNCOND_MODES)}")
    unet = getattr(pipe, "unet", None)
    if unet is None or not hasattr(unet, "attn_processors"):
        raise TypeError(f"attach: {type(pipe).__name__} has no diffusers UNet (pipe.unet); IP-Adapter needs a "
                        "UNet2DConditionModel pipeline such as StableDiffusionPipeline or StableDiffusionXLPipeline")
    loaded = _load_adapter(adapter)
    hook = _HOOKS.get(unet)
    check_fits(loaded, hook.patch.layers if hook else cross_attention_layers(unet))
    if hook is None:
        hook = _HOOKS[unet] = _UNetHook(pipe, unet)
    if image_encoder is None:  # a pipeline that already carries an image encoder lends it
        image_encoder = getattr(pipe, "image_encoder", None)
    handle = AdapterHandle(loaded, _load_encoder(image_encoder), uncond, hook)
    hook.handles.append(handle)
    return handle

