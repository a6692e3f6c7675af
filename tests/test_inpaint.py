"""Inpainting and image-to-image headless: VAEEncodeForInpaint, SetLatentNoiseMask, 9-channel inpainting
UNets and KSampler's denoise, on the tiny models."""
from __future__ import annotations

import math

import pytest
import torch

from ipadapter_nodes.runtime import sampling, sigma_schedules
from ipadapter_nodes.runtime.standard_nodes.checkpoint import load_checkpoint
from ipadapter_nodes.runtime.standard_nodes.inpaint import SetLatentNoiseMask, VAEEncodeForInpaint
from ipadapter_nodes.runtime.standard_nodes.latent import VAEEncode
from ipadapter_nodes.runtime.standard_nodes.sampler import KSampler

SIZE = 64


pytestmark = pytest.mark.usefixtures("tiny_folders")


@pytest.fixture(scope="module")
def sd15():
    return load_checkpoint("tiny-sd15")


@pytest.fixture(scope="module")
def inpaint_model():
    return load_checkpoint("tiny-sd15-inpaint.safetensors")[0]  # single file: channels read from the weights


def _image(seed: int = 1, size: int = SIZE) -> torch.Tensor:
    return torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(seed))


def _cond(seed: int) -> list:
    return [[torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(seed)), {"pooled_output": None}]]


