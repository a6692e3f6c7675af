"""IP-Adapter attention masks (core/masks.py): token grids, region keeping, batches, diffusers equality."""
from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from diffusers.image_processor import IPAdapterMaskProcessor
from PIL import Image, ImageDraw, ImageFilter

from ipadapter_nodes.core import masks
from ipadapter_nodes.nodes.masks import IPAdapterMaskPrep
from ipadapter_nodes.runtime import tiny

# Output size (width x height px) → the latent grid at each UNet level (h, w): latent = px / 8, then halved
# with ceil rounding per down level.  Written out by hand; the UNets below must produce exactly these.
LEVEL_GRIDS = {
    (512, 512): [(64, 64), (32, 32), (16, 16), (8, 8)],
    (512, 768): [(96, 64), (48, 32), (24, 16), (12, 8)],
    (832, 1216): [(152, 104), (76, 52), (38, 26), (19, 13)],
    (1344, 768): [(96, 168), (48, 84), (24, 42), (12, 21)],
}
# An odd size (1000 px high, 992 wide): the ceil rounding makes level 1 63x62, which both formulas
# read as 62x63 (a transposed mask); the exact grid lookup must get it right.
ODD_SIZE = (992, 1000)
ODD_GRIDS = [(125, 124), (63, 62), (32, 31), (16, 16)]


class _QueryRecorder:
    """An attention processor that records each cross-attention layer's query length and does nothing."""

    def __init__(self, name: str, seen: dict):
        self.name, self.seen = name, seen

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        if encoder_hidden_states is not None:
            self.seen[self.name] = hidden_states.shape[1]
        return hidden_states


def _level_of(name: str, levels: int) -> int:
    """The UNet level of an attention processor from its name (down i → i, mid → deepest, up j → n-1-j)."""
    if name.startswith("mid_block"):
        return levels - 1
    block = int(re.match(r"(down|up)_blocks\.(\d+)", name).group(2))
    return block if name.startswith("down") else levels - 1 - block


@pytest.fixture(scope="module")
def unets():
    # On the meta device: the forward pass runs the real block topology (convs, rounding, upsampling to the
    # skip connections' sizes) on shapes only, so full-size latents cost nothing.
    with torch.device("meta"):
        return {"sd15": tiny.build_sd15_unet().eval(), "sdxl": tiny.build_sdxl_unet().eval()}


def _cross_attention_query_lengths(unet, family: str, latent_hw) -> dict[str, int]:
    seen: dict[str, int] = {}
    unet.set_attn_processor({name: _QueryRecorder(name, seen) for name in unet.attn_processors})
    width = tiny.TINY_SD15["cross_attention_dim"] if family == "sd15" else tiny.TINY_SDXL["cross_attention_dim"]
    kwargs = {}
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.zeros(1, tiny.TINY_SDXL["pooled_dim"], device="meta"),
                                       "time_ids": torch.zeros(1, 6, device="meta")}
    with torch.no_grad():
        out = unet(torch.zeros(1, 4, *latent_hw, device="meta"), 10,
                   encoder_hidden_states=torch.zeros(1, 77, width, device="meta"), **kwargs)
    assert out.sample.shape == (1, 4, *latent_hw)
    return seen


