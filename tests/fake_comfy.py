"""Minimal stand-ins for the ComfyUI objects the ComfyUI backend touches (CI has no ComfyUI).

Written from ComfyUI's documented interfaces (``shared/reference/comfyui-interfaces.md`` §3):

* :class:`ModelPatcher`: ``model``, ``model_options["transformer_options"]``, ``clone()`` (deep-copies
  ``model_options``), ``set_model_attn2_replace(patch, block_name, number, transformer_index)`` (copy on
  write), ``get_model_object("model_sampling")``, ``model_patches_to(device_or_dtype)``.
* :class:`BaseModel` (SD1.5) / :class:`SDXL`: the class names ComfyUI uses, with ``model_config.unet_config``
  and ``model_sampling``.
* :class:`ModelSamplingDiscrete`: the training sigmas of an eps model and ``percent_to_sigma``.
* :func:`extra_options` / :func:`run_attn2`: what a transformer block passes to an attn2 replace patch, and
  the block's patch lookup ((block, number, block_index) first, then (block, number)).
"""
from __future__ import annotations

import copy
import types
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

# unet_config depth lists as ComfyUI's model detection writes them (one entry per input/output block).
SD15_DEPTHS = dict(transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                   transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1])
SDXL_DEPTHS = dict(transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                   transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10])


class ModelSamplingDiscrete:
    """Sigmas of a discrete eps/v model; ``percent_to_sigma`` as ComfyUI defines it."""

    def __init__(self, beta_start: float = 0.00085, beta_end: float = 0.012, timesteps: int = 1000):
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, timesteps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float()
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """Sigma at a fractional timestep, log-linear between the two neighbours."""
        t = timestep.float().clamp(0, len(self.sigmas) - 1)
        low, high, frac = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - frac) * self.log_sigmas[low] + frac * self.log_sigmas[high]).exp()

    def percent_to_sigma(self, percent: float) -> float:
        """0 -> a sigma above every step, 1 -> 0, else sigma((1 - percent) * 999)."""
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.sigma(torch.tensor((1.0 - percent) * 999.0)).item()


class ModelConfig:
    def __init__(self, unet_config: dict):
        self.unet_config = unet_config


class BaseModel:
    """ComfyUI's SD1.5 model class (its name is the generic ``BaseModel``)."""

    def __init__(self, unet_config: dict, model_sampling: Any = None):
        self.model_config = ModelConfig(unet_config)
        self.model_sampling = model_sampling or ModelSamplingDiscrete()


class SDXL(BaseModel):
    """ComfyUI's SDXL model class."""


def sd15_model(context_dim: int = 768) -> BaseModel:
    return BaseModel(dict(context_dim=context_dim, model_channels=320, **SD15_DEPTHS))


def sdxl_model(context_dim: int = 2048) -> SDXL:
    return SDXL(dict(context_dim=context_dim, model_channels=320, **SDXL_DEPTHS))


class ModelPatcher:
    """The parts of ComfyUI's ModelPatcher that attention patches use."""

    def __init__(self, model: Any):
        self.model = model
        self.model_options: dict = {"transformer_options": {}}
        self.object_patches: dict = {}

    def clone(self) -> "ModelPatcher":
        n = self.__class__(self.model)
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def set_model_patch_replace(self, patch: Any, name: str, block_name: str, number: int,
                                transformer_index: int | None = None) -> None:
        to = dict(self.model_options["transformer_options"])
        replace = dict(to.get("patches_replace", {}))
        replace[name] = dict(replace.get(name, {}))
        key = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
        replace[name][key] = patch
        to["patches_replace"] = replace
        self.model_options["transformer_options"] = to

    def set_model_attn2_replace(self, patch: Any, block_name: str, number: int,
                                transformer_index: int | None = None) -> None:
        self.set_model_patch_replace(patch, "attn2", block_name, number, transformer_index)

    def get_model_object(self, name: str) -> Any:
        if name in self.object_patches:
            return self.object_patches[name]
        obj = self.model
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj

    def model_patches_to(self, device_or_dtype: Any) -> None:
        replace = self.model_options["transformer_options"].get("patches_replace", {})
        for patches in replace.values():
            for key, patch in patches.items():
                if hasattr(patch, "to"):
                    patches[key] = patch.to(device_or_dtype)


def extra_options(block: tuple[str, int], block_index: int, n_heads: int, dim_head: int, *,
                  cond_or_uncond: Sequence[int] = (1, 0), sigma: float = 1.0,
                  sample_sigmas: torch.Tensor | None = None, batch: int = 2, transformer_index: int = 0) -> dict:
    """The ``extra_options`` a ComfyUI transformer block passes to its attn2 replace patch."""
    if sample_sigmas is None:
        sample_sigmas = torch.tensor([14.6146, sigma, 0.0])
    return {
        "wrappers": {}, "callbacks": {}, "sample_sigmas": sample_sigmas,
        "cond_or_uncond": list(cond_or_uncond), "uuids": ["UUID"] * len(cond_or_uncond),
        "sigmas": torch.full((batch,), float(sigma)), "original_shape": [batch * len(cond_or_uncond), 4, 8, 8],
        "transformer_index": transformer_index, "block": block, "activations_shape": None,
        "block_index": block_index, "n_heads": n_heads, "dim_head": dim_head, "attn_precision": None,
    }


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head on [B, L, heads*d] inputs, as ComfyUI's attention computes it."""
    b, _, width = q.shape
    d = width // heads
    split = [t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*split)
    return out.transpose(1, 2).reshape(b, -1, width)


def run_attn2(patcher: ModelPatcher, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict) -> torch.Tensor:
    """What a transformer block does at its attn2: the replace patch ComfyUI would pick, or plain attention."""
    replace = patcher.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
    block = options["block"]
    key = (block[0], block[1], options["block_index"])
    patch = replace.get(key, replace.get((block[0], block[1])))
    if patch is None:
        return reference_attention(q, k, v, options["n_heads"])
    return patch(q, k, v, options)


def attention_module(kernel: Callable) -> types.ModuleType:
    """A stand-in for ``comfy.ldm.modules.attention`` whose ``optimized_attention`` is ``kernel``."""
    module = types.ModuleType("comfy.ldm.modules.attention")
    module.optimized_attention = kernel
    return module
