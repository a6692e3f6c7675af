"""Projection modules equal diffusers' own classes, loaded through diffusers' own conversion, on the same weights."""
from __future__ import annotations

import functools

import pytest
import torch
from diffusers import UNet2DConditionModel

from ipadapter_nodes.core.adapter import detect, from_state_dict
from ipadapter_nodes.core.projection import build_projection
from ipadapter_nodes.runtime.tiny_adapters import random_state_dict

TOL = 1e-6


def diffusers_projection(image_proj: dict) -> torch.nn.Module:
    """diffusers' module for this image_proj part, built and loaded by diffusers' converter (strict)."""
    # The converter only touches ``self`` on its low-memory path, so it can run without a UNet.
    module = UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers(None, image_proj, low_cpu_mem_usage=False)
    return module.eval()


@functools.lru_cache(maxsize=None)
def ours(variant: str, seed: int = 0):
    """(our loaded adapter, diffusers' module) on the same random weights; built once per variant."""
    state = random_state_dict(variant, "tiny", seed=seed)
    return from_state_dict(state, f"{variant}.safetensors"), diffusers_projection(state["image_proj"])


def gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
@pytest.mark.parametrize("variant", ["sd15", "sd15-vit-g", "sdxl"])
def test_base_projection_equals_diffusers_image_projection(variant):
    adapter, reference = ours(variant)
    embeds = torch.randn(3, adapter.spec.encoder_width, generator=gen())
    out = adapter.project(embeds)
    assert out.shape == (3, 4, adapter.spec.cross_attention_dim)
    assert (out - reference(embeds)).abs().max().item() <= TOL


@torch.no_grad()
@pytest.mark.parametrize("variant", ["sd15-plus", "sdxl-plus-vit-h"])
def test_plus_resampler_equals_diffusers(variant):
    adapter, reference = ours(variant)
    hidden = torch.randn(2, 257, adapter.spec.encoder_width, generator=gen())
    out = adapter.project(hidden)
    assert out.shape == (2, 16, adapter.spec.cross_attention_dim)
    assert out.std().item() > 0.5  # LayerNorm output: a real signal, not zeros
    assert (out - reference(hidden)).abs().max().item() <= TOL


@torch.no_grad()
def test_full_face_equals_diffusers_full_projection():
    adapter, reference = ours("sd15-full-face")
    hidden = torch.randn(2, 257, adapter.spec.encoder_width, generator=gen())
    out = adapter.project(hidden)
    assert out.shape == (2, 257, 32)
    assert (out - reference(hidden)).abs().max().item() <= TOL


@torch.no_grad()
@pytest.mark.parametrize("variant", ["faceid-sd15", "faceid-sdxl"])
def test_faceid_mlp_equals_diffusers(variant):
    adapter, reference = ours(variant)
    face = torch.nn.functional.normalize(torch.randn(2, 512, generator=gen()), dim=-1)
    out = adapter.project(face)
    assert out.shape == (2, 4, adapter.spec.cross_attention_dim)
    assert (out - reference(face)).abs().max().item() <= TOL


@torch.no_grad()
def test_portrait_several_faces_concatenate_along_tokens_like_diffusers():
    adapter, reference = ours("portrait-sd15")
    faces = torch.randn(2, 3, 512, generator=gen())  # 2 images, 3 faces each
    out = adapter.project(faces)
    assert out.shape == (2, 3 * 16, 32)
    # diffusers projects each face separately ([B*n, 16, C]); the IP tokens are the faces' tokens in order.
    expected = reference(faces.reshape(6, 512)).reshape(2, 3 * 16, 32)
    assert (out - expected).abs().max().item() <= TOL
    assert (adapter.project(faces[:, 1]) - out[:, 16:32]).abs().max().item() <= TOL


@torch.no_grad()
@pytest.mark.parametrize("shortcut,scale", [(False, 1.0), (True, 1.0), (True, 2.5)])
@pytest.mark.parametrize("variant", ["faceid-plus-sd15", "faceid-plusv2-sdxl"])
def test_faceid_plus_equals_diffusers_with_and_without_shortcut(variant, shortcut, scale):
    adapter, reference = ours(variant)
    face = torch.randn(2, 512, generator=gen(2))
    clip_hidden = torch.randn(2, 257, adapter.spec.encoder_width, generator=gen(3))
    out = adapter.project(face, clip_hidden, shortcut=shortcut, scale=scale)
    reference.clip_embeds = clip_hidden[:, None]  # diffusers' layout: [B, images, tokens, width]
    reference.shortcut, reference.shortcut_scale = shortcut, scale
    assert out.shape == (2, 4, adapter.spec.cross_attention_dim)
    assert (out - reference(face)).abs().max().item() <= TOL


@torch.no_grad()
def test_faceid_plus_shortcut_adds_scaled_id_tokens():
    adapter, _ = ours("faceid-plus-sd15")
    face, clip_hidden = torch.randn(1, 512, generator=gen(2)), torch.randn(1, 257, 48, generator=gen(3))
    plain = adapter.project(face, clip_hidden)
    v2_one = adapter.project(face, clip_hidden, shortcut=True, scale=1.0)
    v2_two = adapter.project(face, clip_hidden, shortcut=True, scale=2.0)
    id_tokens = v2_one - plain  # x, the normalised ID tokens
    assert id_tokens.abs().max().item() > 0.1
    assert (v2_two - (id_tokens + 2.0 * plain)).abs().max().item() <= 1e-5


@torch.no_grad()
def test_portrait_unnorm_resampler_reads_face_embeddings_like_diffusers():
    adapter, reference = ours("portrait-unnorm-sdxl")
    faces = 20.0 * torch.randn(2, 3, 512, generator=gen())  # raw insightface embeddings have norm ~ 20
    out = adapter.project(faces)
    assert out.shape == (2, 16, 64)
    assert (out - reference(faces)).abs().max().item() <= TOL
    face = faces[:, 0].contiguous()  # a single face [B,512] is a one-token sequence
    assert (adapter.project(face) - reference(face[:, None])).abs().max().item() <= TOL


@pytest.mark.parametrize("variant", ["sd15-plus", "sdxl-plus-vit-h", "faceid-plusv2-sdxl", "portrait-sdxl"])
def test_projection_parameters_are_the_checkpoint_keys_at_real_shapes(variant):
    state = random_state_dict(variant, "real", "meta")
    with torch.device("meta"):
        module = build_projection(detect(state, variant).projection, state["image_proj"])
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == {
        k: tuple(v.shape) for k, v in state["image_proj"].items()}


@torch.no_grad()
def test_projection_runs_in_float32_even_from_fp16_weights():
    state = random_state_dict("sd15-plus", "tiny", dtype=torch.float16)
    adapter = from_state_dict(state, "half.safetensors")
    assert all(p.dtype == torch.float32 for p in adapter.image_proj.parameters())
    assert not any(p.requires_grad for p in adapter.image_proj.parameters())
    assert not adapter.image_proj.training
    out = adapter.project(torch.randn(1, 257, 48, generator=gen()).half())
    assert out.dtype == torch.float32
