"""Random IP-Adapter files in the real key layouts, at real or tiny widths, for the demo and the tests.

Every published variant (``ipadapter_key_manifest.json`` in the team's reference notes) has a short name
here (``VARIANTS``). At ``widths="real"`` the keys and shapes are exactly those of the published files
(use the ``meta`` device for the big ones); at ``widths="tiny"`` every width follows the tiny models of
``runtime/tiny.py`` so a tiny adapter fits the tiny UNet and tiny encoder of its family:

* cross-attention 768 -> 32 (SD1.5), 2048 -> 64 (SDXL); per-layer hidden sizes follow the tiny UNets'
  ``block_out_channels`` with the real rule (``core.adapter.attn2_hidden_sizes``);
* ViT-H hidden 1280 -> 48, image_embeds 1024 -> 32; ViT-bigG hidden 1664 -> 64, image_embeds 1280 -> 40;
* face embedding 512 and the FaceID MLP's inner 1024 stay; token counts, depth 4 and FF ratio 4 stay;
* resampler width = cross-attention width, 2 heads of width 64 (the head width stays 64 because every
  loader, diffusers' included, infers the number of heads as ``to_q rows / 64``); LoRA rank 128 -> 4.

Values are random but at working scales (weights ~ N(0, 1/fan_in), LayerNorm weights ~ 1, biases small),
so every output is non-trivial, and deterministic for a seed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.adapter import attn2_hidden_sizes
from . import tiny


@dataclass(frozen=True)
class Variant:
    """One published IP-Adapter layout: what it is built from, and the kind detection must report."""

    family: str    # "sd15" | "sdxl"
    layout: str    # projection name (core.projection.BUILDERS)
    encoder: str   # "vit-h" | "vit-bigG" | "face"
    feature: str   # "embeds" | "hidden" | "face"
    tokens: int
    kind: str
    lora: bool = False
    resampler_dim: int = 0    # real width of the resampler latents (0: the cross-attention width)
    resampler_heads: int = 0  # real number of heads (0: width / 64)


VARIANTS: dict[str, Variant] = {
    "sd15": Variant("sd15", "linear", "vit-h", "embeds", 4, "base"),
    "sd15-light": Variant("sd15", "linear", "vit-h", "embeds", 4, "base"),
    "sd15-vit-g": Variant("sd15", "linear", "vit-bigG", "embeds", 4, "base"),
    "sd15-plus": Variant("sd15", "resampler", "vit-h", "hidden", 16, "plus", resampler_dim=768, resampler_heads=12),
    "sd15-plus-face": Variant("sd15", "resampler", "vit-h", "hidden", 16, "plus", resampler_dim=768,
                              resampler_heads=12),
    "sd15-full-face": Variant("sd15", "token-mlp", "vit-h", "hidden", 257, "full-face"),
    "sdxl": Variant("sdxl", "linear", "vit-bigG", "embeds", 4, "base"),
    "sdxl-vit-h": Variant("sdxl", "linear", "vit-h", "embeds", 4, "base"),
    "sdxl-plus-vit-h": Variant("sdxl", "resampler", "vit-h", "hidden", 16, "plus", resampler_dim=1280,
                               resampler_heads=20),
    "sdxl-plus-face-vit-h": Variant("sdxl", "resampler", "vit-h", "hidden", 16, "plus", resampler_dim=1280,
                                    resampler_heads=20),
    "faceid-sd15": Variant("sd15", "faceid-mlp", "face", "face", 4, "faceid", lora=True),
    "faceid-plus-sd15": Variant("sd15", "faceid-plus", "vit-h", "hidden", 4, "faceid-plus", lora=True),
    "faceid-plusv2-sd15": Variant("sd15", "faceid-plus", "vit-h", "hidden", 4, "faceid-plus", lora=True),
    "faceid-sdxl": Variant("sdxl", "faceid-mlp", "face", "face", 4, "faceid", lora=True),
    "faceid-plusv2-sdxl": Variant("sdxl", "faceid-plus", "vit-h", "hidden", 4, "faceid-plus", lora=True),
    "portrait-sd15": Variant("sd15", "faceid-mlp", "face", "face", 16, "portrait"),
    "portrait-sdxl": Variant("sdxl", "faceid-mlp", "face", "face", 16, "portrait"),
    "portrait-unnorm-sdxl": Variant("sdxl", "resampler", "face", "face", 16, "portrait-unnorm", resampler_dim=1280,
                                    resampler_heads=20),
}

# The manifest's variant names (one per distinct layout) -> our short names.
MANIFEST_NAMES = {
    "ip-adapter_sd15": "sd15",
    "ip-adapter_sd15_light(_v11)": "sd15-light",
    "ip-adapter_sd15_vit-G": "sd15-vit-g",
    "ip-adapter-plus(-face)_sd15": "sd15-plus",
    "ip-adapter-full-face_sd15": "sd15-full-face",
    "ip-adapter_sdxl": "sdxl",
    "ip-adapter_sdxl_vit-h": "sdxl-vit-h",
    "ip-adapter-plus(-face)_sdxl_vit-h": "sdxl-plus-vit-h",
    "ip-adapter-faceid_sd15": "faceid-sd15",
    "ip-adapter-faceid-plus(v2)_sd15": "faceid-plus-sd15",
    "ip-adapter-faceid_sdxl": "faceid-sdxl",
    "ip-adapter-faceid-plusv2_sdxl": "faceid-plusv2-sdxl",
    "ip-adapter-faceid-portrait(-v11)_sd15": "portrait-sd15",
    "ip-adapter-faceid-portrait_sdxl": "portrait-sdxl",
    "ip-adapter-faceid-portrait_sdxl_unnorm": "portrait-unnorm-sdxl",
}


@dataclass(frozen=True)
class Widths:
    cross: dict
    block_out: dict
    encoder: dict  # (encoder, feature) -> width
    face_inner: int
    lora_rank: int
    tiny: bool


REAL = Widths(
    cross={"sd15": 768, "sdxl": 2048},
    block_out={"sd15": (320, 640, 1280, 1280), "sdxl": (320, 640, 1280)},
    encoder={("vit-h", "hidden"): 1280, ("vit-h", "embeds"): 1024, ("vit-bigG", "hidden"): 1664,
             ("vit-bigG", "embeds"): 1280, ("face", "face"): 512},
    face_inner=1024, lora_rank=128, tiny=False,
)
_VIT_H, _VIT_G = tiny.TINY_CLIP_VISION["vit-h"], tiny.TINY_CLIP_VISION["vit-bigG"]
TINY = Widths(
    cross={"sd15": tiny.TINY_SD15["cross_attention_dim"], "sdxl": tiny.TINY_SDXL["cross_attention_dim"]},
    block_out={"sd15": tuple(tiny.TINY_SD15["block_out_channels"]), "sdxl": tuple(tiny.TINY_SDXL["block_out_channels"])},
    encoder={("vit-h", "hidden"): _VIT_H["hidden_size"], ("vit-h", "embeds"): _VIT_H["projection_dim"],
             ("vit-bigG", "hidden"): _VIT_G["hidden_size"], ("vit-bigG", "embeds"): _VIT_G["projection_dim"],
             ("face", "face"): 512},
    face_inner=1024, lora_rank=4, tiny=True,
)
TINY_RESAMPLER_HEADS = 2
HEAD_WIDTH = 64
DEPTH = 4
FF_MULT = 4
FACE_DIM = 512


def _variant(name: str) -> Variant:
    name = MANIFEST_NAMES.get(name, name)
    if name not in VARIANTS:
        raise ValueError(f"unknown IP-Adapter variant '{name}'; known: {', '.join(VARIANTS)}")
    return VARIANTS[name]


# Each entry: (key, shape, init) with init one of "w" (weight), "b" (bias), "ln_w", "ln_b", "latents", "lora_up".
def _linear(key: str, out: int, inp: int, bias: bool = True) -> list:
    return [(f"{key}.weight", (out, inp), "w")] + ([(f"{key}.bias", (out,), "b")] if bias else [])


def _norm(key: str, dim: int) -> list:
    return [(f"{key}.weight", (dim,), "ln_w"), (f"{key}.bias", (dim,), "ln_b")]


def _perceiver(prefix: str, embed: int, dim: int, out: int, heads: int) -> list:
    inner = heads * HEAD_WIDTH
    entries = _linear(f"{prefix}proj_in", dim, embed) + _linear(f"{prefix}proj_out", out, dim) + _norm(
        f"{prefix}norm_out", out)
    for i in range(DEPTH):
        layer = f"{prefix}layers.{i}"
        entries += _norm(f"{layer}.0.norm1", dim) + _norm(f"{layer}.0.norm2", dim)
        entries += _linear(f"{layer}.0.to_q", inner, dim, bias=False) + _linear(f"{layer}.0.to_kv", 2 * inner, dim,
                                                                               bias=False)
        entries += _linear(f"{layer}.0.to_out", dim, inner, bias=False)
        entries += _norm(f"{layer}.1.0", dim) + _linear(f"{layer}.1.1", FF_MULT * dim, dim, bias=False)
        entries += _linear(f"{layer}.1.3", dim, FF_MULT * dim, bias=False)
    return entries


def _image_proj_entries(v: Variant, w: Widths) -> list:
    cross = w.cross[v.family]
    embed = w.encoder[(v.encoder, v.feature)]
    if v.layout == "linear":
        return _linear("proj", v.tokens * cross, embed) + _norm("norm", cross)
    if v.layout == "token-mlp":
        return _linear("proj.0", embed, embed) + _linear("proj.2", cross, embed) + _norm("proj.3", cross)
    if v.layout == "resampler":
        dim = cross if w.tiny else v.resampler_dim
        heads = TINY_RESAMPLER_HEADS if w.tiny else v.resampler_heads
        return [("latents", (1, v.tokens, dim), "latents")] + _perceiver("", embed, dim, cross, heads)
    mlp = _linear("proj.0", w.face_inner, FACE_DIM) + _linear("proj.2", v.tokens * cross, w.face_inner)
    if v.layout == "faceid-mlp":
        return mlp + _norm("norm", cross)
    heads = TINY_RESAMPLER_HEADS if w.tiny else cross // HEAD_WIDTH  # faceid-plus: perceiver width = cross
    return mlp + _norm("norm", cross) + _perceiver("perceiver_resampler.", embed, cross, cross, heads)


def _ip_adapter_entries(v: Variant, w: Widths) -> list:
    cross = w.cross[v.family]
    entries = []
    for i, hidden in enumerate(attn2_hidden_sizes(v.family, w.block_out[v.family])):
        for n in (2 * i, 2 * i + 1):  # attn1 (self-attention), then attn2 (cross-attention)
            if v.lora:
                context = cross if n % 2 else hidden
                r = w.lora_rank
                for name, inp in (("to_q", hidden), ("to_k", context), ("to_v", context), ("to_out", hidden)):
                    entries += [(f"{n}.{name}_lora.down.weight", (r, inp), "w"),
                                (f"{n}.{name}_lora.up.weight", (hidden, r), "lora_up")]
            if n % 2:
                entries += [(f"{n}.to_k_ip.weight", (hidden, cross), "w"), (f"{n}.to_v_ip.weight", (hidden, cross), "w")]
    return entries


def _fill(entries: list, generator: torch.Generator | None, device: str | torch.device,
          dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, shape, init in entries:
        if str(device) == "meta":
            out[key] = torch.empty(shape, dtype=dtype, device="meta")
            continue
        noise = torch.randn(shape, generator=generator)
        scale = {"w": shape[-1] ** -0.5, "b": 0.02, "ln_w": 0.1, "ln_b": 0.02, "latents": shape[-1] ** -0.5,
                 "lora_up": 0.1 * shape[-1] ** -0.5}[init]
        value = noise * scale + (1.0 if init == "ln_w" else 0.0)
        out[key] = value.to(device=device, dtype=dtype)
    return out


def random_state_dict(variant: str, widths: str = "tiny", device: str | torch.device = "cpu", *, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> dict[str, dict[str, torch.Tensor]]:
    """A random two-part state dict ``{"image_proj": ..., "ip_adapter": ...}`` of ``variant``.

    ``widths`` is ``"real"`` (the published shapes; put big ones on ``device="meta"``) or ``"tiny"``.
    """
    if widths not in ("real", "tiny"):
        raise ValueError(f"widths must be 'real' or 'tiny', not {widths!r}")
    v, w = _variant(variant), (REAL if widths == "real" else TINY)
    generator = None if str(device) == "meta" else torch.Generator().manual_seed(seed)
    image_proj = _fill(_image_proj_entries(v, w), generator, device, dtype)
    ip_adapter = _fill(_ip_adapter_entries(v, w), generator, device, dtype)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def make_adapter(variant: str, path: str | os.PathLike, *, widths: str = "tiny", fmt: str | None = None,
                 seed: int = 0, dtype_mix: bool = False, dtype: torch.dtype = torch.float32,
                 prefixes: tuple[str, str] = ("image_proj", "ip_adapter")) -> Path:
    """Write a random ``variant`` adapter to ``path`` and return the path.

    ``fmt``: ``"safetensors"`` (flat ``image_proj.*`` / ``ip_adapter.*`` keys) or ``"bin"`` (a nested dict
    saved with ``torch.save``); by default from the suffix. ``dtype_mix`` writes image_proj in fp32 and
    ip_adapter in fp16, as some published files are. ``prefixes`` renames the two parts (the training
    scripts' ``("image_proj_model", "adapter_modules")``).
    """
    path = Path(path)
    fmt = fmt or ("safetensors" if path.suffix.lower() in (".safetensors", ".sft") else "bin")
    state = random_state_dict(variant, widths, "cpu", seed=seed, dtype=dtype)
    if dtype_mix:
        state = {"image_proj": {k: t.float() for k, t in state["image_proj"].items()},
                 "ip_adapter": {k: t.half() for k, t in state["ip_adapter"].items()}}
    parts = dict(zip(prefixes, (state["image_proj"], state["ip_adapter"])))
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({f"{part}.{k}": t.contiguous() for part, sd in parts.items() for k, t in sd.items()}, str(path))
    elif fmt == "bin":
        torch.save(parts, path)
    else:
        raise ValueError(f"fmt must be 'safetensors' or 'bin', not {fmt!r}")
    return path
