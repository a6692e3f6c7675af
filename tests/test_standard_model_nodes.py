"""Headless CheckpointLoaderSimple, CLIPTextEncode and latent nodes against ComfyUI's declarations and diffusers."""
from __future__ import annotations

import pytest
import torch

from ipadapter_nodes.core.backends.diffusers import DiffusersModel
from ipadapter_nodes.runtime.handles import TextEncoderHandle, VAEHandle
from ipadapter_nodes.runtime.standard_nodes import checkpoint, latent, text

# ComfyUI's declarations of these nodes (from its /object_info): input order, widget options, outputs, category.
COMFY_DECLARATIONS = {
    "CheckpointLoaderSimple": (["ckpt_name"], {}, ["MODEL", "CLIP", "VAE"], "loaders"),
    "CLIPTextEncode": (["text", "clip"], {"text": ("STRING", {"multiline": True}), "clip": ("CLIP", {})},
                       ["CONDITIONING"], "conditioning"),
    "EmptyLatentImage": (["width", "height", "batch_size"], {
        "width": ("INT", {"default": 512, "min": 16, "max": 16384, "step": 8}),
        "height": ("INT", {"default": 512, "min": 16, "max": 16384, "step": 8}),
        "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096})}, ["LATENT"], "latent"),
    "VAEDecode": (["samples", "vae"], {"samples": ("LATENT", {}), "vae": ("VAE", {})}, ["IMAGE"], "latent"),
    "VAEEncode": (["pixels", "vae"], {"pixels": ("IMAGE", {}), "vae": ("VAE", {})}, ["LATENT"], "latent"),
}
PROMPT = "a photo of the cat sitting on a chair"


pytestmark = pytest.mark.usefixtures("tiny_folders")


@pytest.fixture(scope="module")
def sd15():
    return checkpoint.CheckpointLoaderSimple().load_checkpoint("tiny-sd15")


@pytest.fixture(scope="module")
def sdxl():
    return checkpoint.CheckpointLoaderSimple().load_checkpoint("tiny-sdxl")


@pytest.mark.parametrize("node_class", [checkpoint.CheckpointLoaderSimple, text.CLIPTextEncode,
                                        latent.EmptyLatentImage, latent.VAEDecode, latent.VAEEncode])
def test_node_declarations_match_comfyui(node_class):
    order, specs, outputs, category = COMFY_DECLARATIONS[node_class.__name__]
    inputs = node_class.INPUT_TYPES()["required"]
    assert list(inputs) == order
    assert list(node_class.RETURN_TYPES) == outputs and node_class.CATEGORY == category
    for name, (type_name, options) in specs.items():
        assert inputs[name][0] == type_name
        declared = inputs[name][1] if len(inputs[name]) > 1 else {}
        assert {k: declared.get(k) for k in options} == options, name


def test_checkpoint_list_holds_pipeline_folders_and_single_files_only():
    names = checkpoint.CheckpointLoaderSimple.INPUT_TYPES()["required"]["ckpt_name"][0]
    assert {"tiny-sd15", "tiny-sdxl", "tiny-sd15.safetensors", "tiny-sdxl.safetensors"} <= set(names)
    assert not any("/unet" in n or n.endswith(".json") for n in names)


def test_loader_returns_model_clip_vae_with_family_from_weights(sd15, sdxl):
    for (model, clip, vae), family, scaling in ((sd15, "sd15", 0.18215), (sdxl, "sdxl", 0.13025)):
        assert isinstance(model, DiffusersModel) and model.family == family
        assert isinstance(clip, TextEncoderHandle) and clip.family == family
        assert isinstance(vae, VAEHandle) and vae.scaling_factor == pytest.approx(scaling)
        cfg = model.scheduler_config
        assert (cfg["beta_start"], cfg["beta_end"], cfg["beta_schedule"]) == (0.00085, 0.012, "scaled_linear")
        assert model.prediction_type == "epsilon"
    assert sd15[0].name == "tiny-sd15"


def test_loader_caches_each_checkpoint_once_per_process(sd15):
    again = checkpoint.CheckpointLoaderSimple().load_checkpoint("tiny-sd15")
    assert again[0].unet is sd15[0].unet and again[1] is sd15[1]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_single_file_checkpoint_loads_the_same_weights_as_the_folder(family, request):
    folder = request.getfixturevalue(family)
    single = checkpoint.load_checkpoint(f"tiny-{family}.safetensors")
    assert single[0].family == family
    pairs = [(folder[0].unet, single[0].unet), (folder[2].vae, single[2].vae)]
    pairs += list(zip(folder[1].text_encoders, single[1].text_encoders))
    for a, b in pairs:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    cond_a, pooled_a = folder[1].encode(PROMPT)
    cond_b, pooled_b = single[1].encode(PROMPT)
    assert torch.equal(cond_a, cond_b) and torch.equal(pooled_a, pooled_b)


def test_family_detection_from_keys_rejects_unknown_layouts():
    assert checkpoint.family_from_keys(["conditioner.embedders.1.model.ln_final.weight"], "x") == "sdxl"
    assert checkpoint.family_from_keys(["cond_stage_model.transformer.text_model.x"], "x") == "sd15"
    with pytest.raises(ValueError, match="Stable Diffusion 2"):
        checkpoint.family_from_keys(["cond_stage_model.model.token_embedding.weight"], "sd2.safetensors")
    with pytest.raises(ValueError, match="not an SD1.5 or SDXL"):
        checkpoint.family_from_keys(["model.diffusion_model.out.2.weight"], "unet_only.safetensors")


def test_missing_checkpoint_names_the_folders_searched():
    with pytest.raises(FileNotFoundError, match="CheckpointLoaderSimple: 'nope.safetensors'"):
        checkpoint.load_checkpoint("nope.safetensors")


def test_clip_text_encode_sd15_equals_diffusers_encode_prompt(tiny_models_dir, sd15):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_models_dir / "checkpoints/tiny-sd15"))
    expected, _ = pipe.encode_prompt(PROMPT, "cpu", 1, do_classifier_free_guidance=False)
    (conditioning,) = text.CLIPTextEncode().encode(sd15[1], PROMPT)
    [[cond, extras]] = conditioning
    assert cond.shape == (1, 77, 32) and extras["pooled_output"].shape == (1, 32)
    assert torch.allclose(cond, expected, atol=1e-6, rtol=0)


