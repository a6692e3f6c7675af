"""``attach`` on whole diffusers pipelines, against the same pipelines running diffusers' own IP-Adapter.

Each comparison runs 2 denoising steps at 64x64 with the same generator; the final latents must agree
within 1e-5 (fp32).  Also: detach restores the pipeline, weight 0 is bit-identical, the projection runs once
per pipeline call, and the encoding side (uncond modes, input types, encoder mismatch).
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter_nodes import attach
from ipadapter_nodes.core.adapter import load_adapter
from ipadapter_nodes.core.backends.diffusers import NoiseSchedule
from ipadapter_nodes.core.embeds import encode_for_adapter
from ipadapter_nodes.core.encode import load_clip_vision
from ipadapter_nodes.runtime import tiny
from ipadapter_nodes.runtime.tiny_adapters import make_adapter

TOLERANCE = 1e-5
PROMPT = "a red cube on a table"


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_models_dir) -> dict:
    folder = tmp_path_factory.mktemp("ipadapter")
    root = Path(tiny_models_dir)
    out = {"folder": folder, "root": root}
    for seed, variant in enumerate(("sd15", "sd15-plus", "sdxl", "sdxl-plus-vit-h", "faceid-sd15")):
        out[variant] = make_adapter(variant, folder / f"{variant}.safetensors", seed=seed)
    out["vit-h"] = root / tiny.TINY_PATHS["tiny-vit-h"]
    out["vit-bigG"] = root / tiny.TINY_PATHS["tiny-vit-bigG"]
    return out


@pytest.fixture(scope="module")
def base_pipes(files):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    root = files["root"]
    return {
        "sd15": StableDiffusionPipeline.from_pretrained(root / tiny.TINY_PATHS["tiny-sd15"], safety_checker=None),
        "sdxl": StableDiffusionXLPipeline.from_pretrained(root / tiny.TINY_PATHS["tiny-sdxl"]),
    }


def fresh(base, pipeline_class=None):
    """A pipeline of ``pipeline_class`` on ``base``'s components with its own copy of the UNet."""
    cls = pipeline_class or type(base)
    return cls(**{**base.components, "unet": copy.deepcopy(base.unet)})


def with_diffusers_adapters(pipe, files, variants, encoder, scales):
    from transformers import CLIPVisionModelWithProjection

    pipe.register_modules(image_encoder=CLIPVisionModelWithProjection.from_pretrained(files[encoder]))
    pipe.load_ip_adapter(str(files["folder"]), subfolder="", weight_name=[f"{v}.safetensors" for v in variants],
                         image_encoder_folder=None)
    pipe.set_ip_adapter_scale(scales)
    return pipe


def pil_image(seed: int) -> Image.Image:
    array = np.random.default_rng(seed).integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    return Image.fromarray(array)


def generate(pipe, guidance: float = 5.0, steps: int = 2, **kwargs) -> torch.Tensor:
    """Final latents of a short, seeded pipeline call (64x64)."""
    with torch.no_grad():
        return pipe(PROMPT, negative_prompt="blurry", num_inference_steps=steps, guidance_scale=guidance,
                    height=64, width=64, generator=torch.Generator().manual_seed(7), output_type="latent",
                    **kwargs).images


def compare(ours_pipe, theirs_pipe, plain_pipe, ip_images, **kwargs) -> None:
    """Our attached pipeline equals diffusers' within TOLERANCE, and both differ from the plain one."""
    theirs = generate(theirs_pipe, ip_adapter_image=ip_images, **kwargs)
    ours = generate(ours_pipe, **kwargs)
    plain = generate(plain_pipe, **kwargs)
    assert (ours - plain).abs().max() > 1e-3, "the adapter must change the result for the comparison to mean anything"
    assert (ours - theirs).abs().max() <= TOLERANCE


# ---- equal to diffusers on whole pipeline calls -------------------------------------------------------------

def test_sd15_with_cfg_equals_diffusers(base_pipes, files):
    image = pil_image(1)
    ours = fresh(base_pipes["sd15"])
    attach(ours, files["sd15-plus"], image_encoder=files["vit-h"]).set_image(image, weight=0.8)
    theirs = with_diffusers_adapters(fresh(base_pipes["sd15"]), files, ["sd15-plus"], "vit-h", [0.8])
    compare(ours, theirs, base_pipes["sd15"], image)


