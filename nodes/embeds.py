"""Embeds nodes: IPAdapterEmbeds (+Batch), IPAdapterEncoder, IPAdapterCombineEmbeds, IPAdapterNoise,
IPAdapterSaveEmbeds, IPAdapterLoadEmbeds.

An EMBEDS value is a ``core.embeds.Embeds`` (encoder features of the references, cond and uncond).  Files are
written as ``.safetensors`` and read, also from the existing pack's ``.ipadpt`` and diffusers' layout, only
through the safe readers of ``core.embeds_io``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os

import torch

from ..core import apply as engine
from ..core import embeds as embeds_core
from ..core import embeds_io, enhancer, folders, noise
from ..core.attention import fit_batch
from . import inputs

COMBINE_METHODS = ("concat", "add", "subtract", "average", "norm average", "max", "min")
EMBEDS_EXTENSIONS = (".ipadpt", ".safetensors")


def _adapter_and_encoder(ipadapter, clip_vision, node: str):
    """(adapter, clip_vision or None): like ``unpack_pipeline`` but the encoder may be missing."""
    if isinstance(ipadapter, dict) and "ipadapter" in ipadapter and clip_vision is None:
        clip_vision = (ipadapter.get("clipvision") or {}).get("model")
    if clip_vision is None:
        adapter = ipadapter["ipadapter"].get("model") if isinstance(ipadapter, dict) and "ipadapter" in ipadapter \
            else ipadapter
        return adapter, None
    return engine.unpack_pipeline(ipadapter, clip_vision, node=node)


class IPAdapterEmbeds:
    """Applies pre-encoded embeds (IPAdapterEncoder, IPAdapterLoadEmbeds)."""

    UNFOLD_BATCH = False
    NODE_NAME = "IPAdapterEmbeds"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **inputs.named("model", "ipadapter"),
                "pos_embed": ("EMBEDS",),
                **inputs.named("weight", "weight_type", "start_at", "end_at", "embeds_scaling"),
            },
            "optional": {
                "neg_embed": ("EMBEDS",),
                **inputs.named("attn_mask", "clip_vision"),
            },
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply_ipadapter"
    CATEGORY = "ipadapter/embeds"

    def apply_ipadapter(self, model, ipadapter, pos_embed, weight=1.0, weight_type="linear", start_at=0.0,
                        end_at=1.0, embeds_scaling="V only", neg_embed=None, attn_mask=None, clip_vision=None):
        node = self.NODE_NAME
        adapter, clip_vision = _adapter_and_encoder(ipadapter, clip_vision, node)
        if neg_embed is not None:
            uncond = neg_embed.cond
        elif _uncond_unknown(pos_embed):
            uncond = _default_uncond(adapter, clip_vision, node)
        else:
            uncond = pos_embed.uncond
        embeds = dataclasses.replace(pos_embed, uncond=fit_batch(uncond, pos_embed.count))
        return (engine.apply_ipadapter(
            model, adapter, clip_vision, None, weight=weight, weight_type=weight_type, start_at=start_at,
            end_at=end_at, embeds_scaling=embeds_scaling, attn_mask=attn_mask, node=node, embeds=embeds,
            unfold_batch=self.UNFOLD_BATCH),)


def _uncond_unknown(embeds) -> bool:
    # The existing pack's single-side files load with a zero uncond.  For CLIP hidden states that cannot be a
    # real encoding (every token carries the class/position embeddings), so it means "not stored": the pack
    # then uses a black image's hidden states.  Zeros are the real uncond of image_embeds and face features.
    return embeds.feature == "hidden_states" and not bool(embeds.uncond.any())


def _default_uncond(adapter, clip_vision, node: str) -> torch.Tensor:
    if clip_vision is None:
        raise ValueError(f"{node}: pos_embed holds no uncond side (a single-side .ipadpt file from the existing "
                         f"pack); connect a CLIP vision model (clip_vision, or an IPAdapterUnifiedLoader) so the "
                         f"black-image uncond can be encoded, or connect neg_embed")
    black = torch.zeros(1, 224, 224, 3)
    return engine.encode_images(adapter, clip_vision, black, node=node).uncond


class IPAdapterEmbedsBatch(IPAdapterEmbeds):
    """Embeds with ``unfold_batch``: embeds row i drives latent i."""

    UNFOLD_BATCH = True
    NODE_NAME = "IPAdapterEmbedsBatch"


class IPAdapterEncoder:
    """Encodes reference images into EMBEDS (CLIP vision only, no projection), optionally mask-weighted."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **inputs.named("ipadapter", "image"),
                "weight": inputs.weight(step=0.01),
            },
            "optional": inputs.named("mask", "clip_vision"),
        }

    RETURN_TYPES = ("EMBEDS", "EMBEDS")
    RETURN_NAMES = ("pos_embed", "neg_embed")
    FUNCTION = "encode"
    CATEGORY = "ipadapter/embeds"

    def encode(self, ipadapter, image, weight=1.0, mask=None, clip_vision=None):
        node = "IPAdapterEncoder"
        adapter, clip_vision = engine.unpack_pipeline(ipadapter, clip_vision, node=node)
        embeds = engine.encode_images(adapter, clip_vision, image, node=node)
        cond = embeds.cond
        if mask is not None:
            cond = enhancer.encode_masked(clip_vision, image, mask, embeds.feature)
        pos = dataclasses.replace(embeds, cond=cond * float(weight))
        neg = dataclasses.replace(embeds, cond=embeds.uncond)
        return (pos, neg)


