"""Attention masks in the engine: confinement, diffusers' masked path, every layer at real output sizes.

* Confinement: in one real UNet call, at every cross-attention layer, what a masked adapter adds to the
  attention output is exactly 0 on the tokens outside the mask and non-zero inside.
* Several images in one adapter, each with its own mask, and several masked adapters, equal diffusers'
  ``cross_attention_kwargs={"ip_adapter_masks": ...}`` path (UNet output and a whole pipeline, fp32, 1e-5).
* Masks of 512x512, 512x768, 832x1216 and 1344x768 outputs reach every layer of the SD1.5 and SDXL UNets
  (run on the meta device: the real block topology on shapes only).
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter_nodes import attach
from ipadapter_nodes.core import masks
from ipadapter_nodes.core.adapter import load_adapter
from ipadapter_nodes.core.application import Application, PreparedApplication
from ipadapter_nodes.core.backends import common
from ipadapter_nodes.core.backends import diffusers as backend
from ipadapter_nodes.core.backends.diffusers import DiffusersModel, patched_unet
from ipadapter_nodes.core.embeds import Embeds, encode_for_adapter
from ipadapter_nodes.core.encode import load_clip_vision
from ipadapter_nodes.runtime import tiny
from ipadapter_nodes.runtime.tiny_adapters import make_adapter

TOLERANCE = 1e-5
SIZES = [(512, 512), (512, 768), (832, 1216), (1344, 768)]  # output width x height, px


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_models_dir) -> dict:
    folder = tmp_path_factory.mktemp("masked")
    out = {"folder": folder, "root": Path(tiny_models_dir)}
    for seed, variant in enumerate(("sd15", "sd15-plus", "sdxl")):
        out[variant] = make_adapter(variant, folder / f"{variant}.safetensors", seed=seed)
    out["vit-h"] = out["root"] / tiny.TINY_PATHS["tiny-vit-h"]
    return out


@pytest.fixture(scope="module")
def pipe(files):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(files["root"] / tiny.TINY_PATHS["tiny-sd15"], safety_checker=None)


@pytest.fixture(scope="module")
def vit_h(files):
    return load_clip_vision(files["vit-h"])


def pil_image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(224, 224, 3), dtype=np.uint8))


def half_masks(height: int = 64, width: int = 64) -> torch.Tensor:
    """Two binary masks of the output size: the left half and the right half (as IPAdapterMaskProcessor gives)."""
    left = torch.zeros(height, width)
    left[:, : width // 2] = 1.0
    return masks.prepare_masks(torch.stack([left, 1.0 - left]), height, width)


def unet_inputs(batch: int = 2, size: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(batch, 4, size, size, generator=g), timestep=torch.tensor(500),
                encoder_hidden_states=torch.randn(batch, 77, tiny.TINY_SD15["cross_attention_dim"], generator=g))


def run_ours(unet, applications, inputs, order=(1, 0)) -> torch.Tensor:
    model = DiffusersModel(unet, "sd15", dict(tiny.SD15_SCHEDULER), applications=tuple(applications))
    with torch.no_grad(), patched_unet(model) as state:
        state.cond_or_uncond = list(order)
        return unet(**inputs).sample


def diffusers_twin(pipe, files, variants, scales):
    twin = type(pipe)(**{**pipe.components, "unet": copy.deepcopy(pipe.unet)})
    twin.load_ip_adapter(str(files["folder"]), subfolder="", weight_name=[f"{v}.safetensors" for v in variants],
                         image_encoder_folder=None)
    twin.set_ip_adapter_scale(scales)
    return twin


def encode(vit_h, files, variant, images):
    spec = load_adapter(files[variant]).spec
    return encode_for_adapter(vit_h, spec, images, uncond="diffusers")


def reference_images(count: int, seed: int) -> torch.Tensor:
    return torch.rand(count, 224, 224, 3, generator=torch.Generator().manual_seed(seed))


# ---- confinement ---------------------------------------------------------------------------------------

def test_a_masked_adapter_adds_nothing_outside_its_mask_at_every_layer(pipe, files, vit_h, monkeypatch):
    """One UNet call on a 16x16 latent (128 px) with the left half masked: at every cross-attention layer the
    adapter's addition is exactly 0 on the right half of that layer's token grid and non-zero on the left."""
    seen = []
    original = backend.decoupled_attention

    def spy(text, query, terms):
        out = original(text, query, terms)
        seen.append((text, out))
        return out

    monkeypatch.setattr(backend, "decoupled_attention", spy)
    adapter = load_adapter(files["sd15"])
    embeds = encode(vit_h, files, "sd15", reference_images(1, 3))
    mask = torch.zeros(1, 128, 128)
    mask[:, :, :64] = 1.0
    run_ours(pipe.unet, [Application(adapter, embeds, weight=1.5, attn_mask=mask)], unet_inputs(size=16))
    assert len(seen) == 16  # every cross-attention layer, the middle block included
    for text, out in seen:
        height, width = next(masks.unet_grid((16, 16), level) for level in range(4)
                             if np.prod(masks.unet_grid((16, 16), level)) == text.shape[1])
        added = (out - text).view(text.shape[0], height, width, -1)
        assert torch.equal(added[:, :, width // 2:], torch.zeros_like(added[:, :, width // 2:]))
        assert added[:, :, : width // 2].abs().amax(dim=(1, 2, 3)).min() > 0  # every row, cond and uncond


def test_one_mask_per_latent_is_matched_to_the_cond_and_uncond_chunks(files, vit_h):
    adapter = load_adapter(files["sd15"])
    embeds = encode(vit_h, files, "sd15", reference_images(1, 4))
    per_latent = torch.stack([torch.ones(8, 8), torch.zeros(8, 8)])
    prepared = PreparedApplication(Application(adapter, embeds, attn_mask=per_latent))
    (term,) = common.image_terms([(prepared, common.SIGMA_BEFORE_START, 0.0)], 0, None, [1, 0], 4,
                                 torch.device("cpu"), torch.float32, query_len=64, latent_hw=(8, 8))
    # rows: uncond latent 0, uncond latent 1, cond latent 0, cond latent 1
    assert term.mask.shape == (4, 64, 1)
    assert [float(row.mean()) for row in term.mask] == [1.0, 0.0, 1.0, 0.0]


# ---- equal to diffusers' masked path -------------------------------------------------------------------

def test_one_adapter_with_two_masked_images_equals_diffusers(pipe, files, vit_h):
    embeds = encode(vit_h, files, "sd15-plus", reference_images(2, 5))
    image_masks = half_masks()
    inputs = unet_inputs()
    twin = diffusers_twin(pipe, files, ["sd15-plus"], [[0.7, 0.7]])
    with torch.no_grad():
        theirs = twin.unet(**inputs, added_cond_kwargs={"image_embeds": [torch.stack([embeds.uncond, embeds.cond])]},
                           cross_attention_kwargs={"ip_adapter_masks": [image_masks.unsqueeze(0)]}).sample
    adapter = load_adapter(files["sd15-plus"])
    ours = run_ours(pipe.unet, [Application(adapter, embeds, image_masks=image_masks, image_weights=(0.7, 0.7),
                                            mask_method="diffusers")], inputs)
    unmasked = run_ours(pipe.unet, [Application(adapter, embeds, weight=0.7)], inputs)
    assert (ours - unmasked).abs().max() > 1e-3, "the masks must change the result for this test to mean anything"
    assert (ours - theirs).abs().max() <= TOLERANCE


def test_two_masked_adapters_equal_diffusers(pipe, files, vit_h):
    image_masks = half_masks()
    first = encode(vit_h, files, "sd15", reference_images(1, 6))
    second = encode(vit_h, files, "sd15-plus", reference_images(1, 7))
    inputs = unet_inputs(seed=1)
    twin = diffusers_twin(pipe, files, ["sd15", "sd15-plus"], [0.7, 0.5])
    with torch.no_grad():
        theirs = twin.unet(**inputs, added_cond_kwargs={"image_embeds": [
            torch.stack([first.uncond, first.cond]), torch.stack([second.uncond, second.cond])]},
            cross_attention_kwargs={"ip_adapter_masks": [image_masks[:1].unsqueeze(0), image_masks[1:].unsqueeze(0)]}
        ).sample
    ours = run_ours(pipe.unet, [
        Application(load_adapter(files["sd15"]), first, weight=0.7, image_masks=image_masks[:1],
                    mask_method="diffusers"),
        Application(load_adapter(files["sd15-plus"]), second, weight=0.5, image_masks=image_masks[1:],
                    mask_method="diffusers"),
    ], inputs)
    assert (ours - run_ours(pipe.unet, [], inputs)).abs().max() > 1e-3
    assert (ours - theirs).abs().max() <= TOLERANCE


def test_attach_with_two_masked_images_equals_the_diffusers_pipeline(pipe, files):
    from transformers import CLIPVisionModelWithProjection

    images, image_masks = [pil_image(1), pil_image(2)], half_masks()
    run = dict(prompt="a red cube", negative_prompt="blurry", num_inference_steps=2, guidance_scale=5.0, height=64,
               width=64, output_type="latent")
    ours = type(pipe)(**{**pipe.components, "unet": copy.deepcopy(pipe.unet)})
    attach(ours, files["sd15-plus"], image_encoder=files["vit-h"]).set_image(images, weight=[0.7, 0.7],
                                                                             masks=image_masks)
    theirs = diffusers_twin(pipe, files, ["sd15-plus"], [[0.7, 0.7]])
    theirs.register_modules(image_encoder=CLIPVisionModelWithProjection.from_pretrained(files["vit-h"]))
    with torch.no_grad():
        got = ours(**run, generator=torch.Generator().manual_seed(3)).images
        expected = theirs(**run, generator=torch.Generator().manual_seed(3), ip_adapter_image=[images],
                          cross_attention_kwargs={"ip_adapter_masks": [image_masks.unsqueeze(0)]}).images
    assert (got - expected).abs().max() <= TOLERANCE


def test_image_masks_must_match_the_reference_count(files, vit_h):
    embeds = encode(vit_h, files, "sd15", reference_images(2, 8))
    with pytest.raises(ValueError, match="3 masks but there are 2 reference images"):
        Application(load_adapter(files["sd15"]), embeds, image_masks=torch.ones(3, 8, 8))
    with pytest.raises(ValueError, match="unfold_batch"):
        Application(load_adapter(files["sd15"]), embeds, image_masks=torch.ones(2, 8, 8), unfold_batch=True)


# ---- every layer at real output sizes ------------------------------------------------------------------

@pytest.fixture(scope="module")
def meta_unets():
    with torch.device("meta"):
        return {"sd15": tiny.build_sd15_unet().eval(), "sdxl": tiny.build_sdxl_unet().eval()}


def _meta_inputs(family: str, latent_hw) -> dict:
    cross = tiny.TINY_SD15["cross_attention_dim"] if family == "sd15" else tiny.TINY_SDXL["cross_attention_dim"]
    inputs = dict(sample=torch.zeros(2, 4, *latent_hw, device="meta"), timestep=torch.tensor(500),
                  encoder_hidden_states=torch.zeros(2, 77, cross, device="meta"))
    if family == "sdxl":
        inputs["added_cond_kwargs"] = dict(text_embeds=torch.zeros(2, tiny.TINY_SDXL["pooled_dim"], device="meta"),
                                           time_ids=torch.zeros(2, 6, device="meta"))
    return inputs


@pytest.mark.parametrize("family,variant,width", [("sd15", "sd15", 32), ("sdxl", "sdxl", 40)])
def test_masks_of_every_output_size_reach_every_layer(meta_unets, files, monkeypatch, family, variant, width):
    """Both mask kinds (the nodes' attn_mask of another aspect ratio, and per-image masks of the output size)
    give every layer of a real UNet call its masks, for the four output sizes; the per-image halves cover
    half of every layer's tokens each."""
    shares: list[tuple[str, int, float]] = []
    original = masks.layer_mask

    def spy(mask, query_len, latent_hw, batch, dtype=torch.float32, device=None, **kwargs):
        on_cpu = original(mask, query_len, latent_hw, batch, dtype, "cpu", **kwargs)  # values: not on meta
        shares.append((kwargs.get("what", "attn_mask"), query_len, float(on_cpu.mean())))
        assert on_cpu.shape == (batch, query_len, 1)
        return on_cpu.to(device)

    monkeypatch.setattr(masks, "layer_mask", spy)
    adapter = load_adapter(files[variant])
    embeds = Embeds(torch.randn(2, width), torch.zeros(2, width), "image_embeds")
    single = Embeds(embeds.cond[:1], embeds.uncond[:1], embeds.feature)
    unet = meta_unets[family]
    layers = len(adapter.to_k_ip)
    for out_w, out_h in SIZES:
        top = torch.zeros(out_h, out_w)
        top[: out_h // 2] = 1.0
        nodes_style = Application(adapter, single, attn_mask=torch.ones(1, 40, 30))  # any size: stretched
        per_image = Application(adapter, embeds, image_masks=torch.stack([top, 1.0 - top]), mask_method="diffusers")
        model = DiffusersModel(unet, family, {}, applications=(nodes_style, per_image))
        shares.clear()
        with torch.no_grad(), patched_unet(model) as state:
            state.cond_or_uncond = [1, 0]
            out = unet(**_meta_inputs(family, (out_h // 8, out_w // 8))).sample
        assert out.shape == (2, 4, out_h // 8, out_w // 8)
        grids = {np.prod(masks.unet_grid((out_h // 8, out_w // 8), level)) for level in range(4)}
        assert {length for _, length, _ in shares} <= grids  # the real token counts of this latent
        by_kind = {what: [s for w, _, s in shares if w == what] for what in ("attn_mask", "image_masks[0]",
                                                                               "image_masks[1]")}
        # one mask per distinct token count (cached per layer size), each kind
        assert all(len(v) == len({length for _, length, _ in shares}) for v in by_kind.values())
        assert all(s == 1.0 for s in by_kind["attn_mask"])
        for upper, lower in zip(by_kind["image_masks[0]"], by_kind["image_masks[1]"]):
            assert upper == pytest.approx(0.5, abs=0.02) and upper + lower == pytest.approx(1.0, abs=1e-5)
        assert layers in (16, 70)