def test_sd15_without_cfg_equals_diffusers(base_pipes, files):
    image = pil_image(2)
    ours = fresh(base_pipes["sd15"])
    attach(ours, files["sd15"], image_encoder=files["vit-h"]).set_image(image)
    theirs = with_diffusers_adapters(fresh(base_pipes["sd15"]), files, ["sd15"], "vit-h", [1.0])
    compare(ours, theirs, base_pipes["sd15"], image, guidance=1.0)


def test_sdxl_with_several_images_equals_diffusers(base_pipes, files):
    images = [pil_image(3), pil_image(4)]
    ours = fresh(base_pipes["sdxl"])
    attach(ours, files["sdxl-plus-vit-h"], image_encoder=files["vit-h"]).set_image(images)
    theirs = with_diffusers_adapters(fresh(base_pipes["sdxl"]), files, ["sdxl-plus-vit-h"], "vit-h", [1.0])
    compare(ours, theirs, base_pipes["sdxl"], [images])


def test_two_attach_calls_stack_like_two_diffusers_adapters(base_pipes, files):
    first, second = pil_image(5), pil_image(6)
    ours = fresh(base_pipes["sd15"])
    attach(ours, files["sd15"], image_encoder=files["vit-h"]).set_image(first, weight=0.7)
    attach(ours, files["sd15-plus"], image_encoder=files["vit-h"]).set_image(second, weight=1.2)
    theirs = with_diffusers_adapters(fresh(base_pipes["sd15"]), files, ["sd15", "sd15-plus"], "vit-h", [0.7, 1.2])
    compare(ours, theirs, base_pipes["sd15"], [first, second])


def test_sd15_img2img_equals_diffusers(base_pipes, files):
    from diffusers import StableDiffusionImg2ImgPipeline

    image, init = pil_image(7), pil_image(8).resize((64, 64))
    ours = fresh(base_pipes["sd15"], StableDiffusionImg2ImgPipeline)
    attach(ours, files["sd15"], image_encoder=files["vit-h"]).set_image(image)
    theirs = with_diffusers_adapters(fresh(base_pipes["sd15"], StableDiffusionImg2ImgPipeline), files, ["sd15"],
                                     "vit-h", [1.0])
    compare(ours, theirs, fresh(base_pipes["sd15"], StableDiffusionImg2ImgPipeline), image,
            image=init, strength=0.7, steps=3)


def test_sdxl_inpaint_equals_diffusers(base_pipes, files):
    from diffusers import StableDiffusionXLInpaintPipeline

    image, init = pil_image(9), pil_image(10).resize((64, 64))
    mask = Image.fromarray(np.tile((np.arange(64) >= 32).astype(np.uint8)[None, :] * 255, (64, 1)))
    ours = fresh(base_pipes["sdxl"], StableDiffusionXLInpaintPipeline)
    attach(ours, files["sdxl"], image_encoder=files["vit-bigG"]).set_image(image, weight=0.9)
    theirs = with_diffusers_adapters(fresh(base_pipes["sdxl"], StableDiffusionXLInpaintPipeline), files, ["sdxl"],
                                     "vit-bigG", [0.9])
    compare(ours, theirs, fresh(base_pipes["sdxl"], StableDiffusionXLInpaintPipeline), image,
            image=init, mask_image=mask, strength=0.7, steps=3)


def test_faceid_from_face_embeddings_equals_diffusers(base_pipes, files):
    face = torch.randn(1, 512, generator=torch.Generator().manual_seed(20))
    ours = fresh(base_pipes["sd15"])
    attach(ours, files["faceid-sd15"]).set_image(None, face_embeds=face)
    theirs = fresh(base_pipes["sd15"])
    theirs.load_ip_adapter(str(files["folder"]), subfolder="", weight_name="faceid-sd15.safetensors",
                           image_encoder_folder=None)
    # diffusers takes FaceID embeddings directly, negative half first (zeros, as its docs do)
    face_embeds = [torch.stack([torch.zeros_like(face), face])]
    assert (generate(ours) - generate(theirs, ip_adapter_image_embeds=face_embeds)).abs().max() <= TOLERANCE
    assert (generate(ours) - generate(base_pipes["sd15"])).abs().max() > 1e-3


