"""Per-layer weighting: weight types, the precise swap, style & composition, block scales, layer_weights text.

The expected tables are written out from the existing pack's rules (anchor-node-pack.md §2.1), translated
onto our layer order (down, up, mid last).  SD1.5 tables list the 16 layers; SDXL tables list the 11
attention modules in our order, each expanded to its transformer layers (2 or 10).  Block-scale dicts are
checked against diffusers' own ``set_ip_adapter_scale`` on the tiny UNets.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from ipadapter_nodes.core.adapter import attn2_layer_names
from ipadapter_nodes.core.block_index import pack_block_index
from ipadapter_nodes.core.block_scales import block_scales_to_layer_weights, parse_block_scales
from ipadapter_nodes.core.weighting import (
    WEIGHT_TYPES, LayerWeights, composition_layers, layer_weights, parse_layer_weights, style_composition_weights,
)
from ipadapter_nodes.runtime import tiny
from ipadapter_nodes.runtime.tiny_adapters import make_adapter

TOL = 6e-4  # the reference tables have 3 decimals
# SDXL attention modules in our order and their transformer layers:
# down_blocks.1.attentions.0/1, down_blocks.2.attentions.0/1, up_blocks.0.attentions.0/1/2,
# up_blocks.1.attentions.0/1/2, mid_block.attentions.0
SDXL_MODULE_SIZES = (2, 2, 10, 10, 10, 10, 10, 2, 2, 2, 10)

w, c, b = 0.8, 1.5, 2.0  # node weight, composition weight, boost

# SD1.5, our order: down0.a0 down0.a1 down1.a0 down1.a1 down2.a0 down2.a1 | up1.a0-2 up2.a0-2 up3.a0-2 | mid
SD15_MULTIPLIERS = {  # per-layer multiplier of w for the ramp and section types
    "linear": [1.0] * 16,
    "ease in": [1.000, .941, .881, .822, .762, .703, .584, .525, .466, .406, .347, .287, .228, .169, .109, .644],
    "ease out": [.050, .109, .169, .228, .287, .347, .466, .525, .584, .644, .703, .762, .822, .881, .941, .406],
    "ease in-out": [.050, .169, .287, .406, .525, .644, .881, 1.000, .881, .762, .644, .525, .406, .287, .169,
                    .762],
    "reverse in-out": [1.000, .881, .762, .644, .525, .406, .169, .050, .169, .287, .406, .525, .644, .762, .881,
                       .287],
    "weak input": [.2] * 6 + [1.0] * 9 + [1.0],
    "weak output": [1.0] * 6 + [.2] * 9 + [1.0],
    "weak middle": [1.0] * 6 + [1.0] * 9 + [.2],
    "strong middle": [.2] * 6 + [.2] * 9 + [1.0],
}
SDXL_MULTIPLIERS = {  # per module: d1a0 d1a1 d2a0 d2a1 | u0a0 u0a1 u0a2 u1a0 u1a1 u1a2 | mid
    "linear": [1.0] * 11,
    "ease in": [1.000, .914, .827, .741, .568, .482, .395, .309, .223, .136, .655],
    "ease out": [.050, .136, .223, .309, .482, .568, .655, .741, .827, .914, .395],
    "ease in-out": [.050, .223, .395, .568, .914, .914, .741, .568, .395, .223, .741],
    "reverse in-out": [1.000, .827, .655, .482, .136, .136, .309, .482, .655, .827, .309],
    "weak input": [.2] * 4 + [1.0] * 6 + [1.0],
    "weak output": [1.0] * 4 + [.2] * 6 + [1.0],
    "weak middle": [1.0] * 4 + [1.0] * 6 + [.2],
    "strong middle": [.2] * 4 + [.2] * 6 + [1.0],
}
# (cond, uncond or None) with w, composition weight c and boost b
SD15_MAPS = {
    "style transfer": ([w, w, w, w, 0, 0, 0, 0, w, w, w, w, w, w, w, 0], None),
    "composition": ([0, 0, 0, 0, .25 * w, w, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], None),
    "strong style transfer": ([w, w, w, w, 0, 0, w, w, w, w, w, w, w, w, w, w], None),
    "style and composition": ([w, w, w, w, .25 * c, c, 0, 0, w, w, w, w, w, w, w, 0], None),
    "strong style and composition": ([w, w, w, w, c, c, w, w, w, w, w, w, w, w, w, w], None),
    "style transfer precise": ([w, w, w, w, 0, 0, 0, 0, w, w, w, w, w, w, w, 0],
                               [0, 0, 0, 0, .25 * b, b, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
    "composition precise": ([0, 0, 0, 0, .25 * w, w, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                            [b, b, b, b, 0, 0, .1 * b, .1 * b, b, b, b, b, b, b, b, .1 * b]),
}
SDXL_MAPS = {  # per module, as SDXL_MULTIPLIERS
    "style transfer": ([0, 0, 0, 0, 0, w, 0, 0, 0, 0, 0], None),
    "composition": ([0, 0, 0, w, 0, 0, 0, 0, 0, 0, 0], None),
    "strong style transfer": ([w, w, w, 0, w, w, w, w, w, w, w], None),
    "style and composition": ([0, 0, 0, c, 0, w, 0, 0, 0, 0, 0], None),
    "strong style and composition": ([w, w, w, c, w, w, w, w, w, w, w], None),
    "style transfer precise": ([0, 0, 0, 0, 0, w, 0, 0, 0, 0, 0], [0, 0, 0, b, 0, 0, 0, 0, 0, 0, 0]),
    "composition precise": ([0, 0, 0, w, 0, 0, 0, 0, 0, 0, 0],
                            [.1 * b, .1 * b, .1 * b, 0, .1 * b, b, .1 * b, .1 * b, .1 * b, .1 * b, .1 * b]),
}


def sdxl_layers(per_module: list[float]) -> list[float]:
    return [value for value, size in zip(per_module, SDXL_MODULE_SIZES) for _ in range(size)]


def expected(family: str, weight_type: str) -> tuple[list[float], list[float] | None]:
    expand = (lambda v: v) if family == "sd15" else sdxl_layers
    multipliers = SD15_MULTIPLIERS if family == "sd15" else SDXL_MULTIPLIERS
    if weight_type in multipliers:
        return [w * m for m in expand(multipliers[weight_type])], None
    cond, uncond = (SD15_MAPS if family == "sd15" else SDXL_MAPS)[weight_type]
    return expand(cond), None if uncond is None else expand(uncond)


def compute(family: str, weight_type: str) -> LayerWeights:
    boost = b if "precise" in weight_type else None
    return layer_weights(weight_type, w, family, boost=boost, composition_weight=c)


def test_weight_types_are_the_packs_fifteen_in_order():
    assert WEIGHT_TYPES == ("linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input",
                            "weak output", "weak middle", "strong middle", "style transfer", "composition",
                            "strong style transfer", "style and composition", "style transfer precise",
                            "composition precise")


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("weight_type", WEIGHT_TYPES + ("strong style and composition",))
def test_every_weight_type_layer_by_layer(family, weight_type):
    cond, uncond = expected(family, weight_type)
    result = compute(family, weight_type)
    assert result.num_layers == len(attn2_layer_names(family)) == len(cond)
    assert list(result.cond) == pytest.approx(cond, abs=TOL)
    if uncond is None:
        assert result.uncond is None
    else:
        assert list(result.uncond) == pytest.approx(uncond, abs=TOL)


@pytest.mark.parametrize("family, swapped", [("sd15", (4, 5)), ("sdxl", tuple(range(14, 24)))])
def test_style_transfer_precise_swaps_only_the_composition_layers(family, swapped):
    result = layer_weights("style transfer precise", 1.0, family, boost=3.0)
    assert result.swapped_layers == swapped == composition_layers(family)
    assert all(result.cond[i] == 0.0 for i in swapped)  # the cond branch gets nothing there
    assert result.uncond[swapped[-1]] == 3.0             # the reference pushes away through uncond, at boost


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_composition_precise_swaps_every_layer_but_composition(family):
    result = layer_weights("composition precise", 0.8, family, boost=0.3)
    others = [i for i in range(result.num_layers) if i not in composition_layers(family)]
    assert result.swapped_layers == tuple(others)
    assert all(result.cond[i] == 0.0 for i in others)
    assert result.cond[composition_layers(family)[-1]] == 0.8


@pytest.mark.parametrize("weight_type", ["style transfer precise", "composition precise"])
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_precise_boost_defaults_to_weight(weight_type, family):
    assert layer_weights(weight_type, 0.7, family) == layer_weights(weight_type, 0.7, family, boost=0.7)


@pytest.mark.parametrize("family, mid_layers", [("sd15", range(15, 16)), ("sdxl", range(60, 70))])
def test_middle_block_is_weighted(family, mid_layers):
    names = attn2_layer_names(family)
    assert all(names[i].startswith("mid_block.") for i in mid_layers)
    assert all(not names[i].startswith("mid_block.") for i in range(mid_layers.start))
    weak = layer_weights("weak middle", 1.0, family).cond
    assert [weak[i] for i in mid_layers] == [pytest.approx(0.2)] * len(mid_layers)
    ease_in = layer_weights("ease in", 1.0, family).cond
    mid_ramp = .644 if family == "sd15" else .655  # the ramp value of the pack's middle index (t 6 / t 4)
    assert all(abs(ease_in[i] - mid_ramp) < TOL for i in mid_layers)
    assert all(layer_weights("linear", 0.9, family).cond[i] == 0.9 for i in mid_layers)


def test_pack_block_index_translation():
    assert pack_block_index("sd15") == (0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15, 6)
    assert pack_block_index("sdxl") == tuple(t for t, size in zip((0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 4),
                                                                  SDXL_MODULE_SIZES) for _ in range(size))


def test_bad_weight_type_family_and_boost_are_errors():
    with pytest.raises(ValueError, match="unknown weight_type 'eas in'.*linear"):
        layer_weights("eas in", 1.0, "sd15")
    with pytest.raises(ValueError, match="unknown model family 'sd3'"):
        layer_weights("linear", 1.0, "sd3")
    with pytest.raises(ValueError, match="boost .* only applies to the precise"):
        layer_weights("linear", 1.0, "sdxl", boost=2.0)


# ----------------------------------------------------------------------------------------------------
# style & composition


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("expand_style", [False, True])
def test_style_composition_uses_composition_image_only_at_composition_layers(family, expand_style):
    style, composition = style_composition_weights(family, 0.9, 1.7, expand_style)
    layout = composition_layers(family)
    assert [i for i, x in enumerate(composition.cond) if x != 0.0] == list(layout)
    assert all(style.cond[i] == 0.0 for i in layout)
    weight_type = "strong style and composition" if expand_style else "style and composition"
    both = layer_weights(weight_type, 0.9, family, composition_weight=1.7).cond
    assert [s + k for s, k in zip(style.cond, composition.cond)] == pytest.approx(both)
    assert style.uncond is None and composition.uncond is None


def test_style_composition_layers_sdxl_are_instantstyles_blocks():
    names = attn2_layer_names("sdxl")
    style, composition = style_composition_weights("sdxl", 1.0, 0.5)
    assert {names[i].rsplit(".transformer_blocks", 1)[0] for i, x in enumerate(composition.cond) if x} \
        == {"down_blocks.2.attentions.1"}
    assert {names[i].rsplit(".transformer_blocks", 1)[0] for i, x in enumerate(style.cond) if x} \
        == {"up_blocks.0.attentions.1"}
    assert set(composition.cond) == {0.0, 0.5}


def test_style_composition_sd15_weights():
    style, composition = style_composition_weights("sd15", 1.0, 2.0)
    assert composition.cond == (0, 0, 0, 0, 0.5, 2.0) + (0,) * 10
    assert style.cond == (1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0)
    strong_style, strong_composition = style_composition_weights("sd15", 1.0, 2.0, expand_style=True)
    assert strong_composition.cond == (0, 0, 0, 0, 2.0, 2.0) + (0,) * 10
    assert strong_style.cond == (1, 1, 1, 1, 0, 0) + (1,) * 10


# ----------------------------------------------------------------------------------------------------
# Mad Scientist layer_weights


def test_parse_layer_weights_sd15_translates_pack_indices():
    # pack 0 = down_blocks.0.attentions.0 (ours 0), 6 = mid (ours 15), 7 = up_blocks.1.attentions.0 (ours 6)
    assert parse_layer_weights("0:1.0, 6:0.5, 7: 2, 15:-1", "sd15") == {0: 1.0, 6: 2.0, 14: -1.0, 15: 0.5}


def test_parse_layer_weights_sdxl_expands_modules():
    result = parse_layer_weights("3:1.0\n4:0.5, 6:2,", "sdxl")
    assert result == {**{i: 1.0 for i in range(14, 24)}, **{i: 2.0 for i in range(34, 44)},
                      **{i: 0.5 for i in range(60, 70)}}
    assert parse_layer_weights("  ", "sdxl") == {}
    assert parse_layer_weights("1:1, 1:3", "sdxl") == {2: 3.0, 3: 3.0}  # the last value wins, as in the pack


@pytest.mark.parametrize("text, message", [
    ("0:1, 3", r"item 2 '3': expected 'index:value'"),
    ("x:1", r"index 'x' is not a whole number"),
    ("1:abc", r"value 'abc' is not a number"),
    ("11:1", r"index 11 is out of range.*0\.\.10"),
    ("-1:1", r"index -1 is out of range"),
])
def test_parse_layer_weights_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_layer_weights(text, "sdxl")


def test_custom_layer_weights_scale_by_weight_and_zero_the_rest():
    custom = parse_layer_weights("0:1.0, 6:0.5", "sd15")
    result = layer_weights("ease in", 2.0, "sd15", custom=custom)  # non-precise types are forced to linear
    assert result.cond == (2.0,) + (0.0,) * 14 + (1.0,) and result.uncond is None


def test_custom_layer_weights_keep_the_precise_swap():
    custom = parse_layer_weights("3:1.0, 6:0.5", "sdxl")
    result = layer_weights("style transfer precise", 2.0, "sdxl", custom=custom)
    assert result.cond == tuple(1.0 if 34 <= i < 44 else 0.0 for i in range(70))
    assert result.uncond == tuple(2.0 if 14 <= i < 24 else 0.0 for i in range(70))


# ----------------------------------------------------------------------------------------------------
# InstantStyle block scales, against diffusers' set_ip_adapter_scale


@pytest.fixture(scope="module")
def ip_pipes(tiny_models_dir, tmp_path_factory):
    """Tiny SD1.5 and SDXL pipelines with a tiny adapter loaded by diffusers' own loader."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = tmp_path_factory.mktemp("adapters")
    root = Path(tiny_models_dir)
    pipes = {"sd15": StableDiffusionPipeline.from_pretrained(root / tiny.TINY_PATHS["tiny-sd15"],
                                                             safety_checker=None),
             "sdxl": StableDiffusionXLPipeline.from_pretrained(root / tiny.TINY_PATHS["tiny-sdxl"])}
    for family, pipe in pipes.items():
        make_adapter(family, folder / f"{family}.safetensors")
        pipe.load_ip_adapter(str(folder), subfolder="", weight_name=f"{family}.safetensors",
                             image_encoder_folder=None)
    return pipes


