"""What an IP-Adapter file is (``AdapterSpec``, detected from its weights) and the loaded adapter.

Detection reads key names and tensor shapes only, never the file name, so it works on renamed files,
on the ``meta`` device and on scaled-down test adapters:

* family: the number of cross-attention layers in ``ip_adapter`` (16 = SD1.5, 70 = SDXL);
* kind: the ``image_proj`` layout (see ``KINDS``), plus the face-embedding width for the FaceID kinds;
* widths: the encoder width from the projection's input, the cross-attention width and the per-layer
  hidden sizes from ``to_k_ip``.

Variants that share a layout share a kind: Light / Light v1.1 are ``base``; Plus-Face is ``plus``;
FaceID-Plus and FaceID-Plus V2 are both ``faceid-plus`` (V2 is the same weights used with the shortcut
``out = x + s * perceiver(x)``, ``s`` being the runtime weight ``weight_faceidv2``; it is chosen when the
adapter is applied, not stored in the file).
"""
from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .checkpoint import IMAGE_PROJ, IP_ADAPTER, AdapterFileError, load_state_dict, read_layout
from .projection import build_projection

# ----------------------------------------------------------------------------------------------------
# facts about the UNets

# Cross-attention modules in diffusers' attn_processors order (down, up, mid):
# (block kind, block index, attention modules in the block, transformer blocks per module).
UNET_LAYOUTS: dict[str, tuple[tuple[str, int, int, int], ...]] = {
    "sd15": (("down", 0, 2, 1), ("down", 1, 2, 1), ("down", 2, 2, 1),
             ("up", 1, 3, 1), ("up", 2, 3, 1), ("up", 3, 3, 1), ("mid", 0, 1, 1)),
    "sdxl": (("down", 1, 2, 2), ("down", 2, 2, 10), ("up", 0, 3, 10), ("up", 1, 3, 2), ("mid", 0, 1, 10)),
}
FAMILY_BY_LAYERS = {16: "sd15", 70: "sdxl"}
FAMILY_LABELS = {"sd15": "SD1.5", "sdxl": "SDXL"}


def _layout_entries(family: str):
    for block, index, modules, depth in UNET_LAYOUTS[family]:
        for module in range(modules):
            for t in range(depth):
                yield block, index, module, t


def attn2_layer_names(family: str) -> tuple[str, ...]:
    """diffusers names of the cross-attention modules, in checkpoint order (``ip_adapter.{2i+1}``)."""
    prefix = {"down": "down_blocks.{}", "up": "up_blocks.{}", "mid": "mid_block"}
    return tuple(f"{prefix[b].format(i)}.attentions.{m}.transformer_blocks.{t}.attn2"
                 for b, i, m, t in _layout_entries(family))


def attn2_hidden_sizes(family: str, block_out_channels: tuple[int, ...]) -> tuple[int, ...]:
    """Hidden width of every cross-attention layer, in checkpoint order, for a UNet's block widths.

    down block i -> ``block_out[i]``; up block i -> ``reversed(block_out)[i]``; mid -> ``block_out[-1]``.
    """
    widths = {"down": lambda i: block_out_channels[i], "up": lambda i: block_out_channels[::-1][i],
              "mid": lambda i: block_out_channels[-1]}
    return tuple(widths[b](i) for b, i, _, _ in _layout_entries(family))


# ----------------------------------------------------------------------------------------------------
# kinds and encoders

@dataclass(frozen=True)
class KindInfo:
    projection: str  # name in core.projection.BUILDERS
    feature: str     # what feeds the projection
    label: str       # for people


