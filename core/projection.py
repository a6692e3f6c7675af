"""Projection modules: encoder features -> IP tokens, one module per published IP-Adapter layout.

Parameter names equal the keys of a checkpoint's ``image_proj`` part, so a module loads that part with
``load_state_dict(strict=True)``; every size is read from the tensor shapes (:func:`build_projection`).

| name          | used by                     | input -> output                                              |
|---------------|-----------------------------|--------------------------------------------------------------|
| ``linear``    | base, light, vit-G          | image_embeds [B,E] -> [B,T,C] (Linear, reshape, LayerNorm)    |
| ``token-mlp`` | full-face                   | hidden states [B,N,E] -> [B,N,C] (MLP + LayerNorm per token)  |
| ``resampler`` | plus, plus-face, portrait-unnorm | features [B,N,E] -> [B,Q,C] (perceiver resampler, learned queries) |
| ``faceid-mlp``| faceid, portrait            | face embeds [B,F] -> [B,T,C]; [B,n,F] -> [B,n*T,C]            |
| ``faceid-plus``| faceid-plus, plus v2       | (face [B,F], hidden [B,N,E]) -> [B,T,C] (ID tokens refined by a perceiver) |

Every published resampler uses attention heads of width 64 (``dim_head``), so the number of heads is
``to_q rows / 64``; diffusers infers it the same way.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

HEAD_WIDTH = 64  # dim_head of every published IP-Adapter resampler


class LinearTokens(nn.Module):
    """Base IP-Adapter: one global image embedding -> T tokens (Linear to T*C, reshape, LayerNorm)."""

    def __init__(self, embed_dim: int, cross_dim: int, tokens: int) -> None:
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Linear(embed_dim, tokens * cross_dim)
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """``image_embeds`` [B,E] -> [B,T,C]."""
        tokens = self.proj(image_embeds).reshape(image_embeds.shape[0], self.tokens, -1)
        return self.norm(tokens)


class TokenwiseMLP(nn.Module):
    """Full-face: every encoder token through Linear-GELU-Linear-LayerNorm (257 tokens in, 257 out)."""

    def __init__(self, embed_dim: int, cross_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, cross_dim), nn.LayerNorm(cross_dim)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``hidden_states`` [B,N,E] -> [B,N,C]."""
        return self.proj(hidden_states)


class PerceiverAttention(nn.Module):
    """Queries (the latents) attend to the input tokens and to themselves (Perceiver / Flamingo).

    K and V are stored stacked in one matrix ``to_kv`` (first half of the rows is K).
    """

    def __init__(self, dim: int, heads: int, head_width: int = HEAD_WIDTH) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * head_width
        self.norm1 = nn.LayerNorm(dim)  # for the input tokens
        self.norm2 = nn.LayerNorm(dim)  # for the latents
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """``x`` [B,N,D] input tokens, ``latents`` [B,Q,D] -> attention output [B,Q,D] (no residual)."""
        x = self.norm1(x)
        latents = self.norm2(latents)
        context = torch.cat([x, latents], dim=1)
        w_k, w_v = self.to_kv.weight.chunk(2, dim=0)
        q, k, v = (self._split_heads(t) for t in (self.to_q(latents), F.linear(context, w_k), F.linear(context, w_v)))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(dim_head)) v
        batch, heads, queries, width = out.shape
        return self.to_out(out.transpose(1, 2).reshape(batch, queries, heads * width))

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        batch, length, inner = t.shape
        return t.reshape(batch, length, self.heads, inner // self.heads).transpose(1, 2)


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    """Pre-norm MLP of the resampler blocks (no biases); indices 0, 1, 3 match the checkpoint keys."""
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False)
    )


class PerceiverStack(nn.Module):
    """``proj_in`` -> depth x (attention + residual, feed-forward + residual) -> ``proj_out`` -> LayerNorm."""

    def __init__(self, embed_dim: int, dim: int, out_dim: int, depth: int, heads: int, ff_mult: int) -> None:
        super().__init__()
        self.proj_in = nn.Linear(embed_dim, dim)
        self.proj_out = nn.Linear(dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads), _feed_forward(dim, ff_mult)]) for _ in range(depth)
        )

    def run(self, latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Refine ``latents`` [B,Q,D] by attending to ``features`` [B,N,E]; returns [B,Q,out]."""
        x = self.proj_in(features)
        for attention, feed_forward in self.layers:
            latents = attention(x, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


class Resampler(PerceiverStack):
    """IP-Adapter Plus: Q learned queries read a token sequence (CLIP patches, or face embeddings)."""

    def __init__(self, embed_dim: int, dim: int, out_dim: int, depth: int, heads: int, queries: int,
                 ff_mult: int = 4) -> None:
        super().__init__(embed_dim, dim, out_dim, depth, heads, ff_mult)
        self.latents = nn.Parameter(torch.randn(1, queries, dim) / dim**0.5)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``features`` [B,N,E] -> [B,Q,C]."""
        return self.run(self.latents.expand(features.shape[0], -1, -1), features)


class FaceIDTokens(nn.Module):
    """FaceID / Portrait: a face-ID embedding -> T tokens (MLP 512->1024->T*C, reshape, LayerNorm).

    Portrait adapters take several faces per image: [B,n,F] gives n*T tokens, the faces' tokens
    concatenated in order along the token axis (as the Portrait models were trained).
    """

    def __init__(self, face_dim: int, inner_dim: int, cross_dim: int, tokens: int) -> None:
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Sequential(nn.Linear(face_dim, inner_dim), nn.GELU(), nn.Linear(inner_dim, tokens * cross_dim))
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, face_embeds: torch.Tensor) -> torch.Tensor:
        """``face_embeds`` [B,F] -> [B,T,C], or [B,n,F] -> [B,n*T,C]."""
        batch = face_embeds.shape[0]
        tokens = self.proj(face_embeds).reshape(batch, -1, self.tokens, self.norm.normalized_shape[0])
        return self.norm(tokens).reshape(batch, -1, tokens.shape[-1])