class IPAdapterCombineEmbeds:
    """Joins or reduces up to five EMBEDS."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "embed1": ("EMBEDS",),
                "method": (list(COMBINE_METHODS),),
            },
            "optional": {f"embed{i}": ("EMBEDS",) for i in range(2, 6)},
        }

    RETURN_TYPES = ("EMBEDS",)
    FUNCTION = "batch"
    CATEGORY = "ipadapter/embeds"

    def batch(self, embed1, method, embed2=None, embed3=None, embed4=None, embed5=None):
        given = [e for e in (embed1, embed2, embed3, embed4, embed5) if e is not None]
        return (embeds_core.combine_embeds(given, method),)


class IPAdapterNoise:
    """A noise image for ``image_negative`` (deterministic: seeded from the image)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "type": (list(noise.NOISE_TYPES),),
                "strength": inputs.fraction(1.0, 0.05),
                "blur": ("INT", {"default": 0, "min": 0, "max": 32, "step": 1}),
            },
            "optional": {
                "image_optional": ("IMAGE",),
            },
        }

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make_noise"
    CATEGORY = "ipadapter/utils"

    def make_noise(self, type, strength, blur, image_optional=None):  # noqa: A002 - the pack's input name
        seed = 0 if image_optional is None else noise.image_seed(image_optional)
        return (noise.make_noise(type, strength, blur, image_optional, seed=seed),)


class IPAdapterSaveEmbeds:
    """Writes EMBEDS to the output folder as ``<prefix>_NNNNN_.safetensors`` (never overwriting)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "embeds": ("EMBEDS",),
                "filename_prefix": ("STRING", {"default": "IP_embeds"}),
            },
        }

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "ipadapter/embeds"

    def save(self, embeds, filename_prefix="IP_embeds"):
        root = folders.provider().get_output_directory()
        path = embeds_io.save_embeds_numbered(embeds, root, filename_prefix)
        subfolder = os.path.relpath(path.parent, root)
        entry = {"filename": path.name, "subfolder": "" if subfolder == "." else subfolder, "type": "output"}
        return {"ui": {"embeds": [entry]}, "result": ()}


def embeds_files() -> list[str]:
    """Embeds files under the input folder (sub-folders included), as relative '/' paths."""
    root = folders.provider().get_input_directory()
    found = []
    for base, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.lower().endswith(EMBEDS_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(base, name), root).replace(os.sep, "/"))
    return sorted(found)


def _embeds_path(name: str):
    return folders.resolve_inside(folders.provider().get_input_directory(), name, what="embeds file")


class IPAdapterLoadEmbeds:
    """Reads an embeds file from the input folder: ours, the pack's ``.ipadpt`` or diffusers' layout.

    Pickled files are read with ``weights_only=True``; one that would run code is refused.
    """

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"embeds": (embeds_files(),)}}

    RETURN_TYPES = ("EMBEDS",)
    FUNCTION = "load"
    CATEGORY = "ipadapter/embeds"

    @classmethod
    def IS_CHANGED(cls, embeds):
        try:
            return hashlib.sha256(_embeds_path(embeds).read_bytes()).hexdigest()
        except (OSError, ValueError):
            return float("nan")  # always re-run, so the run reports the real error

    @classmethod
    def VALIDATE_INPUTS(cls, embeds):
        try:
            path = _embeds_path(embeds)
        except folders.PathOutsideFolderError as error:
            return str(error)
        if not path.is_file():
            return f"embeds file '{embeds}' not found in '{path.parent}'; put it in the input folder"
        return True

    def load(self, embeds):
        return (embeds_io.load_embeds(_embeds_path(embeds)),)


NODE_CLASS_MAPPINGS = {
    "IPAdapterEmbeds": IPAdapterEmbeds,
    "IPAdapterEmbedsBatch": IPAdapterEmbedsBatch,
    "IPAdapterEncoder": IPAdapterEncoder,
    "IPAdapterCombineEmbeds": IPAdapterCombineEmbeds,
    "IPAdapterNoise": IPAdapterNoise,
    "IPAdapterSaveEmbeds": IPAdapterSaveEmbeds,
    "IPAdapterLoadEmbeds": IPAdapterLoadEmbeds,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "IPAdapterEmbeds": "IPAdapter Embeds",
    "IPAdapterEmbedsBatch": "IPAdapter Embeds Batch",
    "IPAdapterEncoder": "IPAdapter Encoder",
    "IPAdapterCombineEmbeds": "IPAdapter Combine Embeds",
    "IPAdapterNoise": "IPAdapter Noise",
    "IPAdapterSaveEmbeds": "IPAdapter Save Embeds",
    "IPAdapterLoadEmbeds": "IPAdapter Load Embeds",
}
