"""ControlNet headless: ControlNetLoader / ControlNetApplyAdvanced on the tiny ControlNets, against diffusers'
StableDiffusionControlNetPipeline and StableDiffusionXLControlNetPipeline (same weights, same inputs, one step)."""
from __future__ import annotations

import contextlib
import math
import shutil
from typing import Iterator

import pytest
import torch

from ipadapter_nodes.core import folders
from ipadapter_nodes.core.backends.diffusers import NoiseSchedule
from ipadapter_nodes.runtime import controlnet, sampling, sigma_schedules
from ipadapter_nodes.runtime.standard_nodes.checkpoint import load_checkpoint
from ipadapter_nodes.runtime.standard_nodes.conditioning import ControlNetApplyAdvanced, ControlNetLoader

CFG, SEED, SIZE = 4.0, 11, 64


pytestmark = pytest.mark.usefixtures("tiny_folders")


@pytest.fixture(scope="module")
def model():
    return load_checkpoint("tiny-sd15")[0]


@pytest.fixture(scope="module")
def control_net():
    return ControlNetLoader().load_controlnet("tiny-controlnet-sd15")[0]


def _cond(seed: int) -> list:
    return [[torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(seed)), {"pooled_output": None}]]


def _hint(seed: int = 3) -> torch.Tensor:
    return torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(seed))


def _apply(control_net, strength=1.0, start=0.0, end=1.0, positive=None, negative=None):
    return ControlNetApplyAdvanced().apply_controlnet(positive or _cond(1), negative or _cond(2), control_net,
                                                      _hint(), strength, start, end)


def _sample(model, positive, negative, steps=1) -> torch.Tensor:
    with torch.no_grad():
        return sampling.sample(model, SEED, steps, CFG, "euler", "normal", positive, negative,
                               {"samples": torch.zeros(1, 4, SIZE // 8, SIZE // 8)})["samples"]


def _close(ours: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> bool:
    return float((ours - expected).abs().max()) <= tolerance * max(1.0, float(expected.abs().max()))


# ------------------------------------------------------------------------------------------------ nodes
def test_node_declarations_follow_comfyui():
    inputs = ControlNetApplyAdvanced.INPUT_TYPES()
    assert list(inputs["required"]) == ["positive", "negative", "control_net", "image", "strength",
                                        "start_percent", "end_percent"]
    assert inputs["required"]["strength"] == ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01})
    assert inputs["required"]["end_percent"] == ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001})
    assert list(inputs["optional"]) == ["vae"]
    assert ControlNetApplyAdvanced.RETURN_TYPES == ("CONDITIONING", "CONDITIONING")
    assert ControlNetApplyAdvanced.RETURN_NAMES == ("positive", "negative")
    assert list(ControlNetLoader.INPUT_TYPES()["required"]) == ["control_net_name"]
    assert ControlNetLoader.RETURN_TYPES == ("CONTROL_NET",)


def test_loader_lists_folders_and_single_files_and_both_hold_the_same_weights(control_net):
    names = ControlNetLoader.INPUT_TYPES()["required"]["control_net_name"][0]
    assert names == ["tiny-controlnet-sd15", "tiny-controlnet-sd15.safetensors", "tiny-controlnet-sdxl"]
    single = ControlNetLoader().load_controlnet("tiny-controlnet-sd15.safetensors")[0]
    assert single.family == control_net.family == "sd15"
    a, b = control_net.model.state_dict(), single.model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_single_file_without_a_config_offline_names_the_fix(tiny_models_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "controlnet").mkdir()
    shutil.copy(tiny_models_dir / "controlnet/tiny-controlnet-sd15.safetensors",
                tmp_path / "controlnet/alone.safetensors")
    folders.configure(folders.FolderLayout(models_dirs=[str(tmp_path)]))
    try:
        with pytest.raises(RuntimeError, match="'alone.safetensors'.*folder named 'alone'"):
            ControlNetLoader().load_controlnet("alone.safetensors")
    finally:
        folders.configure(folders.FolderLayout(models_dirs=[str(tiny_models_dir)]))


