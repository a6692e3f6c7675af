"""AnimateDiff headless: motion modules on the tiny SD1.5 UNet, IP-Adapter on every frame, animated files.

Oracles: the image UNet itself (a video UNet whose motion modules add nothing must equal it frame by frame),
the same UNet called per CFG chunk, and the frame count read back from the written files.
"""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from ipadapter_nodes.core import apply as ip_apply
from ipadapter_nodes.core import folders
from ipadapter_nodes.core.backends.diffusers import cross_attention_layers
from ipadapter_nodes.runtime import animatediff, tiny_motion
from ipadapter_nodes.runtime.sampling import sample
from ipadapter_nodes.runtime.standard_nodes import checkpoint
from ipadapter_nodes.runtime.standard_nodes.animated import SaveAnimatedGIF, SaveAnimatedPNG, SaveAnimatedWEBP
from ipadapter_nodes.runtime.standard_nodes.animatediff import AnimateDiffLoader
from ipadapter_nodes.runtime.tiny_adapters import make_adapter

FRAMES = 4


@pytest.fixture(scope="module")
def layout(tmp_path_factory, tiny_models_dir):
    root = tmp_path_factory.mktemp("animatediff-models")
    tiny_motion.ensure_tiny_motion(root)
    make_adapter("sd15", root / "ipadapter" / "ip-adapter_sd15.safetensors", seed=3)
    previous = folders._provider
    folders.configure(folders.FolderLayout(models_dirs=[str(root), str(tiny_models_dir)],
                                           output_dir=str(root / "output")))
    yield root
    folders._provider = previous


@pytest.fixture(scope="module")
def sd15(layout):
    return checkpoint.load_checkpoint("tiny-sd15")


@pytest.fixture(scope="module")
def video_model(sd15):
    (model,) = AnimateDiffLoader().load(sd15[0], "tiny-motion-sd15")
    return model


@pytest.fixture(scope="module")
def ip_parts(layout, tiny_models_dir):
    adapter = ip_apply.load_adapter(str(layout / "ipadapter" / "ip-adapter_sd15.safetensors"))
    clip_vision = ip_apply.load_clip_vision(str(tiny_models_dir / "clip_vision" / "tiny-vit-h"))
    return adapter, clip_vision


def _cond(clip, text: str) -> list:
    cond, pooled = clip.encode(text)
    return [[cond, {"pooled_output": pooled}]]


def _frames(model, clip, positive: str = "a red cube", negative: str = "", cfg: float = 5.0) -> torch.Tensor:
    latent = {"samples": torch.zeros(FRAMES, 4, 8, 8)}   # 64x64 px frames
    with torch.no_grad():
        return sample(model, 11, 2, cfg, "euler", "normal", _cond(clip, positive), _cond(clip, negative),
                      latent)["samples"]


def _call_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(FRAMES, 4, 8, 8, generator=generator)
    uncond, cond = torch.randn(1, 77, 32, generator=generator), torch.randn(1, 77, 32, generator=generator)
    context = torch.cat([uncond.repeat(FRAMES, 1, 1), cond.repeat(FRAMES, 1, 1)])
    return x, context, torch.full((2 * FRAMES,), 400.0)


# ------------------------------------------------------------------------------------------ motion files
def test_motion_modules_are_listed_and_folder_and_single_file_hold_the_same_weights(layout):
    names = AnimateDiffLoader.INPUT_TYPES()["required"]["motion_module"][0]
    assert {"tiny-motion-sd15", "tiny-motion-sd15.safetensors"} <= set(names)
    folder = animatediff.load_motion_adapter("tiny-motion-sd15")
    single = animatediff.load_motion_adapter("tiny-motion-sd15.safetensors")
    assert dict(single.config)["block_out_channels"] == list(folder.config["block_out_channels"])
    a, b = folder.state_dict(), single.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_file_that_is_no_motion_module_is_refused_with_its_name(layout):
    from safetensors.torch import save_file

    save_file({"foo.weight": torch.zeros(2)}, str(layout / "animatediff_models" / "not-motion.safetensors"))
    with pytest.raises(ValueError, match=r"not-motion\.safetensors.*not an AnimateDiff motion module"):
        animatediff.load_motion_adapter("not-motion.safetensors")


# ---------------------------------------------------------------------------------------------- the UNet
def test_video_unet_shares_the_image_unet_and_keeps_its_cross_attention_order(sd15, video_model):
    unet, video = sd15[0].unet, video_model.unet
    assert video is not unet and sd15[0].unet is unet                          # the input MODEL is unchanged
    image_layers, video_layers = cross_attention_layers(unet), cross_attention_layers(video)
    assert [n for n, _ in video_layers] == [n for n, _ in image_layers] and len(video_layers) == 16
    assert all(a is b for (_, a), (_, b) in zip(video_layers, image_layers))   # shared, not copied
    motion = [n for n in video.attn_processors if "motion_modules" in n]
    assert motion and not any("motion_modules" in n for n, _ in video_layers)
    assert video.conv_in.weight is unet.conv_in.weight