class FacePerceiver(PerceiverStack):
    """The perceiver of FaceID-Plus: no learned queries; the ID tokens are the queries."""

    def forward(self, id_tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.run(id_tokens, features)


class FaceIDPlusTokens(nn.Module):
    """FaceID-Plus / Plus V2: ID tokens (as FaceID) refined by reading the face crop's CLIP hidden states.

    ``out = perceiver(x, clip)`` with ``x = LayerNorm(MLP(face))``; V2 adds the shortcut
    ``out = x + scale * out``. Plus and Plus V2 files have identical layouts: the shortcut is a call
    argument chosen by whoever applies the adapter, not something stored in the file.
    """

    def __init__(self, face_dim: int, inner_dim: int, dim: int, tokens: int, embed_dim: int, out_dim: int,
                 depth: int, heads: int, ff_mult: int = 4) -> None:
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Sequential(nn.Linear(face_dim, inner_dim), nn.GELU(), nn.Linear(inner_dim, tokens * dim))
        self.norm = nn.LayerNorm(dim)
        self.perceiver_resampler = FacePerceiver(embed_dim, dim, out_dim, depth, heads, ff_mult)

    def forward(self, face_embeds: torch.Tensor, clip_hidden: torch.Tensor, shortcut: bool = False,
                scale: float = 1.0) -> torch.Tensor:
        """``face_embeds`` [B,F], ``clip_hidden`` [B,N,E] -> [B,T,C]."""
        x = self.norm(self.proj(face_embeds).reshape(face_embeds.shape[0], self.tokens, -1))
        out = self.perceiver_resampler(x, clip_hidden)
        return x + scale * out if shortcut else out


# ----------------------------------------------------------------------------------------------------
# building a module from a checkpoint's image_proj part


def _depth(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> int:
    pattern = re.compile(re.escape(prefix) + r"layers\.(\d+)\.")
    found = {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
    return max(found) + 1 if found else 0


def _heads(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> int:
    return state_dict[f"{prefix}layers.0.0.to_q.weight"].shape[0] // HEAD_WIDTH


def _ff_mult(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> int:
    hidden, dim = state_dict[f"{prefix}layers.0.1.1.weight"].shape
    return hidden // dim


def _build_linear(sd: Mapping[str, torch.Tensor]) -> nn.Module:
    cross = sd["norm.weight"].shape[0]
    rows, embed = sd["proj.weight"].shape
    return LinearTokens(embed, cross, rows // cross)


def _build_token_mlp(sd: Mapping[str, torch.Tensor]) -> nn.Module:
    return TokenwiseMLP(sd["proj.0.weight"].shape[1], sd["proj.3.weight"].shape[0])


def _build_resampler(sd: Mapping[str, torch.Tensor]) -> nn.Module:
    _, queries, dim = sd["latents"].shape
    return Resampler(sd["proj_in.weight"].shape[1], dim, sd["proj_out.weight"].shape[0], _depth(sd), _heads(sd),
                     queries, _ff_mult(sd))


def _build_faceid_mlp(sd: Mapping[str, torch.Tensor]) -> nn.Module:
    inner, face = sd["proj.0.weight"].shape
    cross = sd["norm.weight"].shape[0]
    return FaceIDTokens(face, inner, cross, sd["proj.2.weight"].shape[0] // cross)


def _build_faceid_plus(sd: Mapping[str, torch.Tensor]) -> nn.Module:
    inner, face = sd["proj.0.weight"].shape
    dim = sd["norm.weight"].shape[0]
    p = "perceiver_resampler."
    return FaceIDPlusTokens(face, inner, dim, sd["proj.2.weight"].shape[0] // dim, sd[p + "proj_in.weight"].shape[1],
                            sd[p + "proj_out.weight"].shape[0], _depth(sd, p), _heads(sd, p), _ff_mult(sd, p))


BUILDERS = {
    "linear": _build_linear,
    "token-mlp": _build_token_mlp,
    "resampler": _build_resampler,
    "faceid-mlp": _build_faceid_mlp,
    "faceid-plus": _build_faceid_plus,
}


def build_projection(name: str, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Construct projection ``name`` with the sizes found in ``state_dict`` (an ``image_proj`` part).

    The weights are not loaded: build it under ``torch.device("meta")`` and load the part with
    ``load_state_dict(..., strict=True, assign=True)``. Raises ``KeyError`` when a key that carries a size
    is missing (the caller names the file).
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown projection '{name}'; known: {', '.join(BUILDERS)}")
    return BUILDERS[name](state_dict)
