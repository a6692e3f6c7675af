"""IPAdapterBatch, IPAdapterTiled(+Batch), IPAdapterClipVisionEnhancer(+Batch): declarations, the tiling math,
the enhancer at three encoder widths, and the batch mapping on the resulting MODEL."""
from __future__ import annotations


import pytest
import torch

from ipadapter_nodes.core import enhancer, tiled
from ipadapter_nodes.nodes import NODE_DISPLAY_NAME_MAPPINGS
from ipadapter_nodes.nodes import batch as batch_nodes

WEIGHT_TYPES = ("linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input", "weak output",
                "weak middle", "strong middle", "style transfer", "composition", "strong style transfer",
                "style and composition", "style transfer precise", "composition precise")
COMBINE = ("concat", "add", "subtract", "average", "norm average")
SCALING = ("V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty")
OPTIONAL = ["image_negative", "attn_mask", "clip_vision"]


def _widgets(cls) -> list[tuple]:
    """(name, kind, default, min, max) of each widget, in order; combos as their option tuple."""
    out = []
    for name, entry in cls.INPUT_TYPES()["required"].items():
        kind, opts = entry[0], (entry[1] if len(entry) > 1 else {})
        if isinstance(kind, list):
            out.append((name, tuple(kind), opts.get("default", kind[0])))
        elif kind in ("FLOAT", "INT", "STRING", "BOOLEAN"):
            out.append((name, kind, opts.get("default"), opts.get("min"), opts.get("max")))
    return out


def _sockets(cls) -> tuple[list[str], list[str]]:
    spec = cls.INPUT_TYPES()
    required = [n for n, e in spec["required"].items() if isinstance(e[0], str) and e[0].isupper()
                and e[0] not in ("FLOAT", "INT", "STRING", "BOOLEAN")]
    return required, list(spec.get("optional", {}))


START = ("start_at", "FLOAT", 0.0, 0.0, 1.0)
END = ("end_at", "FLOAT", 1.0, 0.0, 1.0)
EBS = ("encode_batch_size", "INT", 0, 0, 4096)


@pytest.mark.parametrize("name, display, category, widgets, outputs", [
    ("IPAdapterBatch", "IPAdapter Batch (Adv.)", "ipadapter",
     [("weight", "FLOAT", 1.0, -1.0, 5.0), ("weight_type", WEIGHT_TYPES, "linear"), START, END,
      ("embeds_scaling", SCALING, "V only"), EBS], ("MODEL",)),
    ("IPAdapterTiled", "IPAdapter Tiled", "ipadapter/tiled",
     [("weight", "FLOAT", 1.0, -1.0, 3.0), ("weight_type", WEIGHT_TYPES, "linear"),
      ("combine_embeds", COMBINE, "concat"), START, END, ("sharpening", "FLOAT", 0.0, 0.0, 1.0),
      ("embeds_scaling", SCALING, "V only")], ("MODEL", "IMAGE", "MASK")),
    ("IPAdapterTiledBatch", "IPAdapter Tiled Batch", "ipadapter/tiled",
     [("weight", "FLOAT", 1.0, -1.0, 3.0), ("weight_type", WEIGHT_TYPES, "linear"), START, END,
      ("sharpening", "FLOAT", 0.0, 0.0, 1.0), ("embeds_scaling", SCALING, "V only"), EBS],
     ("MODEL", "IMAGE", "MASK")),
    ("IPAdapterClipVisionEnhancer", "IPAdapter ClipVision Enhancer", "ipadapter/dev",
     [("weight", "FLOAT", 1.0, -1.0, 5.0), ("weight_type", WEIGHT_TYPES, "linear"),
      ("combine_embeds", COMBINE, "concat"), START, END, ("embeds_scaling", SCALING, "V only"),
      ("enhance_tiles", "INT", 2, 1, 16), ("enhance_ratio", "FLOAT", 1.0, 0.0, 1.0)], ("MODEL",)),
    ("IPAdapterClipVisionEnhancerBatch", "IPAdapter ClipVision Enhancer Batch", "ipadapter/dev",
     [("weight", "FLOAT", 1.0, -1.0, 5.0), ("weight_type", WEIGHT_TYPES, "linear"), START, END,
      ("embeds_scaling", SCALING, "V only"), ("enhance_tiles", "INT", 2, 1, 16),
      ("enhance_ratio", "FLOAT", 0.5, 0.0, 1.0), EBS], ("MODEL",)),
])
def test_declarations_equal_the_existing_pack(name, display, category, widgets, outputs):
    cls = batch_nodes.NODE_CLASS_MAPPINGS[name]
    assert NODE_DISPLAY_NAME_MAPPINGS[name] == display and cls.CATEGORY == category
    assert _widgets(cls) == widgets
    assert _sockets(cls) == (["model", "ipadapter", "image"], OPTIONAL)
    assert cls.RETURN_TYPES == outputs
    if name.startswith("IPAdapterTiled"):
        assert cls.RETURN_NAMES == ("MODEL", "tiles", "masks") and cls.FUNCTION == "apply_tiled"


