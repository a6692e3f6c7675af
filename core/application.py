"""Application: one use of an IP-Adapter on a model, and its per-sampling-call cache.

An :class:`Application` is backend-free data (adapter, embeds, weights, step range, scaling mode, ...).
Applying an adapter to a MODEL returns a new MODEL holding one more Application.

:class:`PreparedApplication` is what a backend builds from an Application when sampling starts: it runs the
image projection once and each layer's ``to_k_ip``/``to_v_ip`` once (on first use), and hands the cached
image keys/values to every denoising step.  It is thrown away when the sampling call ends.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from . import masks
from .attention import check_embeds_scaling
from .embeds import Embeds


MASK_METHODS: tuple[str, ...] = ("ipadapter_plus", "diffusers")  # see core.masks

Table = tuple[tuple[float, ...], ...]


@dataclass(frozen=True, eq=False)
class Application:
    """One adapter applied with one set of reference features.

    Weights, per cross-attention layer ``i`` of the adapter (attn_processors order, the checkpoint's
    ``ip_adapter.{2i+1}``), per classifier-free-guidance branch (see ``core.weighting.LayerWeights``):

    * ``layer_weights``: the cond weights ``lw``; None means ``weight`` on every layer (``linear``).
    * ``uncond_layer_weights``: ``ulw``, the weight of the *reference* tokens on the uncond branch (the
      "precise" types' swap); None means 0 everywhere.  The cond chunk gets ``lw[i] * A(q, K_ref, V_ref)``,
      the uncond chunk ``lw[i] * A(q, K_neg, V_neg) + ulw[i] * A(q, K_ref, V_ref)``.
    * ``frame_layer_weights`` / ``frame_uncond_layer_weights``: one such table per latent (frame) of the
      batch, used with ``unfold_batch`` (latent ``j`` uses table ``j``; the last repeats).  When given they
      replace ``layer_weights`` / ``uncond_layer_weights``.

    ``start_at``/``end_at`` are fractions of the sampling schedule (ComfyUI semantics, through sigma).
    ``attn_mask`` (MASK ``[H,W]`` or ``[N,H,W]``, any size) multiplies this application's output at every
    layer, resized by ``core.masks.layer_mask`` with ``mask_method`` (``"ipadapter_plus"``: the nodes'
    attn_mask; ``"diffusers"``: diffusers' ``IPAdapterMaskProcessor`` path).
    ``image_masks`` ``[N,H,W]`` (one per reference image, N = ``embeds.count``) switches to diffusers'
    masked multi-image form: image ``n`` is its own attention term over its own tokens, masked by mask
    ``n`` and weighted by ``image_weights[n]`` (default 1) times the layer weight; the terms are added.
    ``faceid_v2_weight`` is the FaceID-Plus v2 shortcut scale; None runs FaceID-Plus as v1 (no shortcut).
    ``unfold_batch``: reference image i drives latent i instead of every latent seeing all references.
    """

    adapter: Any
    embeds: Embeds
    weight: float = 1.0
    layer_weights: tuple[float, ...] | None = None
    start_at: float = 0.0
    end_at: float = 1.0
    embeds_scaling: str = "V only"
    attn_mask: torch.Tensor | None = None
    unfold_batch: bool = False
    faceid_v2_weight: float | None = None
    uncond_layer_weights: tuple[float, ...] | None = None
    frame_layer_weights: Table | None = None
    frame_uncond_layer_weights: Table | None = None
    image_masks: torch.Tensor | None = None
    image_weights: tuple[float, ...] | None = None
    mask_method: str = "ipadapter_plus"

    def __post_init__(self) -> None:
        check_embeds_scaling(self.embeds_scaling)
        if not (0.0 <= self.start_at <= 1.0 and 0.0 <= self.end_at <= 1.0):
            raise ValueError(f"start_at/end_at must lie in 0..1, got {self.start_at} / {self.end_at}")
        if self.mask_method not in MASK_METHODS:
            raise ValueError(f"mask_method {self.mask_method!r} is not known; expected one of {list(MASK_METHODS)}")
        for name in ("layer_weights", "uncond_layer_weights"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, self._checked_row(getattr(self, name), name))
        for name in ("frame_layer_weights", "frame_uncond_layer_weights"):
            table = getattr(self, name)
            if table is not None:
                if len(table) == 0:
                    raise ValueError(f"{name} is empty; give one per-layer table per frame, or None")
                rows = tuple(self._checked_row(row, f"{name}[{j}]") for j, row in enumerate(table))
                object.__setattr__(self, name, rows)
        self._check_images()
        # per frame, per layer: the cond weights and the reference-on-uncond weights (None: no swap)
        cond = self.frame_layer_weights or (self.layer_weights or (float(self.weight),) * self.num_layers,)
        swap = self.frame_uncond_layer_weights or ((self.uncond_layer_weights,)
                                                   if self.uncond_layer_weights is not None else None)
        object.__setattr__(self, "_cond_table", cond)
        object.__setattr__(self, "_swap_table", swap)

    def _checked_row(self, row: Any, name: str) -> tuple[float, ...]:
        values = tuple(float(w) for w in row)
        if len(values) != self.num_layers:
            raise ValueError(f"{name} has {len(values)} entries but the adapter has {self.num_layers} "
                             "cross-attention layers")
        return values

    def _check_images(self) -> None:
        if self.image_weights is not None:
            object.__setattr__(self, "image_weights", tuple(float(w) for w in self.image_weights))
        if self.image_masks is None:
            if self.image_weights is not None:
                raise ValueError("image_weights (one weight per reference image) need image_masks: without "
                                 "masks every image's tokens share one attention")
            return
        if self.unfold_batch:
            raise ValueError("image_masks (one mask per reference image) and unfold_batch (image i drives "
                             "latent i) cannot be combined; use attn_mask with one mask per latent instead")
        stack = self.image_masks
        if stack.ndim == 4 and stack.shape[0] == 1:
            count = stack.shape[1]  # diffusers' per-adapter layout [1, N, H, W]
        else:
            count = 1 if stack.ndim == 2 else stack.shape[0]
        if count != self.embeds.count:
            raise ValueError(f"image_masks holds {count} masks but there are {self.embeds.count} reference images; "
                             "give one mask per image")
        if self.image_weights is not None and len(self.image_weights) != count:
            raise ValueError(f"image_weights has {len(self.image_weights)} entries for {count} reference images")

    @property
    def num_layers(self) -> int:
        """Cross-attention layers the adapter has K/V weights for."""
        return len(self.adapter.to_k_ip)

    @property
    def frames(self) -> int:
        """How many per-frame weight tables there are (1 without per-frame weights)."""
        return max(len(self._cond_table), len(self._swap_table or ()))

    def layer_weight(self, index: int) -> float:
        """The cond weight of this application at cross-attention layer ``index`` (the first frame's)."""
        return self._cond_table[0][index]

    def cond_weights(self, index: int) -> tuple[float, ...]:
        """The cond weight at layer ``index`` for each frame (one entry without per-frame weights)."""
        return tuple(row[index] for row in self._cond_table)

    def swap_weights(self, index: int) -> tuple[float, ...] | None:
        """The reference-on-uncond weight at layer ``index`` per frame; None when nothing is swapped there."""
        if self._swap_table is None:
            return None
        weights = tuple(row[index] for row in self._swap_table)
        return weights if any(w != 0 for w in weights) else None

    def acts_at(self, index: int) -> bool:
        """True when this application adds anything at layer ``index`` (some weight is not 0)."""
        if self.image_weights is not None and not any(self.image_weights):
            return False
        return any(w != 0 for w in self.cond_weights(index)) or self.swap_weights(index) is not None

    def replace(self, **changes: Any) -> "Application":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _linear_weight(layer: Any) -> torch.Tensor:
    return layer.weight if isinstance(layer, torch.nn.Module) else layer


def project_embeds(application: Application) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the adapter's image projection once on cond and uncond features together: ([N,T,D], [N,T,D])."""
    embeds = application.embeds
    adapter = application.adapter
    features = torch.cat([embeds.cond, embeds.uncond], dim=0)
    if getattr(adapter.spec, "projection", "") == "resampler" and features.ndim == 2:
        features = features.unsqueeze(1)  # Portrait-unnorm: one face embedding = a one-token sequence
    clip_hidden = None
    if embeds.clip_cond is not None:
        clip_hidden = torch.cat([embeds.clip_cond, embeds.clip_uncond], dim=0)
    v2 = application.faceid_v2_weight
    with torch.no_grad():
        if clip_hidden is None:
            tokens = adapter.project(features)
        else:
            tokens = adapter.project(features, clip_hidden, shortcut=v2 is not None,
                                     scale=1.0 if v2 is None else float(v2))
    count = embeds.count
    return tokens[:count], tokens[count:]


class PreparedApplication:
    """An Application during one sampling call: projection and per-layer K/V computed once, then cached."""

    def __init__(self, application: Application):
        self.application = application
        self._tokens: tuple[torch.Tensor, torch.Tensor] | None = None
        self._kv: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self._masks: dict[tuple, tuple[torch.Tensor | None, torch.Tensor | None]] = {}

    @property
    def tokens_per_image(self) -> int:
        """Image tokens each reference contributes (4, 16, 257, ...); known after the projection ran."""
        return int(self.tokens()[0].shape[1])

    def tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) projected tokens [N,T,D]; the projection runs on the first call only."""
        if self._tokens is None:
            self._tokens = project_embeds(self.application)
        return self._tokens

    def keys_values(self, layer: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(k_cond, v_cond, k_uncond, v_uncond) of cross-attention layer ``layer``.

        Each is ``[1, N*T, C]`` (the N references concatenated along the token axis) or, with
        ``unfold_batch``, ``[N, T, C]``; computed where the adapter's weights live, in float32, then moved to
        ``device`` and cast to ``dtype`` (the query's).
        """
        cache_key = (layer, str(device), dtype)
        cached = self._kv.get(cache_key)
        if cached is not None:
            return cached
        adapter = self.application.adapter
        w_k = _linear_weight(adapter.to_k_ip[layer])
        w_v = _linear_weight(adapter.to_v_ip[layer])
        result = []
        with torch.no_grad():
            for tokens in self.tokens():
                tokens = tokens.to(device=w_k.device, dtype=w_k.dtype)
                for weight in (w_k, w_v):
                    kv = torch.nn.functional.linear(tokens, weight)
                    if not self.application.unfold_batch:
                        kv = kv.reshape(1, -1, kv.shape[-1])
                    result.append(kv.to(device=device, dtype=dtype))
        k_cond, v_cond, k_uncond, v_uncond = result
        self._kv[cache_key] = (k_cond, v_cond, k_uncond, v_uncond)
        return self._kv[cache_key]

    def image_keys_values(self, layer: int, device: torch.device, dtype: torch.dtype) -> list[tuple[torch.Tensor, ...]]:
        """Per reference image, (k_cond, v_cond, k_uncond, v_uncond) of its own tokens only, each ``[1, T, C]``.

        For diffusers' masked multi-image form, where every image is its own attention term.
        """
        count = self.application.embeds.count
        per_image = self.tokens_per_image
        split = [kv.reshape(count, per_image, kv.shape[-1]) for kv in self.keys_values(layer, device, dtype)]
        return [tuple(kv[n:n + 1] for kv in split) for n in range(count)]

    def layer_masks(self, query_len: int, latent_hw: Sequence[int] | None, batch: int, chunks: int,
                    device: torch.device, dtype: torch.dtype, grid: Sequence[int] | None = None
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(attn_mask ``[B, L, 1]`` or None, image masks ``[N, B, L, 1]`` or None) at a layer of ``query_len``
        tokens, for a UNet batch of ``batch`` rows in ``chunks`` cond/uncond chunks; cached per layout."""
        app = self.application
        if app.attn_mask is None and app.image_masks is None:
            return None, None
        hw = None if latent_hw is None else (int(latent_hw[0]), int(latent_hw[1]))
        cell = None if grid is None else (int(grid[0]), int(grid[1]))
        key = (query_len, hw, cell, batch, chunks, str(device), dtype)
        cached = self._masks.get(key)
        if cached is None:
            options = dict(method=app.mask_method, chunks=chunks, grid=cell)
            attn = None
            if app.attn_mask is not None:
                attn = masks.layer_mask(app.attn_mask, query_len, hw, batch, dtype, device, **options)
            images = None
            if app.image_masks is not None:
                images = masks.image_layer_masks(app.image_masks, query_len, hw, batch, dtype, device,
                                                 what="image_masks", **options)
            cached = self._masks[key] = (attn, images)
        return cached