KINDS: dict[str, KindInfo] = {
    "base": KindInfo("linear", "image_embeds", "IP-Adapter (also Light / Light v1.1)"),
    "plus": KindInfo("resampler", "penultimate_hidden_states", "Plus (also Plus-Face)"),
    "full-face": KindInfo("token-mlp", "penultimate_hidden_states", "Full-Face"),
    "faceid": KindInfo("faceid-mlp", "face_embedding", "FaceID"),
    "faceid-plus": KindInfo("faceid-plus", "face_embedding+penultimate_hidden_states",
                            "FaceID-Plus / Plus V2 (V2 = shortcut on, set at apply time)"),
    "portrait": KindInfo("faceid-mlp", "face_embedding", "FaceID Portrait"),
    "portrait-unnorm": KindInfo("resampler", "face_embedding", "FaceID Portrait (un-normalised embeddings)"),
}

# Public image encoders by the width of the feature an adapter consumes.
ENCODER_BY_WIDTH = {
    "image_embeds": {1024: "vit-h", 1280: "vit-bigG"},
    "penultimate_hidden_states": {1280: "vit-h", 1664: "vit-bigG"},
}
ENCODER_LABELS = {"vit-h": "ViT-H/14", "vit-bigG": "ViT-bigG/14"}
FACE_EMBED_DIM = 512  # insightface buffalo_l / antelopev2 recognition embedding


@dataclass(frozen=True)
class AdapterSpec:
    """What an IP-Adapter checkpoint is, as far as its weights tell.

    ``kind``: ``base`` (also Light / Light v1.1: identical shapes), ``plus`` (also Plus-Face: identical
    shapes), ``full-face``, ``faceid``, ``faceid-plus`` (FaceID-Plus and Plus V2 share weights; V2 is the
    shortcut, a runtime weight ``weight_faceidv2``), ``portrait``, ``portrait-unnorm``.
    ``encoder_width`` is the width of the feature the projection consumes (image_embeds width, hidden
    width, or 512 for a face embedding); ``encoder_hint`` names the public encoder of that width, or is
    None when none matches (e.g. tiny test encoders). ``tokens`` is IP tokens per image (per face for
    Portrait). ``hidden_sizes`` has one entry per cross-attention layer in checkpoint order.
    """

    family: str
    kind: str
    projection: str
    feature: str
    encoder_width: int
    encoder_hint: str | None
    tokens: int
    cross_attention_dim: int
    hidden_sizes: tuple[int, ...]
    num_layers: int
    has_lora: bool = False
    face_embed_dim: int | None = None

    @property
    def uses_clip_vision(self) -> bool:
        """True when the projection reads CLIP vision features (everything except FaceID/Portrait)."""
        return "image_embeds" in self.feature or "hidden_states" in self.feature

    @property
    def clip_width(self) -> int | None:
        """Width of the CLIP vision feature needed (image_embeds or hidden), or None for face-only kinds."""
        return self.encoder_width if self.uses_clip_vision else None


# ----------------------------------------------------------------------------------------------------
# detection

_IP_KEY = re.compile(r"^(\d+)\.to_([kv])_ip\.weight$")


def detect(state_dict: Mapping[str, Mapping[str, torch.Tensor]], name: str = "<file>") -> AdapterSpec:
    """Tell which IP-Adapter variant a two-part state dict is, from key names and shapes only.

    Raises :class:`AdapterFileError` naming ``name`` and listing what was found when the layout is not
    one of the known variants.
    """
    image_proj = state_dict.get(IMAGE_PROJ) or {}
    ip_adapter = state_dict.get(IP_ADAPTER) or {}
    family, cross, hidden = _detect_layers(ip_adapter, name)
    has_lora = any(".to_q_lora." in key for key in ip_adapter)
    kind, encoder_width, tokens, out_dim = _detect_projection(image_proj, has_lora, name)
    if out_dim != cross:
        raise AdapterFileError(
            f"IP-Adapter '{name}' is inconsistent: image_proj makes {out_dim}-wide tokens but to_k_ip/to_v_ip "
            f"expect {cross}-wide ones; the file may be a mix of two adapters"
        )
    info = KINDS[kind]
    face_dim = image_proj["proj.0.weight"].shape[1] if kind in ("faceid", "portrait", "faceid-plus") else None
    if kind == "portrait-unnorm":
        face_dim = encoder_width
    clip_feature = info.feature.split("+")[-1]
    hint = ENCODER_BY_WIDTH.get(clip_feature, {}).get(encoder_width)
    return AdapterSpec(family=family, kind=kind, projection=info.projection, feature=info.feature,
                       encoder_width=encoder_width, encoder_hint=hint, tokens=tokens, cross_attention_dim=cross,
                       hidden_sizes=hidden, num_layers=len(hidden), has_lora=has_lora, face_embed_dim=face_dim)