def test_apply_adds_one_shared_link_to_every_entry_of_both_sides(control_net):
    positive, negative = _apply(control_net, 0.8, 0.1, 0.9, positive=_cond(1) + _cond(4))
    hints = [options["control"] for _, options in positive + negative]
    assert all(h is hints[0] for h in hints) and hints[0].previous is None
    assert (hints[0].strength, hints[0].start_percent, hints[0].end_percent) == (0.8, 0.1, 0.9)
    chained = _apply(control_net, 0.5, positive=positive, negative=negative)[0][0][1]["control"]
    assert chained.previous is hints[0] and chained.chain() == [hints[0], chained]


# ------------------------------------------------------------------------------------------------ sampling
def test_strength_zero_equals_no_controlnet_exactly(model, control_net):
    plain = _sample(model, _cond(1), _cond(2))
    positive, negative = _cond(1), _cond(2)  # the node hands its inputs back, as ComfyUI's does
    returned = ControlNetApplyAdvanced().apply_controlnet(positive, negative, control_net, _hint(), 0.0, 0.0, 1.0)
    assert returned[0] is positive and returned[1] is negative
    # and the sampler with a zero-strength link adds zero residuals
    link = controlnet.ControlHint(control_net, _hint(), 0.0)
    zero = [[c, {**o, "control": link}] for c, o in _cond(1)], [[c, {**o, "control": link}] for c, o in _cond(2)]
    assert torch.equal(_sample(model, *zero), plain)


def test_outside_its_percent_window_the_controlnet_does_nothing(model, control_net):
    plain = _sample(model, _cond(1), _cond(2))
    # one step, at sigma_max (0 %): a window starting at 50 % is not reached
    assert torch.equal(_sample(model, *_apply(control_net, 1.0, 0.5, 1.0)), plain)
    assert float((_sample(model, *_apply(control_net, 1.0, 0.0, 0.5)) - plain).abs().max()) > 1e-3


def test_strength_one_equals_diffusers_controlnet_pipeline(model, control_net, tiny_models_dir):
    from diffusers import EulerDiscreteScheduler, StableDiffusionControlNetPipeline

    ours = _sample(model, *_apply(control_net, 1.0))
    plain = _sample(model, _cond(1), _cond(2))
    assert float((ours - plain).abs().max()) > 1e-2

    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        str(tiny_models_dir / "checkpoints/tiny-sd15"), controlnet=control_net.model, safety_checker=None,
        requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    train = sigma_schedules.TrainingSigmas.from_scheduler_config(model.scheduler_config)
    sigmas = sigma_schedules.calculate_sigmas(train, "normal", 1)
    noise = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.manual_seed(SEED))
    with torch.no_grad():
        reference = pipe(prompt_embeds=_cond(1)[0][0], negative_prompt_embeds=_cond(2)[0][0],
                         image=_hint().movedim(-1, 1), height=SIZE, width=SIZE, sigmas=sigmas.tolist(),
                         guidance_scale=CFG, latents=noise, output_type="latent").images
    assert _close(ours, reference)


def test_two_chained_halves_equal_one_whole(model, control_net):
    half = _apply(control_net, 0.5)
    both = _apply(control_net, 0.5, positive=half[0], negative=half[1])
    assert _close(_sample(model, *both), _sample(model, *_apply(control_net, 1.0)))


def test_a_controlnet_of_another_family_is_refused(control_net):
    link = controlnet.ControlHint(control_net, _hint(), 1.0)
    schedule = NoiseSchedule.from_config(dict(num_train_timesteps=1000))
    with pytest.raises(ValueError, match="made for sd15 but the model is sdxl"):
        controlnet.ControlRun(link, schedule, "sdxl")


def test_hint_is_centre_cropped_then_resized_nearest():
    image = torch.arange(4 * 8, dtype=torch.float32).reshape(1, 4, 8, 1).expand(1, 4, 8, 3)
    hint = controlnet.resize_hint(image, 2, 2)  # 8 wide → the middle 4 columns (2-5), then every 2nd pixel
    assert hint.shape == (1, 3, 2, 2)
    assert hint[0, 0].tolist() == [[8 + 3, 8 + 5], [24 + 3, 24 + 5]]  # rows 1, 3; columns 3, 5
    assert math.isclose(float(controlnet.resize_hint(image, 4, 8).sum()), float(image.sum()))


