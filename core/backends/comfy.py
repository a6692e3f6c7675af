"""The ComfyUI backend: IP-Adapter Applications as attn2 replace patches on a cloned ModelPatcher.

No ComfyUI module is imported here; the ModelPatcher is duck-typed (``clone``, ``model_options``,
``set_model_attn2_replace``, ``get_model_object("model_sampling")``), so the pack imports without ComfyUI.

How it works:

* :func:`apply_application` clones the patcher (the input MODEL is never changed) and registers one
  :class:`Attn2Patch` per cross-attention site under ComfyUI's replace key ``(block, number, block_index)``
  (SD1.5: 16 sites, SDXL: 70, the middle block's ``("middle", 0, i)`` included).  The site's key maps to the
  adapter layer of diffusers' ``attn_processors`` order (down, up, mid), see :data:`BLOCK_KEYS`.
* Stacking: a patch already on the site (another pack's, or ours from an earlier apply; found under the
  3-tuple key or, as ComfyUI's lookup falls back to it, the 2-tuple key) is wrapped: it computes the text
  part, ours adds its image term.  Applying A then B gives ``text + term_A + term_B``, the diffusers
  backend's order.  Without a previous patch the text attention is computed here, with ComfyUI's own
  ``optimized_attention`` when ComfyUI is loaded (so an inactive patch returns exactly the unpatched output),
  else softmax(q k^T / sqrt(d)) v over ``extra_options["n_heads"]`` heads.
* The clone's ``transformer_options[APPLICATIONS_KEY]`` lists the Applications applied so far (read it with
  :func:`applications_of`).  ComfyUI deep-copies ``model_options`` on every clone; our objects share the
  immutable Applications (and so the adapter weights) instead of copying them.
* Step range: the thresholds ``percent_to_sigma(start_at)`` / ``percent_to_sigma(end_at)`` come from the
  patcher's ``model_sampling`` when the adapter is applied; a call is active when
  ``sigma_end <= extra_options["sigmas"][0] <= sigma_start`` (ComfyUI's own step-range convention).
* Cond/uncond: the UNet batch is ``len(cond_or_uncond)`` chunks in ``extra_options["cond_or_uncond"]``
  order (``[1, 0]`` happens); each chunk gets the cond or uncond image keys/values.
* Masks (``attn_mask``, per-image masks): the latent size is ``extra_options["original_shape"]`` and the
  layer's token grid ``extra_options["activations_shape"]``; resized by ``core.masks`` exactly as the
  diffusers backend does, so both give the same numbers.
* Per-run cache: the projection and each layer's image K/V are computed once per sampling run and cast to
  the query's device and dtype.  A run is identified by the ``sample_sigmas`` tensor ComfyUI puts into the
  transformer options for one sampling call (the same object for every step of that call); a new object
  starts a new run and drops the old cache.  Without ``sample_sigmas`` (older ComfyUI) a sigma larger than
  the previous call's starts a new run.  ``.to(device_or_dtype)``, which ComfyUI calls when it loads the
  model and again when it offloads it, also drops the cache, so nothing stays on the GPU after unloading.
"""
from __future__ import annotations

import copy
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..adapter import FAMILY_BY_LAYERS, FAMILY_LABELS, UNET_LAYOUTS
from ..application import Application, PreparedApplication
from ..attention import decoupled_attention
from .common import Entry, adapter_label, image_terms, is_active

# Where the clone's Applications are listed in model_options["transformer_options"].
APPLICATIONS_KEY = "ipadapter_nodes_applications"
# ComfyUI's attention module; present in sys.modules whenever a ComfyUI UNet exists.
COMFY_ATTENTION_MODULE = "comfy.ldm.modules.attention"
# ComfyUI model classes (``type(patcher.model).__name__``) that hold an SDXL UNet.
SDXL_MODEL_CLASSES = ("SDXL", "SDXL_instructpix2pix")
FAMILY_BY_CONTEXT_DIM = {768: "sd15", 2048: "sdxl"}

# ComfyUI numbers the UNet's input blocks 0 (conv_in), then per level layers_per_block (2) blocks and a
# downsample; output blocks layers_per_block + 1 (3) per level.  So diffusers' down_blocks[d].attentions[m]
# is ("input", 3d + m + 1), up_blocks[u].attentions[m] is ("output", 3u + m), mid_block is ("middle", 0).
_BLOCKS_PER_LEVEL = 3
_COMFY_BLOCK = {"down": ("input", 1), "up": ("output", 0), "mid": ("middle", 0)}