def _detect_layers(ip_adapter: Mapping[str, torch.Tensor], name: str) -> tuple[str, int, tuple[int, ...]]:
    found: dict[int, dict[str, torch.Size]] = {}
    for key, value in ip_adapter.items():
        match = _IP_KEY.match(key)
        if match:
            found.setdefault(int(match.group(1)), {})[match.group(2)] = value.shape
    if not found:
        keys = ", ".join(list(ip_adapter)[:5]) or "none"
        raise AdapterFileError(
            f"IP-Adapter '{name}' has no per-layer 'N.to_k_ip.weight' / 'N.to_v_ip.weight' weights in its "
            f"'ip_adapter' part (found {len(ip_adapter)} keys: {keys}); it is not a usable IP-Adapter"
        )
    count = len(found)
    if count not in FAMILY_BY_LAYERS:
        known = ", ".join(f"{n} ({FAMILY_LABELS[f]})" for n, f in FAMILY_BY_LAYERS.items())
        raise AdapterFileError(
            f"IP-Adapter '{name}' has K/V weights for {count} cross-attention layers; known UNets have {known}. "
            f"This adapter is for a model this pack does not support (e.g. SD3, Flux, Kolors variants)"
        )
    indices = sorted(found)
    expected = [2 * i + 1 for i in range(count)]
    if indices != expected or any(set(kv) != {"k", "v"} for kv in found.values()):
        raise AdapterFileError(
            f"IP-Adapter '{name}': the to_k_ip/to_v_ip layer numbers are {indices[:6]}...; expected one K and one V "
            f"for each of 1, 3, ..., {expected[-1]} (odd positions in the UNet's attention order)"
        )
    crosses = {found[i]["k"][1] for i in indices} | {found[i]["v"][1] for i in indices}
    if len(crosses) != 1:
        raise AdapterFileError(f"IP-Adapter '{name}': to_k_ip/to_v_ip have mixed input widths {sorted(crosses)}")
    return FAMILY_BY_LAYERS[count], crosses.pop(), tuple(int(found[i]["k"][0]) for i in indices)


def _detect_projection(image_proj: Mapping[str, torch.Tensor], has_lora: bool,
                       name: str) -> tuple[str, int, int, int]:
    """(kind, encoder width, tokens per image, output width) from the image_proj layout."""
    try:
        if "perceiver_resampler.proj_in.weight" in image_proj:
            dim = image_proj["norm.weight"].shape[0]
            tokens = image_proj["proj.2.weight"].shape[0] // dim
            return ("faceid-plus", image_proj["perceiver_resampler.proj_in.weight"].shape[1], tokens,
                    image_proj["perceiver_resampler.norm_out.weight"].shape[0])
        if "latents" in image_proj:
            width = image_proj["proj_in.weight"].shape[1]
            # A resampler reading 512-d vectors reads face embeddings (no CLIP encoder is 512 wide).
            kind = "portrait-unnorm" if width == FACE_EMBED_DIM else "plus"
            return kind, width, image_proj["latents"].shape[1], image_proj["norm_out.weight"].shape[0]
        if "proj.3.weight" in image_proj:
            # One IP token per encoder token: 257 for a 224 px ViT/14 (16 x 16 patches + class token).
            return "full-face", image_proj["proj.0.weight"].shape[1], 257, image_proj["proj.3.weight"].shape[0]
        if "proj.weight" in image_proj:
            cross = image_proj["norm.weight"].shape[0]
            return "base", image_proj["proj.weight"].shape[1], image_proj["proj.weight"].shape[0] // cross, cross
        if "proj.2.weight" in image_proj and "norm.weight" in image_proj:
            cross = image_proj["norm.weight"].shape[0]
            tokens = image_proj["proj.2.weight"].shape[0] // cross
            # FaceID has 4 tokens and an attention LoRA; Portrait has 16 tokens per face and no LoRA.
            kind = "faceid" if has_lora or tokens == 4 else "portrait"
            return kind, image_proj["proj.0.weight"].shape[1], tokens, cross
    except KeyError as missing:
        raise AdapterFileError(
            f"IP-Adapter '{name}': image_proj looks like a known layout but lacks {missing}; the file is incomplete"
        ) from None
    keys = ", ".join(list(image_proj)[:8]) or "none"
    raise AdapterFileError(
        f"IP-Adapter '{name}': unknown image_proj layout ({len(image_proj)} keys: {keys}); expected base "
        f"(proj, norm), Plus (latents, proj_in, layers...), Full-Face (proj.0-3), FaceID (proj.0, proj.2, norm) "
        f"or FaceID-Plus (... perceiver_resampler)"
    )