def test_motion_modules_that_add_nothing_give_the_image_unet_frame_by_frame(sd15):
    unet = sd15[0].unet
    adapter = tiny_motion.build_motion_adapter().eval()
    for name, module in adapter.named_modules():
        if name.endswith("proj_out"):          # the temporal blocks' output projection: residual only
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    video = animatediff.make_video_unet(unet, adapter)
    x, context, t = _call_inputs()
    batch = x.repeat(2, 1, 1, 1)
    with torch.no_grad():
        ours = video(batch, t, encoder_hidden_states=context, return_dict=False)[0]
        reference = unet(batch, t, encoder_hidden_states=context, return_dict=False)[0]
    assert ours.shape == reference.shape == (2 * FRAMES, 4, 8, 8)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_frames_see_each_other_but_cfg_chunks_stay_separate_videos(video_model):
    video = video_model.unet
    x, context, t = _call_inputs(1)
    with torch.no_grad():
        both = video(x.repeat(2, 1, 1, 1), t, encoder_hidden_states=context, return_dict=False)[0]
        uncond = video(x, t[:FRAMES], encoder_hidden_states=context[:FRAMES], batch_chunks=1, return_dict=False)[0]
        cond = video(x, t[:FRAMES], encoder_hidden_states=context[FRAMES:], batch_chunks=1, return_dict=False)[0]
        moved = x.clone()
        moved[0] += 1.0
        changed = video(moved, t[:FRAMES], encoder_hidden_states=context[FRAMES:], batch_chunks=1,
                        return_dict=False)[0]
    torch.testing.assert_close(both, torch.cat([uncond, cond]), rtol=0, atol=1e-5)
    assert float((changed[FRAMES - 1] - cond[FRAMES - 1]).abs().max()) > 1e-4  # frame 0 reaches frame 3


def test_chunk_count_is_inferred_from_the_samplers_batch():
    x, context, _ = _call_inputs(2)
    assert animatediff.infer_chunks(x.repeat(2, 1, 1, 1), context) == 2       # CFG: uncond + cond
    assert animatediff.infer_chunks(x, context[FRAMES:]) == 1                  # cfg 1: the cond chunk only
    still = x[:1].repeat(FRAMES, 1, 1, 1)                                      # identical frames, two prompts
    assert animatediff.infer_chunks(still.repeat(2, 1, 1, 1), context) == 2


def test_more_frames_than_the_module_handles_is_a_clear_error(video_model):
    limit = video_model.unet.config.motion_max_seq_length
    with pytest.raises(ValueError, match=rf"{limit + 1} frames.*at most {limit}"):
        video_model.unet(torch.zeros(limit + 1, 4, 8, 8), torch.tensor(1.0), torch.zeros(limit + 1, 77, 32),
                         batch_chunks=1)


# ---------------------------------------------------------------------------------- sampling with adapters
def test_ksampler_makes_frames_with_an_ip_adapter_on_every_frame_and_weight_zero_is_exact(sd15, video_model,
                                                                                          ip_parts):
    _, clip, _ = sd15
    adapter, clip_vision = ip_parts
    reference = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    plain = _frames(video_model, clip)
    assert plain.shape == (FRAMES, 4, 8, 8) and torch.isfinite(plain).all()
    at_zero = ip_apply.apply_ipadapter(video_model, adapter, clip_vision, reference, weight=0.0)
    at_one = ip_apply.apply_ipadapter(video_model, adapter, clip_vision, reference, weight=1.0)
    assert torch.equal(_frames(at_zero, clip), plain)
    styled = _frames(at_one, clip)
    assert all(float((styled[f] - plain[f]).abs().max()) > 1e-4 for f in range(FRAMES))
    assert not torch.equal(styled[0], styled[1])                               # still a video, not one image


def test_with_an_ip_adapter_identical_prompts_still_split_cfg_into_two_videos(sd15, video_model, ip_parts):
    _, clip, _ = sd15
    adapter, clip_vision = ip_parts
    model = ip_apply.apply_ipadapter(video_model, adapter, clip_vision, torch.rand(1, 64, 64, 3), weight=1.0)
    seen = []
    first_motion = model.unet.down_blocks[0].motion_modules[0]
    hook = first_motion.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("num_frames")), with_kwargs=True)
    try:
        _frames(model, clip, positive="", negative="")
    finally:
        hook.remove()
    assert seen and set(seen) == {FRAMES}