def _block_keys(family: str) -> tuple[tuple[str, int, int], ...]:
    keys = []
    for kind, level, modules, depth in UNET_LAYOUTS[family]:
        name, offset = _COMFY_BLOCK[kind]
        for module in range(modules):
            number = 0 if kind == "mid" else _BLOCKS_PER_LEVEL * level + module + offset
            keys.extend((name, number, index) for index in range(depth))
    return tuple(keys)


# family -> ComfyUI attn2 replace key of every cross-attention site; position = adapter layer index.
BLOCK_KEYS: dict[str, tuple[tuple[str, int, int], ...]] = {family: _block_keys(family) for family in UNET_LAYOUTS}


# ---- the model ----------------------------------------------------------------------------------------


def clip_vision_loader() -> Callable[[str], Any] | None:
    """ComfyUI's CLIP vision file loader (``comfy.clip_vision.load``) when the pack runs inside ComfyUI, else None.

    Looked up in ``sys.modules`` rather than imported: it is there whenever ComfyUI runs, and importing it
    elsewhere would pull ComfyUI into headless runs.
    """
    return getattr(sys.modules.get("comfy.clip_vision"), "load", None)


def is_comfy_model(model: Any) -> bool:
    """True for a ComfyUI ModelPatcher (duck-typed: ``clone``, ``model_options``, ``set_model_attn2_replace``)."""
    return (callable(getattr(model, "clone", None)) and callable(getattr(model, "set_model_attn2_replace", None))
            and isinstance(getattr(model, "model_options", None), dict))


def unet_config(model_patcher: Any) -> dict:
    """The ``unet_config`` ComfyUI detected for the patcher's model (empty when it has none)."""
    config = getattr(getattr(getattr(model_patcher, "model", None), "model_config", None), "unet_config", None)
    return config if isinstance(config, dict) else {}


def cross_attention_sites(config: dict) -> int | None:
    """Transformer blocks with cross-attention in a ComfyUI ``unet_config`` (None when it lacks the depths)."""
    inputs, outputs = config.get("transformer_depth"), config.get("transformer_depth_output")
    middle = config.get("transformer_depth_middle")
    if not isinstance(inputs, (list, tuple)) or not isinstance(outputs, (list, tuple)) or not isinstance(middle, int):
        return None
    return int(sum(inputs) + sum(outputs) + max(middle, 0))


def model_family(model_patcher: Any) -> str:
    """``"sd15"`` or ``"sdxl"`` for a ComfyUI ModelPatcher, from its UNet's sites, class or context width."""
    model = getattr(model_patcher, "model", None)
    config = unet_config(model_patcher)
    sites = cross_attention_sites(config)
    if sites in FAMILY_BY_LAYERS:
        return FAMILY_BY_LAYERS[sites]
    if type(model).__name__ in SDXL_MODEL_CLASSES:
        return "sdxl"
    if sites is None and config.get("context_dim") in FAMILY_BY_CONTEXT_DIM:
        return FAMILY_BY_CONTEXT_DIM[config["context_dim"]]
    raise ValueError(f"the MODEL ({type(model).__name__}, context_dim {config.get('context_dim')}, {sites} "
                     f"cross-attention blocks) is neither SD1.5 (16 blocks) nor SDXL (70): IP-Adapter patches "
                     f"exist for those two families only; load an SD1.5 or SDXL checkpoint")


def check_fits(adapter: Any, family: str, context_dim: int | None) -> None:
    """Raise a ValueError naming the adapter when it was not made for this family / text width."""
    layers = len(adapter.to_k_ip)
    sites = len(BLOCK_KEYS[family])
    if layers != sites:
        raise ValueError(f"{adapter_label(adapter)} has K/V weights for {layers} cross-attention layers but the "
                         f"{FAMILY_LABELS[family]} model has {sites}: load the {FAMILY_LABELS[family]} version "
                         "of the adapter (SD1.5 has 16 layers, SDXL 70)")
    weight = getattr(adapter.to_k_ip[0], "weight", adapter.to_k_ip[0])
    if context_dim is not None and int(weight.shape[1]) != int(context_dim):
        raise ValueError(f"{adapter_label(adapter)} reads {weight.shape[1]}-d text features but the model's "
                         f"cross-attention is {context_dim}-d: it was made for another model")