def _left_half() -> torch.Tensor:
    mask = torch.zeros(1, SIZE, SIZE)
    mask[..., : SIZE // 2] = 1.0
    return mask


def _ksample(model, latent, steps=2, denoise=1.0, seed=7) -> dict:
    with torch.no_grad():
        return KSampler().sample(model, seed, steps, 4.0, "euler", "normal", _cond(1), _cond(2), latent,
                                 denoise=denoise)[0]


class _Inputs:
    """Records what the UNet is called with (a forward pre-hook)."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.calls.append((args[0].clone(), args[1].clone()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ------------------------------------------------------------------------------------------------ nodes
def test_node_declarations_follow_comfyui():
    inputs = VAEEncodeForInpaint.INPUT_TYPES()["required"]
    assert list(inputs) == ["pixels", "vae", "mask", "grow_mask_by"]
    assert inputs["grow_mask_by"] == ("INT", {"default": 6, "min": 0, "max": 64, "step": 1})
    assert list(SetLatentNoiseMask.INPUT_TYPES()["required"]) == ["samples", "mask"]
    assert VAEEncodeForInpaint.RETURN_TYPES == SetLatentNoiseMask.RETURN_TYPES == ("LATENT",)
    assert VAEEncodeForInpaint.CATEGORY == SetLatentNoiseMask.CATEGORY == "latent/inpaint"


def test_encode_for_inpaint_greys_the_masked_pixels_and_grows_the_mask(sd15):
    vae, image = sd15[2], _image()
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, 24:40, 24:40] = 1.0
    latent = VAEEncodeForInpaint().encode(vae, image, mask, 6)[0]
    grey = image.clone()
    grey[:, 24:40, 24:40, :] = 0.5
    assert torch.equal(latent["samples"], vae.encode(grey))
    # a 6x6 box filter padded by 3: output pixel o sees input o-3..o+2, so the square grows to 22..42
    expected = torch.zeros(1, 1, SIZE, SIZE)
    expected[..., 22:43, 22:43] = 1.0
    assert torch.equal(latent["noise_mask"], expected)
    assert torch.equal(VAEEncodeForInpaint().encode(vae, image, mask, 0)[0]["noise_mask"], mask[:, None])


def test_encode_for_inpaint_centre_crops_to_multiples_of_8(sd15):
    image, mask = _image(size=SIZE + 4), torch.ones(1, SIZE + 4, SIZE + 4)
    latent = VAEEncodeForInpaint().encode(sd15[2], image, mask, 0)[0]
    assert latent["samples"].shape == (1, 4, 8, 8) and latent["noise_mask"].shape == (1, 1, SIZE, SIZE)


def test_set_latent_noise_mask_keeps_the_latent_and_adds_the_mask():
    latent = {"samples": torch.randn(2, 4, 8, 8), "batch_index": [3, 4]}
    out = SetLatentNoiseMask().set_mask(latent, _left_half())[0]
    assert out["samples"] is latent["samples"] and out["batch_index"] == [3, 4] and "noise_mask" not in latent
    assert torch.equal(out["noise_mask"], _left_half()[:, None])


# ------------------------------------------------------------------------------------------------ sampling
def test_unmasked_latent_is_unchanged_after_sampling(sd15):
    model, _, vae = sd15
    latent = SetLatentNoiseMask().set_mask(VAEEncode().encode(vae, _image())[0], _left_half())[0]
    out = _ksample(model, latent)["samples"]
    # the 64 px half mask is exactly 0/1 on the 8x8 latent: columns 4-7 are outside it
    assert torch.equal(out[..., 4:], latent["samples"][..., 4:])
    assert float((out[..., :4] - latent["samples"][..., :4]).abs().max()) > 1e-2


def test_nine_channel_unet_gets_mask_and_masked_image_latent(inpaint_model, sd15):
    assert inpaint_model.unet.conv_in.in_channels == 9
    latent = VAEEncodeForInpaint().encode(sd15[2], _image(), _left_half(), 0)[0]
    with _Inputs(inpaint_model.unet) as seen:
        out = _ksample(inpaint_model, latent)["samples"]
    assert len(seen.calls) == 2 and seen.calls[0][0].shape == (2, 9, 8, 8)  # uncond + cond, 4 + 1 + 4 channels
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1.0
    for sample, _ in seen.calls:
        assert torch.equal(sample[:, 4:5], mask.expand(2, 1, 8, 8))
        assert torch.equal(sample[:, 5:], latent["samples"].expand(2, 4, 8, 8))
    assert torch.equal(out[..., 4:], latent["samples"][..., 4:])
    assert bool(torch.isfinite(out).all())


def test_nine_channel_unet_without_a_mask_gets_comfyui_blank_inputs(inpaint_model):
    with _Inputs(inpaint_model.unet) as seen:
        _ksample(inpaint_model, {"samples": torch.zeros(1, 4, 8, 8)}, steps=1)
    sample = seen.calls[0][0]
    assert torch.equal(sample[:, 4], torch.ones(2, 8, 8))
    blank = torch.tensor([0.8223, -0.6876, 0.6364, 0.1380])
    assert torch.equal(sample[:, 5:, 3, 3], blank.expand(2, 4))


def test_img2img_denoise_zero_returns_the_input_latent(sd15):
    latent = VAEEncode().encode(sd15[2], _image())[0]
    assert torch.equal(_ksample(sd15[0], latent, denoise=0.0)["samples"], latent["samples"])


def test_img2img_half_denoise_starts_from_the_middle_sigma(sd15):
    model, seed, steps = sd15[0], 9, 2
    latent = VAEEncode().encode(sd15[2], _image())[0]
    train = sigma_schedules.TrainingSigmas.from_scheduler_config(model.scheduler_config)
    # ComfyUI: denoise 0.5 keeps the last 2 + 1 sigmas of a 4-step schedule
    sigma = float(sigma_schedules.calculate_sigmas(train, "normal", 2 * steps)[steps])
    with _Inputs(model.unet) as seen:
        _ksample(model, latent, steps=steps, denoise=0.5, seed=seed)
    assert len(seen.calls) == steps
    first, timestep = seen.calls[0]
    noise = sampling.prepare_noise(latent["samples"], seed)
    expected = (latent["samples"] + noise * sigma) / math.sqrt(sigma ** 2 + 1)
    assert torch.allclose(first, torch.cat([expected] * 2), atol=1e-6, rtol=0)
    assert float(timestep[0]) == pytest.approx(train.timestep(sigma), abs=1e-4)
    assert train.timestep(sigma) == pytest.approx(999 / 3, abs=1e-3)  # linspace(999, 0, 4)[2]