# ------------------------------------------------------------------------------------------ with IP-Adapter
def test_controlnet_works_with_an_ip_adapter_which_patches_only_the_main_unet(model, control_net, tiny_models_dir,
                                                                             tmp_path):
    from ipadapter_nodes import nodes
    from ipadapter_nodes.core import encode
    from ipadapter_nodes.core.adapter import load_adapter
    from ipadapter_nodes.runtime.tiny_adapters import make_adapter

    make_adapter("sd15", tmp_path / "ip-adapter_sd15.safetensors", seed=3)
    clip_vision = encode.load_clip_vision(tiny_models_dir / "clip_vision/tiny-vit-h.safetensors")
    adapter = load_adapter(tmp_path / "ip-adapter_sd15.safetensors")
    ip_model = nodes.NODE_CLASS_MAPPINGS["IPAdapterAdvanced"]().apply_ipadapter(
        model, adapter, torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(5)), clip_vision=clip_vision,
        weight=1.0, weight_type="linear", combine_embeds="concat", start_at=0.0, end_at=1.0,
        embeds_scaling="V only")[0]
    seen = []

    def record(module, args, kwargs):
        seen.append(({type(p).__name__ for p in module.attn_processors.values()},
                     {type(p).__name__ for p in model.unet.attn_processors.values()}))

    handle = control_net.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        both = _sample(ip_model, *_apply(control_net, 1.0))
    finally:
        handle.remove()
    controlnet_processors, unet_processors = seen[0]
    assert "IPCrossAttnProcessor" in unet_processors and "IPCrossAttnProcessor" not in controlnet_processors
    # strength 0 leaves the IP-Adapter result alone; each part changes the result
    ip_only = _sample(ip_model, _cond(1), _cond(2))
    assert torch.equal(_sample(ip_model, *_apply(control_net, 0.0)), ip_only)
    assert float((both - ip_only).abs().max()) > 1e-2
    assert float((both - _sample(model, *_apply(control_net, 1.0))).abs().max()) > 1e-2


# ------------------------------------------------------------------------------------------------ SDXL
# SDXL conditioning with size options that differ from the latent's, so wrong time ids would show.
SDXL_SIZES = ({"width": 96, "height": 80, "crop_w": 8, "crop_h": 4, "target_width": 64, "target_height": 72},
              {"width": 128, "height": 64, "crop_w": 0, "crop_h": 16, "target_width": 64, "target_height": 64})


@pytest.fixture(scope="module")
def sdxl_model():
    return load_checkpoint("tiny-sdxl")[0]


@pytest.fixture(scope="module")
def sdxl_control_net():
    return ControlNetLoader().load_controlnet("tiny-controlnet-sdxl")[0]


def _sdxl_cond(seed: int, sizes: dict) -> list:
    generator = torch.Generator().manual_seed(seed)
    cond, pooled = torch.randn(1, 77, 64, generator=generator), torch.randn(1, 32, generator=generator)
    return [[cond, {"pooled_output": pooled, **sizes}]]


def _sdxl_apply(control_net, strength: float) -> tuple[list, list]:
    return ControlNetApplyAdvanced().apply_controlnet(_sdxl_cond(1, SDXL_SIZES[0]), _sdxl_cond(2, SDXL_SIZES[1]),
                                                      control_net, _hint(), strength, 0.0, 1.0)


def _with_link(conditioning: list, link: controlnet.ControlHint) -> list:
    return [[c, {**o, "control": link}] for c, o in conditioning]


def test_sdxl_controlnet_loads_and_is_recognised_as_sdxl(sdxl_model, sdxl_control_net):
    assert sdxl_control_net.family == "sdxl"
    config = sdxl_control_net.model.config
    assert config.addition_embed_type == "text_time" and config.cross_attention_dim == 64
    # it was made from the tiny SDXL UNet: same stem weights
    unet = sdxl_model.unet
    assert torch.equal(sdxl_control_net.model.conv_in.weight, unet.conv_in.weight)
    assert torch.equal(sdxl_control_net.model.add_embedding.linear_1.weight, unet.add_embedding.linear_1.weight)