def test_a_lora_applied_before_the_motion_modules_patches_the_video_unet(sd15, layout):
    from ipadapter_nodes.core.weight_patches import LowRankDelta, WeightPatch

    model, clip, _ = sd15
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"
    patch = WeightPatch({name: (LowRankDelta(torch.randn(32, 2), torch.randn(2, 32)),)}, "test LoRA")
    (video,) = AnimateDiffLoader().load(model.replace(patches=(patch,)), "tiny-motion-sd15")
    assert video.patches == (patch,)
    before = model.unet.get_submodule(name).weight.detach().clone()
    with patch.applied(video.unet):
        assert not torch.equal(model.unet.get_submodule(name).weight, before)   # the shared layer is patched
    assert torch.equal(model.unet.get_submodule(name).weight, before)


# -------------------------------------------------------------------------------------------- animated files
def test_animated_saver_declarations_match_comfyui():
    webp = SaveAnimatedWEBP.INPUT_TYPES()["required"]
    assert list(webp) == ["images", "filename_prefix", "fps", "lossless", "quality", "method"]
    assert webp["fps"][1] == {"default": 6.0, "min": 0.01, "max": 1000.0, "step": 0.01}
    assert webp["lossless"][1]["default"] is True and webp["quality"][1]["default"] == 80
    assert webp["method"][0] == ["default", "fastest", "slowest"]
    png = SaveAnimatedPNG.INPUT_TYPES()["required"]
    assert list(png) == ["images", "filename_prefix", "fps", "compress_level"]
    assert png["compress_level"][1] == {"default": 4, "min": 0, "max": 9}
    for node in (SaveAnimatedWEBP, SaveAnimatedPNG, SaveAnimatedGIF):
        assert node.OUTPUT_NODE and node.CATEGORY == "image/animation" and node.RETURN_TYPES == ()


@pytest.mark.parametrize("node, inputs, fmt, duration", [
    (SaveAnimatedWEBP, dict(fps=8.0, lossless=False, quality=80, method="fastest"), "WEBP", 125),
    (SaveAnimatedPNG, dict(fps=8.0, compress_level=1), "PNG", 125),
    (SaveAnimatedGIF, dict(fps=8.0), "GIF", 120),      # GIF delays are whole hundredths of a second
])
def test_animated_files_hold_every_frame_and_are_never_overwritten(layout, node, inputs, fmt, duration):
    frames = torch.rand(FRAMES, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    prompt = {"1": {"class_type": "KSampler", "inputs": {}}}
    first = node().save_images(frames, filename_prefix=f"anim/{fmt.lower()}", prompt=prompt, **inputs)
    second = node().save_images(frames, filename_prefix=f"anim/{fmt.lower()}", prompt=prompt, **inputs)
    files = [r["ui"]["images"][0] for r in (first, second)]
    assert files[0]["filename"] != files[1]["filename"] and files[0]["subfolder"] == "anim"
    assert first["ui"]["animated"] == (True,)
    path = layout / "output" / "anim" / files[0]["filename"]
    with Image.open(path) as image:
        assert image.format == fmt and image.n_frames == FRAMES and image.size == (64, 64)
        image.seek(1)
        image.load()                                   # WEBP reports a frame's duration once it is decoded
        assert image.info.get("duration") == duration  # 1000 / fps milliseconds
    assert b"KSampler" in path.read_bytes()                                   # the prompt is in the file


def test_video_workflow_through_the_nodes_writes_an_animation(sd15, layout):
    from ipadapter_nodes.runtime.standard_nodes.latent import EmptyLatentImage, VAEDecode
    from ipadapter_nodes.runtime.standard_nodes.sampler import KSampler
    from ipadapter_nodes.runtime.standard_nodes.text import CLIPTextEncode

    model, clip, vae = sd15
    (video,) = AnimateDiffLoader().load(model, "tiny-motion-sd15.safetensors")
    (latent,) = EmptyLatentImage().generate(64, 64, FRAMES)
    (positive,), (negative,) = CLIPTextEncode().encode(clip, "a cat"), CLIPTextEncode().encode(clip, "")
    with torch.no_grad():
        (denoised,) = KSampler().sample(video, 3, 2, 4.0, "euler", "normal", positive, negative, latent)
        (images,) = VAEDecode().decode(vae, denoised)
    assert images.shape == (FRAMES, 64, 64, 3)
    result = SaveAnimatedWEBP().save_images(images, 6.0, "video", True, 80, "default")
    with Image.open(layout / "output" / result["ui"]["images"][0]["filename"]) as image:
        assert image.n_frames == FRAMES
