"""Masked and regional conditioning headless: ConditioningSetMask / ConditioningCombine and the sampler's
per-pixel blending of cond entries, against ComfyUI's rules (calc_cond_batch) computed by hand."""
from __future__ import annotations

import math

import pytest
import torch

from ipadapter_nodes.core.backends.diffusers import DiffusersModel, SamplingState
from ipadapter_nodes.runtime import sampling, sigma_schedules, tiny
from ipadapter_nodes.runtime.standard_nodes.conditioning import ConditioningCombine, ConditioningSetMask

SCHEDULE = {k: v for k, v in tiny.SD15_SCHEDULER.items() if k != "_class_name"}


@pytest.fixture(scope="module")
def model() -> DiffusersModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = tiny.build_sd15_unet().eval()
    return DiffusersModel(unet=unet, family="sd15", scheduler_config=SCHEDULE)


@pytest.fixture(scope="module")
def train() -> sigma_schedules.TrainingSigmas:
    return sigma_schedules.TrainingSigmas.from_scheduler_config(SCHEDULE)


def _cond(seed: int, **options) -> list:
    context = torch.randn(1, 77, tiny.TINY_SD15["cross_attention_dim"], generator=torch.Generator().manual_seed(seed))
    return [[context, {"pooled_output": None, **options}]]


def _close(ours: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> bool:
    # relative to the values' scale: the random tiny UNet predicts values of size ~10-50
    return float((ours - expected).abs().max()) <= tolerance * max(1.0, float(expected.abs().max()))


def _half_mask(left: bool, size: int = 64) -> torch.Tensor:
    mask = torch.zeros(1, size, size)
    if left:
        mask[..., : size // 2] = 1.0
    else:
        mask[..., size // 2:] = 1.0
    return mask


def _one_step(model, positive, negative, cfg=4.0, size=8, seed=5) -> torch.Tensor:
    # One Euler step lands on sigma 0, so the result is the denoised prediction itself.
    with torch.no_grad():
        return sampling.sample(model, seed, 1, cfg, "euler", "normal", positive, negative,
                               {"samples": torch.zeros(1, 4, size, size)})["samples"]


def _denoise(model, train, positive, negative, cfg, x, sigma):
    denoiser = sampling.Denoiser(model, train, positive, negative, cfg, x.shape)
    with torch.no_grad():
        return denoiser(x, sigma, SamplingState()), denoiser


def _eps(model, train, x, sigma, context) -> torch.Tensor:
    t = torch.full((x.shape[0],), train.timestep(sigma))
    with torch.no_grad():
        return model.unet(x / math.sqrt(sigma ** 2 + 1), t, encoder_hidden_states=context).sample


# ------------------------------------------------------------------------------------------------ nodes
def test_node_declarations_follow_comfyui():
    inputs = ConditioningSetMask.INPUT_TYPES()["required"]
    assert list(inputs) == ["conditioning", "mask", "strength", "set_cond_area"]
    assert inputs["strength"] == ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01})
    assert inputs["set_cond_area"] == (["default", "mask bounds"],)
    assert list(ConditioningCombine.INPUT_TYPES()["required"]) == ["conditioning_1", "conditioning_2"]
    assert ConditioningSetMask.RETURN_TYPES == ConditioningCombine.RETURN_TYPES == ("CONDITIONING",)


def test_set_mask_stores_comfyui_keys_without_touching_the_input():
    original = _cond(1)
    out = ConditioningSetMask().append(original, torch.ones(16, 16), 0.7, "mask bounds")[0]
    assert out[0][0] is original[0][0] and "mask" not in original[0][1]
    assert out[0][1]["mask"].shape == (1, 16, 16)
    assert out[0][1]["mask_strength"] == 0.7 and out[0][1]["set_area_to_bounds"] is True
    assert ConditioningCombine().combine(original, out)[0] == original + out


# ------------------------------------------------------------------------------------------------ blending
def test_left_and_right_masked_prompts_give_each_prediction_on_its_side(model):
    left = ConditioningSetMask().append(_cond(1), _half_mask(True), 1.0, "default")[0]
    right = ConditioningSetMask().append(_cond(2), _half_mask(False), 1.0, "default")[0]
    both = _one_step(model, ConditioningCombine().combine(left, right)[0], _cond(3))
    only_left, only_right = _one_step(model, _cond(1), _cond(3)), _one_step(model, _cond(2), _cond(3))
    # the 64 px half masks become exact 0/1 on the 8x8 latent (bilinear): columns 0-3 left, 4-7 right
    assert _close(both[..., :4], only_left[..., :4])
    assert _close(both[..., 4:], only_right[..., 4:])
    assert float((only_left - only_right)[..., 4:].abs().max()) > 1e-2  # the sides really differ


def test_weights_are_normalised_by_their_sum(model, train):
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7)) * 3.0
    sigma = 2.5
    strong = ConditioningSetMask().append(_cond(2), torch.ones(1, 64, 64), 3.0, "default")[0]
    denoised, _ = _denoise(model, train, _cond(1) + strong, _cond(3), 1.0, x, sigma)
    eps = (_eps(model, train, x, sigma, _cond(1)[0][0]) + 3.0 * _eps(model, train, x, sigma, _cond(2)[0][0])) / 4.0
    assert _close(denoised, x - sigma * eps)


