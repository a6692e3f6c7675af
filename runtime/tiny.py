"""Deterministic tiny models with the real block topology, for the demo and the tests.

The widths below are the contract shared by the tiny checkpoints, the tiny image encoders and the tiny
IP-Adapter files (``runtime/tiny_adapters.py``): a tiny adapter made for ``sd15`` must fit the tiny SD1.5
UNet and the tiny encoder it names, exactly like a real one fits the real models.

Real → tiny widths:
  SD1.5 cross-attention 768 → 32; SDXL 2048 → 64 (two text encoders of 32)
  CLIP ViT-H/14: hidden 1280 → 48, image_embeds 1024 → 32
  CLIP ViT-bigG/14: hidden 1664 → 64, image_embeds 1280 → 40
  Face embedding (insightface): 512 stays 512
Token counts (4, 16, 257, ...) and image size (224 px → 257 tokens) stay real.
"""
from __future__ import annotations

TINY_SD15 = dict(
    cross_attention_dim=32,
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=2,
    attention_head_dim=4,        # diffusers' legacy name: number of heads, as in the SD1.5 config
    norm_num_groups=16,
    text_hidden=32,
)
TINY_SDXL = dict(
    cross_attention_dim=64,
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(2, 4, 4),
    norm_num_groups=16,
    addition_time_embed_dim=8,
    text_hidden=(32, 32),        # text_encoder (CLIPTextModel), text_encoder_2 (with projection)
    pooled_dim=32,               # text_encoder_2 projection_dim
)
TINY_CLIP_VISION = {
    # name: (hidden_size, projection_dim) — tiny stand-ins for ViT-H/14 and ViT-bigG/14
    "vit-h": dict(hidden_size=48, projection_dim=32, num_hidden_layers=3, num_attention_heads=4,
                  intermediate_size=96, image_size=224, patch_size=14),
    "vit-bigG": dict(hidden_size=64, projection_dim=40, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=128, image_size=224, patch_size=14),
}