def test_weight_type_style_transfer_equals_instantstyle_block_scales(base_pipes, files):
    image = pil_image(18)
    ours = fresh(base_pipes["sd15"])
    attach(ours, files["sd15"], image_encoder=files["vit-h"]).set_image(image, weight=0.9,
                                                                        weight_type="style transfer")
    # the pack's SD1.5 style transfer: input blocks 1, 2, 4, 5 and output blocks 5-11 (diffusers' block names)
    scales = {"down": {"block_0": [0.9, 0.9], "block_1": [0.9, 0.9]},
              "up": {"block_1": [0.0, 0.0, 0.9], "block_2": 0.9, "block_3": 0.9}}
    theirs = with_diffusers_adapters(fresh(base_pipes["sd15"]), files, ["sd15"], "vit-h", [scales])
    compare(ours, theirs, base_pipes["sd15"], image)


def test_an_instantstyle_dict_as_weight_type_equals_diffusers_block_scales(base_pipes, files):
    image = pil_image(19)
    scales = {"down": {"block_2": [0.0, 1.0]}, "up": {"block_1": [0.0, 1.0, 0.5]}}
    ours = fresh(base_pipes["sd15"])
    attach(ours, files["sd15"], image_encoder=files["vit-h"]).set_image(image, weight_type=scales)
    theirs = with_diffusers_adapters(fresh(base_pipes["sd15"]), files, ["sd15"], "vit-h", [scales])
    compare(ours, theirs, base_pipes["sd15"], image)


def test_precise_weight_types_swap_the_reference_to_the_uncond_branch(base_pipes, files):
    from ipadapter_nodes.core.weighting import layer_weights

    pipe = fresh(base_pipes["sd15"])
    plain = generate(pipe)
    with attach(pipe, files["sd15"], image_encoder=files["vit-h"]) as handle:
        app = handle.set_image(pil_image(20), weight=0.8, weight_type="style transfer precise", boost=1.5).application
        expected = layer_weights("style transfer precise", 0.8, "sd15", boost=1.5)
        assert (app.layer_weights, app.uncond_layer_weights) == (expected.cond, expected.uncond)
        precise = generate(pipe)
        handle.set_image(pil_image(20), weight_type={"down": {"block_2": [0.0, 0.0]}})  # every layer 0
        assert torch.equal(generate(pipe), plain)
    assert (precise - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="names no block"):
        attach(fresh(base_pipes["sd15"]), files["sd15"], image_encoder=files["vit-h"]).set_image(
            pil_image(20), weight_type={"up": {"block_0": 1.0}})


# ---- the handle ----------------------------------------------------------------------------------------

def test_detach_restores_processors_hooks_and_output(base_pipes, files):
    pipe = fresh(base_pipes["sd15"])
    processors = dict(pipe.unet.attn_processors)
    hooks = dict(pipe.unet._forward_pre_hooks)
    plain = generate(pipe)
    first = attach(pipe, files["sd15"], image_encoder=files["vit-h"]).set_image(pil_image(11))
    second = attach(pipe, files["sd15-plus"], image_encoder=files["vit-h"]).set_image(pil_image(12))
    assert (generate(pipe) - plain).abs().max() > 1e-3
    first.detach()
    assert any(pipe.unet.attn_processors[n] is not p for n, p in processors.items())  # second still attached
    second.detach()
    second.detach()  # detaching twice is harmless
    assert all(pipe.unet.attn_processors[n] is p for n, p in processors.items())
    assert dict(pipe.unet._forward_pre_hooks) == hooks
    assert torch.equal(generate(pipe), plain)


def test_a_forgotten_pipeline_is_not_kept_alive(base_pipes, files):
    import gc
    import weakref

    pipe = fresh(base_pipes["sd15"])
    attach(pipe, files["sd15"], image_encoder=files["vit-h"])
    unet = weakref.ref(pipe.unet)
    del pipe
    gc.collect()
    assert unet() is None


def test_weight_zero_is_bit_identical_to_the_plain_pipeline(base_pipes, files):
    pipe = fresh(base_pipes["sd15"])
    plain = generate(pipe)
    with attach(pipe, files["sd15-plus"], image_encoder=files["vit-h"]) as handle:
        handle.set_image(pil_image(13), weight=0.0)
        assert torch.equal(generate(pipe), plain)
        handle.set_image(pil_image(13), start_at=1.0, end_at=1.0)  # starts after the last step: never acts
        assert torch.equal(generate(pipe), plain)


def test_projection_runs_once_per_pipeline_call(base_pipes, files):
    pipe = fresh(base_pipes["sd15"])
    adapter = load_adapter(files["sd15-plus"])
    calls = []
    hook = adapter.image_proj.register_forward_hook(lambda *args: calls.append(1))
    try:
        attach(pipe, adapter, image_encoder=files["vit-h"]).set_image(pil_image(14))
        generate(pipe, steps=4)
        assert len(calls) == 1
    finally:
        hook.remove()