def test_clip_text_encode_sdxl_equals_diffusers_encode_prompt(tiny_models_dir, sdxl):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_models_dir / "checkpoints/tiny-sdxl"))
    expected, _, expected_pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                                         do_classifier_free_guidance=False)
    (conditioning,) = text.CLIPTextEncode().encode(sdxl[1], PROMPT)
    [[cond, extras]] = conditioning
    assert cond.shape == (1, 77, 64) and extras["pooled_output"].shape == (1, 32)
    assert torch.allclose(cond, expected, atol=1e-6, rtol=0)
    assert torch.allclose(extras["pooled_output"], expected_pooled, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_long_prompt_becomes_77_token_windows_concatenated(family, request):
    clip = request.getfixturevalue(family)[1]
    words = ["cat"] * 30  # 3 tokens each: 90 tokens → two windows
    cond, pooled = clip.encode(" ".join(words))
    first, _ = clip.encode(" ".join(words[:25]))  # exactly the first 75 tokens
    assert cond.shape[1] == 154
    assert torch.allclose(cond[:, :77], first, atol=1e-6, rtol=0)
    assert not torch.allclose(cond[:, 77:], first, atol=1e-3)
    _, pooled_first = clip.encode(" ".join(words[:25]))
    assert torch.allclose(pooled, pooled_first, atol=1e-6, rtol=0)  # from the first window, as in ComfyUI


def test_empty_latent_image_is_zeros_at_one_eighth():
    (out,) = latent.EmptyLatentImage().generate(width=96, height=64, batch_size=3)
    assert out["samples"].shape == (3, 4, 8, 12) and not out["samples"].any()


def test_vae_encode_crops_to_multiple_of_8_and_scales_the_latent_mean(sd15):
    vae = sd15[2]
    pixels = torch.rand(2, 67, 70, 3, generator=torch.manual_seed(0))
    (out,) = latent.VAEEncode().encode(vae, pixels)
    assert out["samples"].shape == (2, 4, 8, 8)
    cropped = pixels[:, 1:65, 3:67, :]  # centre crop, like ComfyUI
    with torch.no_grad():
        mean = vae.vae.encode(cropped.movedim(-1, 1) * 2 - 1).latent_dist.mean
    assert torch.allclose(out["samples"], mean * 0.18215, atol=1e-6)


def test_vae_decode_gives_image_in_0_1_from_unscaled_latents(sdxl):
    vae = sdxl[2]
    samples = torch.randn(2, 4, 8, 8, generator=torch.manual_seed(1))
    (image,) = latent.VAEDecode().decode(vae, {"samples": samples})
    assert image.shape == (2, 64, 64, 3)
    assert image.min() >= 0 and image.max() <= 1
    with torch.no_grad():
        raw = vae.vae.decode(samples / 0.13025).sample
    assert torch.allclose(image, ((raw + 1) / 2).clamp(0, 1).movedim(1, -1), atol=1e-6)