def test_pixels_no_entry_covers_predict_zero_as_in_comfyui(model, train):
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    left = ConditioningSetMask().append(_cond(1), _half_mask(True), 1.0, "default")[0]
    denoised, _ = _denoise(model, train, left, _cond(3), 1.0, x, 1.5)
    assert torch.equal(denoised[..., 4:], torch.zeros_like(denoised[..., 4:]))
    expected = x - 1.5 * _eps(model, train, x, 1.5, _cond(1)[0][0])
    assert _close(denoised[..., :4], expected[..., :4])


def test_mask_bounds_runs_the_unet_on_the_crop_and_pairs_the_negative(model, train):
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(9))
    sigma, cfg = 3.0, 2.0
    mask = torch.zeros(1, 128, 128)
    mask[:, 32:96, 40:104] = 1.0  # latent rows 4-11, columns 5-12: an 8x8 box
    positive = ConditioningSetMask().append(_cond(1), mask, 1.0, "mask bounds")[0]
    denoised, denoiser = _denoise(model, train, positive, _cond(3), cfg, x, sigma)
    assert [e.area for e in denoiser.uncond] == [None, (8, 8, 4, 5)]  # the negative got an area twin
    box = (..., slice(4, 12), slice(5, 13))
    crop = x[box]
    cond = _eps(model, train, crop, sigma, _cond(1)[0][0])
    # inside the box the negative side blends its full-size prediction and its twin's crop prediction 1:1
    uncond = (_eps(model, train, x, sigma, _cond(3)[0][0])[box] + _eps(model, train, crop, sigma, _cond(3)[0][0])) / 2
    expected = crop - sigma * (uncond + cfg * (cond - uncond))
    assert _close(denoised[box], expected)
    # outside the box only the negative covers: ComfyUI's x0 blend gives (1 - cfg) × the uncond x0
    outside = (1 - cfg) * (x - sigma * _eps(model, train, x, sigma, _cond(3)[0][0]))
    assert _close(denoised[..., :4, :], outside[..., :4, :])


def test_timestep_range_switches_an_entry_off(model):
    late = [[c, {**o, "start_percent": 0.5, "end_percent": 1.0}] for c, o in _cond(2)]
    early = [[c, {**o, "start_percent": 0.0, "end_percent": 0.5}] for c, o in _cond(1)]
    # one step from sigma_max: only the early entry is active
    assert torch.allclose(_one_step(model, early + late, _cond(3)), _one_step(model, _cond(1), _cond(3)),
                          atol=1e-5, rtol=0)


def test_mask_batch_follows_the_latent_batch(model, train):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    masks = torch.stack([_half_mask(True)[0], _half_mask(False)[0]])
    entry = ConditioningSetMask().append(_cond(1), masks, 1.0, "default")[0]
    denoised, _ = _denoise(model, train, entry, _cond(3), 1.0, x, 1.0)
    assert torch.equal(denoised[0, :, :, 4:], torch.zeros(4, 8, 4))
    assert torch.equal(denoised[1, :, :, :4], torch.zeros(4, 8, 4))
    assert float(denoised[0, :, :, :4].abs().min()) > 0 and float(denoised[1, :, :, 4:].abs().min()) > 0