def test_sdxl_controlnet_on_an_sd15_model_is_refused_naming_both_families(model, sdxl_control_net):
    positive, negative = _apply(sdxl_control_net, 1.0)
    with pytest.raises(ValueError, match="'tiny-controlnet-sdxl' .*made for sdxl but the model is sd15; "
                                         "load a ControlNet made for sd15"):
        _sample(model, positive, negative)


def test_sdxl_strength_zero_equals_no_controlnet_exactly(sdxl_model, sdxl_control_net):
    positive, negative = _sdxl_cond(1, SDXL_SIZES[0]), _sdxl_cond(2, SDXL_SIZES[1])
    plain = _sample(sdxl_model, positive, negative)
    link = controlnet.ControlHint(sdxl_control_net, _hint(), 0.0)
    assert torch.equal(_sample(sdxl_model, _with_link(positive, link), _with_link(negative, link)), plain)


def test_sdxl_strength_one_changes_the_result(sdxl_model, sdxl_control_net):
    plain = _sample(sdxl_model, _sdxl_cond(1, SDXL_SIZES[0]), _sdxl_cond(2, SDXL_SIZES[1]))
    assert float((_sample(sdxl_model, *_sdxl_apply(sdxl_control_net, 1.0)) - plain).abs().max()) > 1e-2


@contextlib.contextmanager
def _recording_added_cond_kwargs(module) -> Iterator[list]:
    """The ``added_cond_kwargs`` of every call of ``module`` while inside."""
    calls: list = []
    hook = module.register_forward_pre_hook(
        lambda _module, _args, kwargs: calls.append(kwargs.get("added_cond_kwargs")), with_kwargs=True)
    try:
        yield calls
    finally:
        hook.remove()


def test_sdxl_strength_one_equals_diffusers_sdxl_controlnet_pipeline(sdxl_model, sdxl_control_net, tiny_models_dir):
    from diffusers import StableDiffusionXLControlNetPipeline

    with _recording_added_cond_kwargs(sdxl_control_net.model) as ours_seen:
        ours = _sample(sdxl_model, *_sdxl_apply(sdxl_control_net, 1.0))

    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        str(tiny_models_dir / "checkpoints/tiny-sdxl"), controlnet=sdxl_control_net.model)
    train = sigma_schedules.TrainingSigmas.from_scheduler_config(sdxl_model.scheduler_config)
    sigmas = sigma_schedules.calculate_sigmas(train, "normal", 1)
    noise = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.manual_seed(SEED))
    (cond, pos), (uncond, neg) = _sdxl_cond(1, SDXL_SIZES[0])[0], _sdxl_cond(2, SDXL_SIZES[1])[0]
    with _recording_added_cond_kwargs(sdxl_control_net.model) as theirs_seen, torch.no_grad():
        reference = pipe(
            prompt_embeds=cond, pooled_prompt_embeds=pos["pooled_output"], negative_prompt_embeds=uncond,
            negative_pooled_prompt_embeds=neg["pooled_output"], image=_hint().movedim(-1, 1), height=SIZE,
            width=SIZE, sigmas=sigmas.tolist(), guidance_scale=CFG, latents=noise, output_type="latent",
            original_size=(pos["height"], pos["width"]), crops_coords_top_left=(pos["crop_h"], pos["crop_w"]),
            target_size=(pos["target_height"], pos["target_width"]),
            negative_original_size=(neg["height"], neg["width"]),
            negative_crops_coords_top_left=(neg["crop_h"], neg["crop_w"]),
            negative_target_size=(neg["target_height"], neg["target_width"])).images
    # one ControlNet call each, on (uncond, cond) with the pooled embeds and time ids of each side
    assert len(ours_seen) == len(theirs_seen) == 1
    (added,), (expected,) = ours_seen, theirs_seen
    assert added["time_ids"].tolist() == expected["time_ids"].tolist() == [[64, 128, 16, 0, 64, 64],
                                                                           [80, 96, 4, 8, 72, 64]]
    assert torch.equal(added["text_embeds"], expected["text_embeds"])
    assert _close(ours, reference)