def describe_spec(spec: AdapterSpec) -> str:
    """One line for people: family, kind, tokens, what it needs, cross-attention width."""
    encoder = f" ({ENCODER_LABELS[spec.encoder_hint]})" if spec.encoder_hint else ""
    clip = f"a {spec.encoder_width}-wide encoder{encoder}"
    needs = {
        "image_embeds": f"image_embeds of {clip}",
        "penultimate_hidden_states": f"penultimate hidden states of {clip}",
        "face_embedding": f"{spec.face_embed_dim}-d insightface face embeddings"
                          + (" (raw, not normalised)" if spec.kind == "portrait-unnorm" else ""),
        "face_embedding+penultimate_hidden_states":
            f"a {spec.face_embed_dim}-d face embedding and penultimate hidden states of {clip}",
    }[spec.feature]
    per = " per face" if spec.kind == "portrait" else ""
    lora = ", with attention LoRA" if spec.has_lora else ""
    return (f"{FAMILY_LABELS[spec.family]} {KINDS[spec.kind].label}, {spec.tokens} tokens{per}, needs {needs}, "
            f"cross-attention {spec.cross_attention_dim}{lora}")


def describe_file(path: str | os.PathLike) -> str:
    """What the file at ``path`` is, in one line without its name; reads only shapes (fast on big files).

    Raises :class:`AdapterFileError` when the file is unreadable or not a known IP-Adapter.
    """
    path = Path(path)
    return describe_spec(detect(read_layout(path), path.name))


def describe(path: str | os.PathLike) -> str:
    """One line for ``ipadapter models``: ``"<file name>: <what it is>"``, or why it is not usable."""
    path = Path(path)
    try:
        return f"{path.name}: {describe_file(path)}"
    except AdapterFileError as error:
        return f"{path.name}: not usable: {error}"


# ----------------------------------------------------------------------------------------------------
# the loaded adapter