def diffusers_layer_scales(pipe, scales) -> tuple[float, ...]:
    """diffusers' per-layer scales, read back from the IP processors in our layer order."""
    pipe.set_ip_adapter_scale(copy.deepcopy(scales))
    processors = {name: p for name, p in pipe.unet.attn_processors.items()
                  if isinstance(getattr(p, "scale", None), list)}  # the IP-Adapter processors
    family = "sd15" if len(processors) == 16 else "sdxl"
    assert list(processors) == [f"{n}.processor" for n in attn2_layer_names(family)]
    return tuple(float(p.scale[0]) for p in processors.values())


SCALE_CASES = {
    "sdxl": [
        {"up": {"block_0": [0.0, 1.0, 0.0]}},                                   # style only
        {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}},  # style + layout
        0.6,
        {"mid": 0.5, "up": {"block_1": 0.25}},
        {"down": 0.3, "mid": [0.7], "up": {"block_0": [0.4]}},                  # 1-item lists broadcast
        {"up": [0.1, 0.2, 0.3], "down": {"block_1": [-0.5, 1.5]}},              # a section-wide list
    ],
    "sd15": [
        {"up": {"block_1": [0.0, 1.0, 0.0]}},
        {"down": {"block_2": [0.0, 1.0]}, "up": {"block_1": [0.0, 1.0, 0.0]}},
        0.6,
        {"down": {"block_2": 1.0}, "mid": 1.0, "up": {"block_1": 1.0}},         # InstantStyle SD1.5 style+layout
        {"down": 0.3, "mid": [0.7], "up": {"block_3": [0.4]}},
        {"up": [0.1, 0.2, 0.3], "down": {"block_0": [-0.5, 1.5]}},
    ],
}