# ---- tiling ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("height, width, resized, xs, ys", [
    (80, 96, (512, 512), [0, 256], [0, 256]),           # almost square: crop to a square, 2 x 2 tiles
    (100, 250, (256, 640), [0, 192, 384], [0]),         # 3 tiles overlapping by 64 px
    (300, 100, (768, 256), [0], [0, 256, 512]),         # tall
    (50, 300, (256, 1024), [0, 256, 512, 768], [0]),    # beyond 4:1: cropped to 4 tiles
])
def test_tiles_cover_the_resized_reference(height, width, resized, xs, ys):
    image = torch.rand(1, height, width, 3, generator=torch.manual_seed(0))
    prepared, _ = tiled.prepare_reference(image)
    tiles = tiled.make_tiles(image)
    assert tuple(prepared.shape[1:3]) == resized
    assert [(t.x, t.y) for t in tiles] == [(x, y) for y in ys for x in xs]
    for tile in tiles:
        assert tile.image.shape == (1, 256, 256, 3)
        assert torch.equal(tile.image, prepared[:, tile.y:tile.y + 256, tile.x:tile.x + 256])
        inside = torch.zeros(resized)
        inside[tile.y:tile.y + 256, tile.x:tile.x + 256] = 1
        assert torch.equal(tile.mask[0], inside)


def test_each_tile_mask_is_the_user_mask_inside_the_tile_only():
    image = torch.rand(1, 100, 250, 3, generator=torch.manual_seed(1))
    mask = torch.zeros(1, 100, 250)
    mask[:, :, :125] = 1.0  # left half
    _, prepared_mask = tiled.prepare_reference(image, mask)
    tiles = tiled.make_tiles(image, mask)
    for tile in tiles:
        region = prepared_mask[:, tile.y:tile.y + 256, tile.x:tile.x + 256]
        assert torch.equal(tile.mask[:, tile.y:tile.y + 256, tile.x:tile.x + 256], region)
        assert tile.mask.sum() == region.sum()
    assert tiles[0].mask.sum() > 0 and tiles[-1].mask.sum() == 0  # the right tile lies outside the mask


# ---- the enhancer ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("width, grid", [(1024, (32, 32)), (1280, (32, 40)), (768, (24, 32)), (32, (4, 8)),
                                         (40, (5, 8)), (24, (4, 6))])
def test_embeds_grid_is_the_most_square_factorisation(width, grid):
    assert enhancer.embeds_grid(width) == grid


def _pool_mosaic(tiles: list[torch.Tensor], n: int, rows: int, cols: int) -> torch.Tensor:
    """Reference: lay n x n grids [rows, cols] side by side, average every n x n block (exact division)."""
    mosaic = torch.zeros(n * rows, n * cols)
    for k, t in enumerate(tiles):
        i, j = divmod(k, n)
        mosaic[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols] = t
    return mosaic.reshape(rows, n, cols, n).mean(dim=(1, 3))


def test_merged_image_embeds_pool_the_mosaic_of_tile_vectors():
    tiles = torch.randn(4, 6, generator=torch.manual_seed(2))  # width 6 = a 2 x 3 grid
    expected = _pool_mosaic([t.view(2, 3) for t in tiles], 2, 2, 3).reshape(1, 6)
    assert torch.allclose(enhancer.merge_image_embeds(tiles, 2), expected, atol=1e-6)


