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
from typing import Any

import torch

from .attention import check_embeds_scaling
from .embeds import Embeds


@dataclass(frozen=True, eq=False)
class Application:
    """One adapter applied with one set of reference features.

    ``layer_weights`` has one weight per cross-attention layer of the adapter (attn_processors order, the
    checkpoint's ``ip_adapter.{2i+1}``); None means ``weight`` on every layer (weight type ``linear``).
    ``start_at``/``end_at`` are fractions of the sampling schedule (ComfyUI semantics, through sigma).
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

    def __post_init__(self) -> None:
        check_embeds_scaling(self.embeds_scaling)
        if not (0.0 <= self.start_at <= 1.0 and 0.0 <= self.end_at <= 1.0):
            raise ValueError(f"start_at/end_at must lie in 0..1, got {self.start_at} / {self.end_at}")
        if self.layer_weights is not None:
            object.__setattr__(self, "layer_weights", tuple(float(w) for w in self.layer_weights))
            if len(self.layer_weights) != self.num_layers:
                raise ValueError(f"layer_weights has {len(self.layer_weights)} entries but the adapter has "
                                 f"{self.num_layers} cross-attention layers")

    @property
    def num_layers(self) -> int:
        """Cross-attention layers the adapter has K/V weights for."""
        return len(self.adapter.to_k_ip)

    def layer_weight(self, index: int) -> float:
        """The weight of this application at cross-attention layer ``index``."""
        if self.layer_weights is None:
            return float(self.weight)
        return self.layer_weights[index]

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
