"""Reference-noise images (IPAdapterNoise's math): determinism, strength, ranges and shapes."""
from __future__ import annotations

import pytest
import torch

from ipadapter_nodes.core.noise import NOISE_TYPES, gaussian_blur, image_seed, make_noise

SIZE = (64, 64)


def _photo(batch=1, height=64, width=64, seed=0):
    """A smooth test image (gradients plus a little texture), 0..1."""
    ys = torch.linspace(0, 1, height).view(1, height, 1, 1)
    xs = torch.linspace(0, 1, width).view(1, 1, width, 1)
    texture = torch.rand(batch, height, width, 3, generator=torch.Generator().manual_seed(seed)) * 0.2
    return (0.4 * ys + 0.4 * xs + texture).clamp(0, 1).expand(batch, height, width, 3).contiguous()


@pytest.mark.parametrize("kind", NOISE_TYPES)
def test_same_seed_gives_identical_output(kind):
    image = _photo()
    torch.manual_seed(123)  # the global RNG must not matter
    first = make_noise(kind, 0.7, 0, image, size=SIZE, seed=5)
    torch.manual_seed(456)
    second = make_noise(kind, 0.7, 0, image, size=SIZE, seed=5)
    assert torch.equal(first, second)


@pytest.mark.parametrize("kind", [k for k in NOISE_TYPES if k != "blur"])
def test_other_seed_gives_other_noise(kind):
    image = _photo()
    a = make_noise(kind, 0.7, 0, image, size=SIZE, seed=1)
    b = make_noise(kind, 0.7, 0, image, size=SIZE, seed=2)
    assert (a - b).abs().mean() > 0.01


def test_blur_type_is_noise_free_so_seed_independent():
    image = _photo()
    assert torch.equal(make_noise("blur", 0.7, 0, image, size=SIZE, seed=1),
                       make_noise("blur", 0.7, 0, image, size=SIZE, seed=2))


@pytest.mark.parametrize("kind", NOISE_TYPES)
def test_strength_zero_leaves_the_image_unchanged(kind):
    image = _photo(batch=2)
    assert torch.equal(make_noise(kind, 0.0, 0, image, size=SIZE, seed=3), image)


@pytest.mark.parametrize("kind", NOISE_TYPES)
def test_strength_zero_without_image_is_black(kind):
    out = make_noise(kind, 0.0, 0, None, size=SIZE, batch=2, seed=3)
    assert out.shape == (2, 64, 64, 3) and not out.any()


@pytest.mark.parametrize("kind", NOISE_TYPES)
@pytest.mark.parametrize("blur", [0, 4])
def test_values_stay_in_zero_one_and_shapes_follow_size(kind, blur):
    out = make_noise(kind, 1.0, blur, _photo(batch=3, height=80, width=48), size=(32, 40), seed=0)
    assert out.shape == (3, 32, 40, 3) and out.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_default_size_is_224_and_batch_applies_without_image():
    assert make_noise("fade", 1.0, 0, batch=2).shape == (2, 224, 224, 3)


def test_fade_is_a_lerp_toward_uniform_noise():
    image = _photo()
    full = make_noise("fade", 1.0, 0, image, size=SIZE, seed=9)  # pure U(0,1) noise
    half = make_noise("fade", 0.5, 0, image, size=SIZE, seed=9)
    assert torch.allclose(half, 0.5 * image + 0.5 * full, atol=1e-6)
    assert abs(full.mean().item() - 0.5) < 0.02 and abs(full.var().item() - 1 / 12) < 0.005


def test_dissolve_replaces_about_strength_of_the_values():
    image = torch.full((1, 64, 64, 3), 0.25)
    out = make_noise("dissolve", 0.3, 0, image, size=SIZE, seed=4)
    kept = (out == 0.25).float().mean().item()
    assert abs(kept - 0.7) < 0.02
    replaced = out[out != 0.25]
    assert abs(replaced.mean().item() - 0.5) < 0.02  # replacements are U(0,1)


def test_gaussian_adds_noise_of_strength_sigma():
    image = torch.full((1, 64, 64, 3), 0.5)
    out = make_noise("gaussian", 0.1, 0, image, size=SIZE, seed=4)  # 0.5 ± 5 sigma never clips
    assert abs((out - 0.5).std().item() - 0.1) < 0.005 and abs((out - 0.5).mean().item()) < 0.005


def test_shuffle_flips_and_scrambles_more_as_strength_grows():
    image = _photo(seed=1)
    flipped = image.flip(dims=(1, 2))
    errors = [(make_noise("shuffle", s, 0, image, size=SIZE, seed=2) - flipped).abs().mean().item()
              for s in (0.02, 0.2, 0.5, 1.0)]
    assert errors[0] < 0.01  # a weak shuffle is nearly just the flipped image
    assert errors == sorted(errors) and errors[-1] > 0.2


def test_blur_type_smooths_more_with_strength():
    image = _photo(seed=2)

    def roughness(x):
        return (x[:, 1:] - x[:, :-1]).abs().mean().item()

    soft, softer = (make_noise("blur", s, 0, image, size=SIZE) for s in (0.2, 1.0))
    assert roughness(image) > roughness(soft) > roughness(softer)
    assert torch.allclose(softer.mean(), image.mean(), atol=0.01)  # a blur keeps the mean colour


@pytest.mark.parametrize("blur, kernel", [(3, 3), (4, 5)])  # an even blur is made odd
def test_blur_input_applies_an_odd_kernel_after_the_noise(blur, kernel):
    image = _photo()
    raw = make_noise("gaussian", 0.5, 0, image, size=SIZE, seed=6)
    blurred = make_noise("gaussian", 0.5, blur, image, size=SIZE, seed=6)
    expected = gaussian_blur(raw.permute(0, 3, 1, 2), kernel).permute(0, 2, 3, 1)
    assert torch.allclose(blurred, expected, atol=1e-6)


def test_gaussian_blur_kernel_sums_to_one_and_is_exact_on_constants():
    flat = torch.full((1, 3, 9, 9), 0.3)
    assert torch.allclose(gaussian_blur(flat, 7), flat, atol=1e-6)
    impulse = torch.zeros(1, 1, 9, 9)
    impulse[0, 0, 4, 4] = 1.0
    spread = gaussian_blur(impulse, 5)
    assert abs(spread.sum().item() - 1.0) < 1e-6 and spread[0, 0, 4, 4] == spread.max()
    assert torch.equal(spread, spread.flip(-1)) and torch.equal(spread, spread.transpose(-1, -2))


def test_image_is_center_cropped_to_the_aspect_then_resized():
    wide = torch.zeros(1, 64, 128, 3)
    wide[:, :, 32:96] = 1.0  # the centre square is white, the sides black
    out = make_noise("fade", 0.0, 0, wide, size=SIZE)
    assert out.shape == (1, 64, 64, 3) and out.min() > 0.99


def test_image_seed_is_a_content_hash():
    a, b = _photo(seed=1), _photo(seed=2)
    assert image_seed(a) == image_seed(a.clone()) and image_seed(a) != image_seed(b)
    assert image_seed(a) != image_seed(a * 0.999 + 0.001 * a.mean())  # same-ish sum, other pixels
    assert 0 <= image_seed(a) < 2**63


@pytest.mark.parametrize("args, message", [
    (("sparkle", 0.5, 0), "sparkle"),
    (("fade", 1.5, 0), "strength"),
    (("fade", 0.5, -1), "blur"),
])
def test_bad_arguments_are_named(args, message):
    with pytest.raises(ValueError, match=message):
        make_noise(*args, size=SIZE)