@pytest.mark.parametrize("family, layers", [("sd15", 16), ("sdxl", 70)])
@pytest.mark.parametrize("size", [*LEVEL_GRIDS, ODD_SIZE])
def test_every_layer_grid_multiplies_out_to_its_query_length(unets, family, layers, size):
    grids = LEVEL_GRIDS.get(size, ODD_GRIDS)
    latent_hw = (size[1] // 8, size[0] // 8)
    unet = unets[family]
    seen = _cross_attention_query_lengths(unet, family, latent_hw)
    assert len(seen) == layers
    for name, query_len in seen.items():
        level = _level_of(name, len(unet.config.block_out_channels))
        expected = grids[level]
        assert query_len == expected[0] * expected[1], name
        assert masks.unet_grid(latent_hw, level) == expected
        assert masks.layer_grid(query_len, latent_hw, (size[1], size[0]), "diffusers") == expected
        assert masks.layer_grid(query_len, latent_hw, (size[1], size[0]), "ipadapter_plus") == expected
        if size in LEVEL_GRIDS:  # the origins' formulas alone are right for these sizes
            assert masks.token_grid(query_len, (size[1], size[0]), "diffusers") == expected
            assert masks.token_grid(query_len, latent_hw, "ipadapter_plus") == expected


def test_formulas_alone_transpose_the_odd_grid_and_the_exact_lookup_does_not():
    latent_hw = (125, 124)
    assert masks.token_grid(63 * 62, latent_hw, "ipadapter_plus") == (62, 63)
    assert masks.token_grid(63 * 62, (1000, 992), "diffusers") == (62, 63)
    assert masks.layer_grid(63 * 62, latent_hw, (1000, 992), "diffusers", exact_grid=False) == (62, 63)
    assert masks.layer_grid(63 * 62, latent_hw, (1000, 992), "diffusers") == (63, 62)


# ---- the region is kept ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", masks.DOWNSAMPLE_METHODS)
@pytest.mark.parametrize("size", list(LEVEL_GRIDS))
def test_left_half_mask_covers_the_left_half_of_every_layer_grid(method, size):
    width, height = size
    mask = torch.zeros(1, height, width)
    mask[:, :, : width // 2] = 1.0
    latent_hw = (height // 8, width // 8)
    for grid_h, grid_w in LEVEL_GRIDS[size]:
        tokens = masks.layer_mask(mask, grid_h * grid_w, latent_hw, 2, method=method)
        assert tokens.shape == (2, grid_h * grid_w, 1)
        grid = tokens[0, :, 0].reshape(grid_h, grid_w)
        left = grid_w // 2 if grid_w % 2 == 0 else grid_w // 2 + 1  # an odd middle column straddles the edge
        assert torch.all(grid[:, : grid_w // 2] == 1.0)
        assert torch.all(grid[:, left:] == 0.0)


def test_ipadapter_plus_stretches_a_square_mask_over_a_wide_latent():
    mask = torch.zeros(64, 64)
    mask[:32, :32] = 1.0  # top-left quadrant
    grid_h, grid_w = 48, 84  # level 1 of 1344x768
    tokens = masks.layer_mask(mask, grid_h * grid_w, (96, 168), 1, method="ipadapter_plus")
    grid = tokens[0, :, 0].reshape(grid_h, grid_w)
    assert torch.all(grid[: grid_h // 2 - 1, : grid_w // 2 - 1] == 1.0)
    assert torch.all(grid[grid_h // 2 + 1:, :] == 0.0)
    assert torch.all(grid[:, grid_w // 2 + 1:] == 0.0)


def test_a_grid_of_the_wrong_area_is_padded_at_the_end_by_diffusers_and_symmetrically_by_the_pack():
    mask = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # same size as the grid: the resize is the identity
    with pytest.warns(UserWarning, match="aspect ratio"):
        padded_d = masks.layer_mask(mask, 6, None, 1, method="diffusers", grid=(2, 2))
    with pytest.warns(UserWarning, match="aspect ratio"):
        padded_p = masks.layer_mask(mask, 6, (2, 2), 1, method="ipadapter_plus", grid=(2, 2))
    assert padded_d[0, :, 0].tolist() == [1, 2, 3, 4, 0, 0]
    assert padded_p[0, :, 0].tolist() == [0, 1, 2, 3, 4, 0]
    square = torch.arange(1.0, 10.0).reshape(3, 3)
    with pytest.warns(UserWarning):
        cropped_d = masks.layer_mask(square, 7, None, 1, method="diffusers", grid=(3, 3))
    with pytest.warns(UserWarning):
        cropped_p = masks.layer_mask(square, 7, (3, 3), 1, method="ipadapter_plus", grid=(3, 3))
    assert cropped_d[0, :, 0].tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert cropped_p[0, :, 0].tolist() == [2, 3, 4, 5, 6, 7, 8]


# ---- batches ---------------------------------------------------------------------------------------------
def _levels_mask(values) -> torch.Tensor:
    """One constant 16x16 mask per value (so each batch row is recognisable after resizing)."""
    return torch.stack([torch.full((16, 16), float(v)) for v in values])


@pytest.mark.parametrize("method", masks.DOWNSAMPLE_METHODS)
def test_one_mask_is_used_for_every_batch_item(method):
    tokens = masks.layer_mask(_levels_mask([0.25]), 64, (8, 8), 4, method=method)
    assert tokens.shape == (4, 64, 1)
    assert torch.allclose(tokens, torch.full((4, 64, 1), 0.25))


@pytest.mark.parametrize("method", masks.DOWNSAMPLE_METHODS)
def test_one_mask_per_batch_item_keeps_the_order(method):
    tokens = masks.layer_mask(_levels_mask([0.1, 0.2, 0.3, 0.4]), 16, (8, 8), 4, method=method)
    assert torch.allclose(tokens[:, :, 0].mean(dim=1), torch.tensor([0.1, 0.2, 0.3, 0.4]))


def test_one_mask_per_latent_is_tiled_over_the_cond_and_uncond_chunks():
    tokens = masks.layer_mask(_levels_mask([0.1, 0.2]), 16, (8, 8), 4, chunks=2)
    assert torch.allclose(tokens[:, 0, 0], torch.tensor([0.1, 0.2, 0.1, 0.2]))


def test_a_mask_count_that_fits_no_batch_is_refused_naming_the_sizes():
    with pytest.raises(ValueError, match=r"3 masks do not match the batch of 4 latent"):
        masks.layer_mask(_levels_mask([0.1, 0.2, 0.3]), 16, (8, 8), 4)
    with pytest.raises(ValueError, match=r"3 masks .* batch of 2 latent\(s\) \(4 rows with cond/uncond\)"):
        masks.layer_mask(_levels_mask([0.1, 0.2, 0.3]), 16, (8, 8), 4, chunks=2)


def test_result_has_the_requested_dtype_and_accepts_2d_and_4d_masks():
    flat = masks.layer_mask(torch.ones(16, 16), 16, (8, 8), 2, dtype=torch.float16)
    assert flat.dtype == torch.float16 and flat.shape == (2, 16, 1)
    four_d = masks.layer_mask(torch.ones(1, 1, 16, 16), 16, (8, 8), 2)
    assert torch.equal(four_d, torch.ones(2, 16, 1))


def test_bad_method_and_bad_mask_shape_are_refused():
    with pytest.raises(ValueError, match="'nearest' is not known"):
        masks.layer_mask(torch.ones(8, 8), 16, (8, 8), 1, method="nearest")
    with pytest.raises(ValueError, match=r"got \[2, 3, 8, 8\]"):
        masks.layer_mask(torch.ones(2, 3, 8, 8), 16, (8, 8), 1)


# ---- diffusers equality ----------------------------------------------------------------------------------
def _blob_images(size=(70, 100)) -> list[Image.Image]:
    """Two soft-edged grayscale masks (8-bit 'L'), width x height = ``size``."""
    images = []
    for box in ((5, 10, 40, 80), (30, 40, 66, 95)):
        img = Image.new("L", size, 0)
        ImageDraw.Draw(img).ellipse(box, fill=255)
        images.append(img.filter(ImageFilter.GaussianBlur(4)))
    return images


def _as_mask(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(i, dtype=np.float32) / 255.0) for i in images])


@pytest.mark.parametrize("height, width", [(64, 48), (100, 70), (131, 97)])
def test_prepare_lanczos_equals_diffusers_preprocess_of_the_mask_images(height, width):
    images = _blob_images()
    expected = IPAdapterMaskProcessor().preprocess(images, height=height, width=width)  # [N,1,H,W]
    ours = masks.prepare_masks(_as_mask(images), height, width, "lanczos")
    assert ours.shape == (2, height - height % 8, width - width % 8)
    assert torch.equal(ours, expected[:, 0])
    assert set(ours.unique().tolist()) == {0.0, 1.0}


def test_prepare_nearest_equals_diffusers_preprocess_of_mask_tensors():
    mask = _as_mask(_blob_images())
    expected = IPAdapterMaskProcessor().preprocess(mask, height=64, width=48)
    assert torch.equal(masks.prepare_masks(mask, 64, 48, "nearest"), expected[:, 0])


def test_mask_prep_node_returns_the_prepared_masks():
    images = _blob_images()
    (out,) = IPAdapterMaskPrep().prepare(_as_mask(images), width=48, height=64, resample="lanczos")
    expected = IPAdapterMaskProcessor().preprocess(images, height=64, width=48)
    assert torch.equal(out, expected[:, 0])
    assert IPAdapterMaskPrep.CATEGORY == "ipadapter/masks"


@pytest.mark.parametrize("size", list(LEVEL_GRIDS))
def test_layer_masks_equal_diffusers_downsample_for_every_level(size):
    width, height = size
    images = [img.resize((width, height)) for img in _blob_images()]
    per_adapter = IPAdapterMaskProcessor().preprocess(images, height=height, width=width).reshape(
        1, 2, height, width)  # diffusers' ip_adapter_masks entry for one adapter with two images
    latent_hw = (height // 8, width // 8)
    batch, channels = 4, 8  # cond + uncond of two latents
    for grid_h, grid_w in LEVEL_GRIDS[size]:
        query_len = grid_h * grid_w
        ours = masks.image_layer_masks(per_adapter, query_len, latent_hw, batch)
        assert ours.shape == (2, batch, query_len, 1)
        for i in range(2):
            theirs = IPAdapterMaskProcessor.downsample(per_adapter[:, i], batch, query_len, channels)
            assert torch.equal(ours[i].expand(-1, -1, channels), theirs)


def test_diffusers_method_without_the_exact_grid_reproduces_diffusers_even_when_it_pads():
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :20] = 1.0
    query_len = 48 * 32  # a 768x512 latent grid; the square mask's ratio makes diffusers pad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = IPAdapterMaskProcessor.downsample(mask, 2, query_len, 1)
        ours = masks.layer_mask(mask, query_len, (96, 64), 2, exact_grid=False)
    assert torch.equal(ours, theirs)


def test_per_image_masks_accept_both_layouts():
    stack = _levels_mask([0.2, 0.8])
    a = masks.image_layer_masks(stack, 16, (8, 8), 2)
    b = masks.image_layer_masks(masks.to_diffusers_layout(stack), 16, (8, 8), 2)
    assert torch.equal(a, b)
    assert torch.allclose(a[:, :, 0, 0], torch.tensor([[0.2, 0.2], [0.8, 0.8]]))