def test_merged_hidden_states_pool_patches_and_average_class_tokens():
    states = torch.randn(4, 5, 3, generator=torch.manual_seed(3))  # class token + 2 x 2 patches, 3 channels
    merged = enhancer.merge_hidden_states(states, 2)
    assert torch.allclose(merged[0, 0], states[:, 0].mean(0), atol=1e-6)
    for c in range(3):
        expected = _pool_mosaic([s[1:, c].view(2, 2) for s in states], 2, 2, 2).reshape(4)
        assert torch.allclose(merged[0, 1:, c], expected, atol=1e-6)


def _encoder(name: str):
    """A tiny CLIP vision encoder: the two of runtime.tiny and a third (hidden 40, image_embeds 24, CLIP-L-like)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from ipadapter_nodes.core.encode import ClipVision
    from ipadapter_nodes.runtime import tiny

    torch.manual_seed(5)
    if name == "third":
        config = CLIPVisionConfig(hidden_size=40, projection_dim=24, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=80, image_size=224, patch_size=14)
        return ClipVision(CLIPVisionModelWithProjection(config).eval())
    return ClipVision(tiny.build_clip_vision(name).eval())


@pytest.mark.parametrize("name, width", [("vit-h", 32), ("vit-bigG", 40), ("third", 24)])
@pytest.mark.parametrize("feature", ["image_embeds", "hidden_states"])
def test_enhancer_works_for_every_encoder_width(name, width, feature):
    clip_vision = _encoder(name)
    key = "image_embeds" if feature == "image_embeds" else "penultimate_hidden_states"
    image = torch.rand(1, 112, 112, 3, generator=torch.manual_seed(4))
    whole = clip_vision.encode(image)[key]
    out = enhancer.enhance_features(clip_vision, image, whole, feature, tiles=2, ratio=0.25)
    tile_features = clip_vision.encode(enhancer.split_tiles(image, 2)[0])[key]
    merge = enhancer.merge_image_embeds if feature == "image_embeds" else enhancer.merge_hidden_states
    assert out.shape == (2, *whole.shape[1:])
    if feature == "image_embeds":
        assert out.shape[-1] == width
    assert torch.allclose(out[0], 0.25 * whole[0], atol=1e-6)
    assert torch.allclose(out[1], merge(tile_features, 2)[0], atol=1e-5)
    # several references: one row each, mixed by the ratio
    images = torch.cat([image, image.flip(1)])
    whole2 = clip_vision.encode(images)[key]
    mixed = enhancer.enhance_features(clip_vision, images, whole2, feature, tiles=2, ratio=0.25)
    assert mixed.shape == whole2.shape
    assert torch.allclose(mixed[0], 0.25 * whole2[0] + 0.75 * merge(tile_features, 2)[0], atol=1e-5)


def test_one_enhance_tile_changes_nothing():
    whole = torch.randn(1, 32)
    assert enhancer.enhance_features(None, torch.rand(1, 64, 64, 3), whole, "image_embeds", 1, 0.5) is whole


def test_masked_encoding_with_a_full_mask_equals_plain_encoding_and_an_empty_one_the_mean_colour():
    clip_vision = _encoder("vit-h")
    image = torch.rand(1, 96, 128, 3, generator=torch.manual_seed(6))
    plain = clip_vision.encode(image).penultimate_hidden_states
    full = enhancer.encode_masked(clip_vision, image, torch.ones(96, 128), "hidden_states")
    empty = enhancer.encode_masked(clip_vision, image, torch.zeros(1, 96, 128), "hidden_states")
    mean_colour = clip_vision.encode_pixels(torch.zeros(1, 3, 224, 224)).penultimate_hidden_states
    assert torch.allclose(full, plain, atol=1e-6)
    assert torch.allclose(empty, mean_colour, atol=1e-6)
    half = torch.zeros(1, 96, 128)
    half[:, :, :64] = 1
    assert not torch.allclose(enhancer.encode_masked(clip_vision, image, half, "hidden_states"), plain, atol=1e-3)