def applications_of(model_patcher: Any) -> tuple[Application, ...]:
    """The Applications applied to this ModelPatcher (and its ancestors), in order."""
    options = model_patcher.model_options.get("transformer_options", {})
    return tuple(options.get(APPLICATIONS_KEY, ()))


class AppliedApplications(tuple):
    """The Applications on a patcher; shared, not copied, when ComfyUI deep-copies ``model_options``."""

    def __deepcopy__(self, memo: dict) -> "AppliedApplications":
        return self


# ---- one application during sampling ------------------------------------------------------------------

class AdapterRun:
    """One application on a patched model: its step range as sigmas and its per-run projection/K-V cache.

    Shared by the application's patches at every site (so the projection runs once per run, not per site)
    and by every later clone of the model (ComfyUI's deep copy keeps it shared).
    """

    def __init__(self, application: Application, sigma_start: float, sigma_end: float):
        self.application = application
        self.sigma_start = float(sigma_start)
        self.sigma_end = float(sigma_end)
        self.prepared = PreparedApplication(application)
        self._schedule: Any = None        # the sample_sigmas object of the run the cache belongs to
        self._last_sigma: float | None = None
        self._sigmas_seen: Any = None     # the last extra_options["sigmas"] and its value, read once per call
        self._sigma_seen: float | None = None

    @property
    def entry(self) -> Entry:
        """``(prepared, sigma_start, sigma_end)`` for :mod:`.common`."""
        return self.prepared, self.sigma_start, self.sigma_end

    def release(self) -> None:
        """Drop the projection and K/V cache (they are recomputed on the next active call)."""
        self.prepared = PreparedApplication(self.application)

    def _read_sigma(self, sigmas: Any) -> float | None:
        if sigmas is None:
            return None
        if sigmas is not self._sigmas_seen:  # one UNet call passes the same tensor to every site
            self._sigmas_seen = sigmas
            self._sigma_seen = float(torch.as_tensor(sigmas).reshape(-1)[0])
        return self._sigma_seen

    def observe(self, extra_options: dict) -> float | None:
        """The sigma of this call; starts a new run (fresh cache) when the sampling run changed."""
        sigma = self._read_sigma(extra_options.get("sigmas"))
        schedule = extra_options.get("sample_sigmas")
        if schedule is not None:
            if schedule is not self._schedule:
                self.release()
                self._schedule = schedule
        elif sigma is not None and self._last_sigma is not None and sigma > self._last_sigma:
            self.release()
        if sigma is not None:
            self._last_sigma = sigma
        return sigma


# ---- the patch ----------------------------------------------------------------------------------------

def text_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
    """The block's own cross-attention of q [B,L,h*d] over the text k/v [B,T,h*d]; returns [B,L,h*d].

    Inside ComfyUI this is ComfyUI's ``optimized_attention`` (the kernel the unpatched block would use);
    elsewhere softmax(q k^T / sqrt(d)) v per head, as ComfyUI's PyTorch attention computes it.
    """
    heads = int(extra_options["n_heads"])
    kernel = getattr(sys.modules.get(COMFY_ATTENTION_MODULE), "optimized_attention", None)
    if kernel is not None:
        precision = extra_options.get("attn_precision")
        return kernel(q, k, v, heads) if precision is None else kernel(q, k, v, heads, attn_precision=precision)
    batch, _, width = q.shape
    head_dim = width // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, -1, heads, head_dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=None, dropout_p=0.0,
                                         is_causal=False)
    return out.transpose(1, 2).reshape(batch, -1, heads * head_dim)


def _spatial(shape: Any) -> tuple[int, int] | None:
    """(h, w) of a ``[B, C, h, w]`` shape from ``extra_options``, or None when it is missing or not 4-D."""
    if shape is None or len(shape) < 4:
        return None
    return int(shape[-2]), int(shape[-1])


