"""CLIP vision weight files: key naming (transformers / OpenCLIP) and the model config read from tensor shapes."""
from __future__ import annotations

import logging
import math
import re
from typing import Any

import torch

log = logging.getLogger(__name__)

# Attention heads cannot be read from weight shapes.  Known public widths (hidden size → heads); other
# widths need `num_attention_heads` in the safetensors metadata or a transformers folder with config.json.
_KNOWN_HEADS = {768: 12, 1024: 16, 1280: 16, 1664: 16}
# OpenAI's own ViT-B/L towers use quick_gelu; the OpenCLIP LAION towers (ViT-H, ViT-bigG) use gelu.
_QUICK_GELU_WIDTHS = (768, 1024)


_OPENCLIP_LAYER = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
_OPENCLIP_TOP = {
    "class_embedding": "vision_model.embeddings.class_embedding",
    "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "ln_pre.weight": "vision_model.pre_layrnorm.weight", "ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "ln_post.weight": "vision_model.post_layernorm.weight", "ln_post.bias": "vision_model.post_layernorm.bias",
}


def to_transformers_keys(state_dict: dict[str, torch.Tensor], where: str = "state dict") -> dict[str, torch.Tensor]:
    """Return the vision tower of ``state_dict`` in transformers naming (``vision_model.*``, ``visual_projection``).

    Accepts transformers naming (with any prefix before ``vision_model.``) and OpenCLIP naming (with any prefix
    before ``transformer.resblocks.``, e.g. ``visual.``).  Other keys (a text tower, ``position_ids``) are dropped.
    """
    marker = "vision_model.embeddings.patch_embedding.weight"
    for key in state_dict:
        if key.endswith(marker):
            prefix = key[: -len(marker)]
            return {k[len(prefix):]: v for k, v in state_dict.items()
                    if k.startswith(prefix) and not k.endswith("position_ids")
                    and k[len(prefix):].startswith(("vision_model.", "visual_projection."))}
    for key in state_dict:
        # conv1 tells the vision tower from an OpenCLIP text tower, which has resblocks too
        if key.endswith("conv1.weight"):
            prefix = key[: -len("conv1.weight")]
            if prefix + "transformer.resblocks.0.attn.in_proj_weight" in state_dict:
                return _convert_openclip(state_dict, prefix)
    raise ValueError(
        f"{where} is not a CLIP vision model: expected transformers keys ('vision_model.embeddings."
        f"patch_embedding.weight', 'vision_model.encoder.layers.N.*') or OpenCLIP keys ('visual.conv1.weight', "
        f"'visual.transformer.resblocks.N.*'); found {len(state_dict)} keys such as {sorted(state_dict)[:3]}"
    )


def _convert_openclip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for short, target in _OPENCLIP_TOP.items():
        if prefix + short in sd:
            out[target] = sd[prefix + short]
    if prefix + "proj" in sd:  # OpenCLIP stores x @ proj; a Linear weight is its transpose
        out["visual_projection.weight"] = sd[prefix + "proj"].t().contiguous()
    layer = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.(.+)$")
    for key, value in sd.items():
        match = layer.match(key)
        if not match:
            continue
        index, rest = match.groups()
        base = f"vision_model.encoder.layers.{index}."
        if rest.startswith("attn.in_proj_"):  # fused q,k,v (nn.MultiheadAttention order)
            kind = rest.rsplit("_", 1)[1]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{base}self_attn.{name}.{kind}"] = part.contiguous()
            continue
        for old, new in _OPENCLIP_LAYER.items():
            if rest.startswith(old + "."):
                out[base + new + rest[len(old):]] = value
                break
    return out


def infer_config(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                 where: str = "state dict") -> dict[str, Any]:
    """CLIPVisionConfig values from a transformers-named state dict's tensor shapes (and optional metadata)."""
    metadata = metadata or {}
    required = ("vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.position_embedding.weight",
                "vision_model.encoder.layers.0.mlp.fc1.weight", "visual_projection.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise ValueError(f"{where}: CLIP vision weights are incomplete, missing {missing}; expected a CLIP vision "
                         f"model with projection (CLIPVisionModelWithProjection)")
    patch = state_dict["vision_model.embeddings.patch_embedding.weight"]
    hidden, patch_size = int(patch.shape[0]), int(patch.shape[-1])
    grid = math.isqrt(int(state_dict["vision_model.embeddings.position_embedding.weight"].shape[0]) - 1)
    layer_ids = {int(m.group(1)) for k in state_dict if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k))}
    layers = max(layer_ids) + 1
    if "num_attention_heads" in metadata:
        heads = int(metadata["num_attention_heads"])
    elif hidden in _KNOWN_HEADS:
        heads = _KNOWN_HEADS[hidden]
    else:
        heads = next(h for h in (16, 12, 8, 4, 2, 1) if hidden % h == 0)
        log.warning("%s: hidden size %d is not a known CLIP width and the file names no num_attention_heads; "
                    "assuming %d heads", where, hidden, heads)
    default_act = "quick_gelu" if hidden in _QUICK_GELU_WIDTHS and layers in (12, 24) else "gelu"
    return dict(
        hidden_size=hidden, patch_size=patch_size, image_size=grid * patch_size, num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=int(state_dict["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        projection_dim=int(state_dict["visual_projection.weight"].shape[0]),
        hidden_act=metadata.get("hidden_act", default_act),
        layer_norm_eps=float(metadata.get("layer_norm_eps", 1e-5)),
    )