def test_the_hook_feeds_sigma_and_the_cfg_layout(base_pipes, files):
    pipe = fresh(base_pipes["sd15"])
    handle = attach(pipe, files["sd15"], image_encoder=files["vit-h"]).set_image(pil_image(15))
    state = handle._hook.patch.state
    schedule = NoiseSchedule.from_config(dict(pipe.scheduler.config))
    seen = []
    spy = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((float(args[1]), state.sigma, list(state.cond_or_uncond))),
        with_kwargs=True)
    try:
        generate(pipe, guidance=5.0)
        generate(pipe, guidance=1.0)
    finally:
        spy.remove()
        handle.detach()
    assert seen and all(sigma == pytest.approx(schedule.sigma(t)) for t, sigma, _ in seen)
    layouts = [layout for _, _, layout in seen]
    assert layouts[: len(layouts) // 2] == [[1, 0]] * (len(layouts) // 2)
    assert layouts[len(layouts) // 2:] == [[0]] * (len(layouts) // 2)


# ---- encoding -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vit_h(files):
    return load_clip_vision(files["vit-h"])


def test_uncond_modes_for_plus_adapters(files, vit_h):
    spec = load_adapter(files["sd15-plus"]).spec
    images = torch.rand(2, 224, 224, 3, generator=torch.Generator().manual_seed(0))
    ours_d = encode_for_adapter(vit_h, spec, images, uncond="diffusers")
    ours_n = encode_for_adapter(vit_h, spec, images, uncond="nodes")
    mean_colour = vit_h.encode_pixels(torch.zeros(1, 3, 224, 224)).penultimate_hidden_states
    black = vit_h.encode(torch.zeros(1, 224, 224, 3)).penultimate_hidden_states
    assert ours_d.uncond.shape == ours_n.uncond.shape == (2, 257, 48)
    assert torch.allclose(ours_d.uncond, mean_colour.expand(2, -1, -1))
    assert torch.allclose(ours_n.uncond, black.expand(2, -1, -1))
    assert (ours_d.uncond - ours_n.uncond).abs().max() > 1e-2
    assert torch.equal(ours_d.cond, ours_n.cond)


def test_base_adapters_use_zero_image_embeds_as_uncond(files, vit_h):
    spec = load_adapter(files["sd15"]).spec
    embeds = encode_for_adapter(vit_h, spec, torch.rand(1, 224, 224, 3), uncond="nodes")
    assert embeds.feature == "image_embeds" and embeds.cond.shape == (1, 32)
    assert torch.equal(embeds.uncond, torch.zeros(1, 32))


def test_a_negative_image_replaces_the_uncond(files, vit_h):
    spec = load_adapter(files["sd15"]).spec
    negative = torch.rand(1, 224, 224, 3, generator=torch.Generator().manual_seed(3))
    embeds = encode_for_adapter(vit_h, spec, torch.rand(2, 224, 224, 3), image_negative=negative)
    expected = vit_h.encode(negative).image_embeds
    assert torch.allclose(embeds.uncond, expected.expand(2, -1))


def test_pil_numpy_and_image_tensors_encode_alike(base_pipes, files):
    image = pil_image(16)
    array = np.asarray(image)
    pipe = fresh(base_pipes["sd15"])
    handle = attach(pipe, files["sd15"], image_encoder=files["vit-h"])
    results = [handle.set_image(item).application.embeds.cond
               for item in (image, array, torch.from_numpy(array.copy()).float() / 255.0)]
    handle.detach()
    assert torch.equal(results[0], results[1]) and torch.allclose(results[0], results[2], atol=1e-6)


def test_an_encoder_of_the_wrong_width_is_named(base_pipes, files):
    pipe = fresh(base_pipes["sd15"])
    handle = attach(pipe, files["sd15-plus"], image_encoder=files["vit-bigG"])
    with pytest.raises(ValueError, match=r"48-d hidden states.*64-d hidden states"):
        handle.set_image(pil_image(17))
    handle.detach()


def test_an_adapter_for_another_family_is_refused_at_attach(base_pipes, files):
    pipe = fresh(base_pipes["sd15"])
    with pytest.raises(ValueError, match=r"sdxl\.safetensors"):
        attach(pipe, files["sdxl"], image_encoder=files["vit-bigG"])
    assert not pipe.unet._forward_pre_hooks