def mask_geometry(extra_options: dict, query_len: int) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """(latent (h, w), this layer's token grid (h, w) or None) for attention masks.

    The latent size is ComfyUI's ``original_shape`` (the UNet input); the grid is the transformer's
    ``activations_shape`` when it holds exactly ``query_len`` tokens (else the mask code derives it).
    """
    latent_hw = _spatial(extra_options.get("original_shape"))
    grid = _spatial(extra_options.get("activations_shape"))
    if grid is not None and grid[0] * grid[1] != query_len:
        grid = None
    return latent_hw, grid


class Attn2Patch:
    """ComfyUI attn2 replace patch: one application's image term at one cross-attention site.

    Called as ``patch(q, k, v, extra_options)`` with the block's projected q/k/v ``[B, L, heads*dim_head]``;
    returns the attention output before ``to_out``.  ``previous`` is the patch that was on the site before
    (called for the text part and kept), or None.
    """

    def __init__(self, run: AdapterRun, layer: int, previous: Any = None):
        self.run = run
        self.layer = layer
        self.previous = previous

    def _text(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        if self.previous is not None:
            return self.previous(q, k, v, extra_options)
        return text_attention(q, k, v, extra_options)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        run = self.run
        sigma = run.observe(extra_options)  # first: it may start a new run
        text = self._text(q, k, v, extra_options)
        if not is_active(run.entry, self.layer, sigma):
            return text
        batch, _, width = q.shape
        heads = int(extra_options["n_heads"])
        cond_or_uncond = list(extra_options.get("cond_or_uncond") or [0])
        latent_hw, grid = mask_geometry(extra_options, q.shape[1])
        terms = image_terms([run.entry], self.layer, sigma, cond_or_uncond, batch, q.device, q.dtype,
                            query_len=q.shape[1], latent_hw=latent_hw, grid=grid)
        query = q.view(batch, -1, heads, width // heads).transpose(1, 2)
        return decoupled_attention(text, query, terms)

    def to(self, device_or_dtype: Any) -> "Attn2Patch":
        """ComfyUI moves patches with the model: drop our cache (K/V follow each call's query) and pass
        the move on to the wrapped patch, which ComfyUI no longer sees."""
        self.run.release()
        if self.previous is not None and callable(getattr(self.previous, "to", None)):
            self.previous = self.previous.to(device_or_dtype)
        return self

    def models(self) -> list:
        """Extra ModelPatchers ComfyUI must load for this patch: those of the wrapped patch."""
        if self.previous is not None and callable(getattr(self.previous, "models", None)):
            return list(self.previous.models())
        return []

    def __deepcopy__(self, memo: dict) -> "Attn2Patch":
        # ComfyUI deep-copies model_options on every clone: copy the wrapped patch as it would, share the run
        # (the Application and adapter weights are immutable; copying them would duplicate the adapter).
        clone = Attn2Patch(self.run, self.layer, None)
        memo[id(self)] = clone
        clone.previous = copy.deepcopy(self.previous, memo)
        return clone


# ---- applying --------------------------------------------------------------------------------------------

def apply_application(model_patcher: Any, application: Application) -> Any:
    """A clone of ``model_patcher`` with ``application`` patched into every cross-attention site.

    The input patcher is not changed.  Patches already on a site are wrapped, not replaced.
    """
    if not is_comfy_model(model_patcher):
        raise TypeError(f"expected a ComfyUI MODEL (ModelPatcher), got {type(model_patcher).__name__}")
    family = model_family(model_patcher)
    check_fits(application.adapter, family, unet_config(model_patcher).get("context_dim"))
    sampling = model_patcher.get_model_object("model_sampling")
    run = AdapterRun(application, sampling.percent_to_sigma(application.start_at),
                     sampling.percent_to_sigma(application.end_at))

    patched = model_patcher.clone()
    existing = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for layer, key in enumerate(BLOCK_KEYS[family]):
        # ComfyUI tries (block, number, block_index) first, then (block, number): wrap what it would call.
        previous = existing.get(key)
        if previous is None:
            previous = existing.get(key[:2])
        patched.set_model_attn2_replace(Attn2Patch(run, layer, previous), key[0], key[1], key[2])
    options = dict(patched.model_options.get("transformer_options", {}))
    options[APPLICATIONS_KEY] = AppliedApplications(applications_of(model_patcher) + (application,))
    patched.model_options["transformer_options"] = options
    return patched