@pytest.mark.parametrize("family, case", [(f, i) for f in SCALE_CASES for i in range(len(SCALE_CASES[f]))])
def test_block_scales_equal_diffusers(ip_pipes, family, case):
    scales = SCALE_CASES[family][case]
    ours = block_scales_to_layer_weights(scales, family)
    assert ours == diffusers_layer_scales(ip_pipes[family], scales)


def test_block_scales_style_only_sdxl_numbers():
    ours = block_scales_to_layer_weights({"up": {"block_0": [0.0, 1.0, 0.0]}}, "sdxl")
    assert ours == tuple(1.0 if 34 <= i < 44 else 0.0 for i in range(70))


def test_unknown_block_is_an_error_where_diffusers_zeroes_everything(ip_pipes):
    sdxl_style = {"up": {"block_0": [0.0, 1.0, 0.0]}}
    assert diffusers_layer_scales(ip_pipes["sd15"], sdxl_style) == (0.0,) * 16  # silently disabled
    with pytest.raises(ValueError, match=r"'up' -> 'block_0' names no block.*'up' -> 'block_1', 'block_2', "
                                         r"'block_3'"):
        block_scales_to_layer_weights(sdxl_style, "sd15")


@pytest.mark.parametrize("scales, message", [
    ({"down": {"block_0": 1.0}}, r"'down' -> 'block_0' names no block.*'down' -> 'block_1', 'block_2'"),
    ({"down": {"block_9": 1.0}}, r"'block_9' names no block"),
    ({"uo": {"block_0": 1.0}}, r"'uo' names no block.*valid keys are SDXL"),
    ({"up": {"block0": 1.0}}, r"'block0' names no block"),
    ({"down": {"block_2": [1.0, 0.0, 1.0]}}, r"list of 2 value\(s\).*found 3"),
    ({"mid": [1.0, 2.0]}, r"'mid': expected a number or a list of 1"),
    ({"up": {"block_0": [[0, 0, 1], [1, 1, 1], [0, 0, 1]]}}, r"per-image nested lists are not supported"),
    ({"up": {"block_0": "1.0"}}, r"expected numbers, found '1.0'"),
    ([0.5], r"expected a number or a dict"),
])
def test_bad_block_scales(scales, message):
    with pytest.raises(ValueError, match=message):
        block_scales_to_layer_weights(scales, "sdxl")


def test_parse_block_scales_json_and_python_forms():
    json_text = '{"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}'
    python_text = "{'down': {'block_2': [0.0, 1.0]},\n 'up': {'block_0': (0, 1.0, -0.0)},}"
    assert parse_block_scales(json_text) == {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}
    assert block_scales_to_layer_weights(parse_block_scales(python_text), "sdxl") \
        == block_scales_to_layer_weights(parse_block_scales(json_text), "sdxl")
    assert parse_block_scales(" 0.75 ") == 0.75
    assert parse_block_scales("{'mid': -2}") == {"mid": -2}


@pytest.mark.parametrize("text, message", [
    ("{'up': {'block_0': [0, 1, 0]}", r"bad syntax at line 1, column \d+"),
    ("{'up':\n {'block_0': zero}}", r"unexpected 'zero' at line 2, column 14"),
    ("{'up': __import__('os').system('x')}", r"unexpected \"__import__\('os'\).system\('x'\)\" at line 1"),
    ("", r"empty"),
    ("[1, 2]", r"expected a dict or a number, found list"),
])
def test_parse_block_scales_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_block_scales(text)