@dataclass(eq=False)
class IPAdapter:
    """A loaded IP-Adapter: spec, projection module and per-layer K/V weights (all float32, CPU).

    ``to_k_ip[i]`` / ``to_v_ip[i]`` ([hidden_i, cross_dim]) belong to the i-th cross-attention layer in
    diffusers' ``attn_processors`` order (down, up, mid), checkpoint key ``ip_adapter.{2i+1}``.
    ``lora`` holds the FaceID attention-LoRA tensors keyed as in the file's ``ip_adapter`` part
    (e.g. ``"0.to_q_lora.down.weight"``), empty for the other kinds.
    """

    spec: AdapterSpec
    path: Path
    image_proj: nn.Module
    to_k_ip: list[torch.Tensor]
    to_v_ip: list[torch.Tensor]
    lora: dict[str, torch.Tensor] = field(default_factory=dict)

    @torch.no_grad()
    def project(self, features: torch.Tensor, clip_hidden: torch.Tensor | None = None, *,
                shortcut: bool = False, scale: float = 1.0) -> torch.Tensor:
        """Run the projection: encoder features -> IP tokens [B, T, C] (float32, on the module's device).

        ``features`` is what ``spec.feature`` names: image_embeds [B,E] (base), hidden states [B,N,E] (plus,
        full-face), face embeddings [B,512] (FaceID), [B,n,512] (Portrait: n faces -> n*T tokens;
        Portrait-unnorm: a sequence read by the resampler, [B,512] counts as one face). FaceID-Plus also
        needs ``clip_hidden`` [B,N,E] and takes the V2 ``shortcut`` and its ``scale``.
        """
        param = next(self.image_proj.parameters())
        features = features.to(param.device, param.dtype)
        if self.spec.projection == "resampler" and features.ndim == 2:
            features = features.unsqueeze(1)  # Portrait-unnorm: one face embedding is a one-token sequence
        if self.spec.kind == "faceid-plus":
            if clip_hidden is None:
                raise ValueError(f"IP-Adapter '{self.path.name}' (FaceID-Plus) needs CLIP hidden states of the face crop")
            return self.image_proj(features, clip_hidden.to(param.device, param.dtype), shortcut=shortcut, scale=scale)
        return self.image_proj(features)


def from_state_dict(state_dict: Mapping[str, Mapping[str, torch.Tensor]], path: str | os.PathLike) -> IPAdapter:
    """Build an :class:`IPAdapter` from a two-part state dict (tensors are cast to float32)."""
    path = Path(path)
    spec = detect(state_dict, path.name)
    part = {k: v.float() for k, v in state_dict[IMAGE_PROJ].items()}
    try:
        with torch.device("meta"):
            module = build_projection(spec.projection, part)
        module.load_state_dict(part, strict=True, assign=True)
    except (KeyError, RuntimeError) as error:
        raise AdapterFileError(
            f"IP-Adapter '{path.name}': image_proj does not fit the {spec.projection} projection of a "
            f"{FAMILY_LABELS[spec.family]} {spec.kind} adapter: {error}"
        ) from error
    module.requires_grad_(False).eval()
    ip = state_dict[IP_ADAPTER]
    to_k = [ip[f"{2 * i + 1}.to_k_ip.weight"].float() for i in range(spec.num_layers)]
    to_v = [ip[f"{2 * i + 1}.to_v_ip.weight"].float() for i in range(spec.num_layers)]
    lora = {k: v.float() for k, v in ip.items() if "_lora." in k}
    return IPAdapter(spec=spec, path=path, image_proj=module, to_k_ip=to_k, to_v_ip=to_v, lora=lora)


_CACHE: dict[str, tuple[tuple[int, int], IPAdapter]] = {}
_CACHE_LOCK = threading.Lock()


def load_adapter(path: str | os.PathLike) -> IPAdapter:
    """Load an IP-Adapter file, once per (absolute path, modification time, size): every node and every
    model clone that names the same unchanged file shares one object. A rewritten file is reloaded."""
    resolved = Path(path).resolve()
    try:
        stat = resolved.stat()
    except FileNotFoundError:
        raise AdapterFileError(f"IP-Adapter file '{path}' does not exist; check the name and the folder") from None
    stamp = (stat.st_mtime_ns, stat.st_size)
    key = str(resolved)
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
        if cached and cached[0] == stamp:
            return cached[1]
        adapter = from_state_dict(load_state_dict(resolved), resolved)
        _CACHE[key] = (stamp, adapter)  # replaces a stale entry for the same path
        return adapter


def clear_cache() -> None:
    """Forget every loaded adapter (tests; freeing memory)."""
    with _CACHE_LOCK:
        _CACHE.clear()
