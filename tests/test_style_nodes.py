"""Style nodes: declarations equal the existing pack's (names, defaults, ranges, widget order, outputs), and the
InstantStyle node's text checks.  Their behaviour on models is in test_issue5_workflows.py."""
from __future__ import annotations

import pytest

from ipadapter_nodes.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from ipadapter_nodes.nodes.style import IPAdapterInstantStyle

from test_batch_nodes import COMBINE, END, OPTIONAL, SCALING, START, WEIGHT_TYPES, _sockets, _widgets

W5 = ("FLOAT", 1.0, -1.0, 5.0)


def _style_composition(batch: bool) -> list:
    widgets = [("weight_style", *W5), ("weight_composition", *W5), ("expand_style", "BOOLEAN", False, None, None),
               ("combine_embeds", COMBINE, "average"), START, END, ("embeds_scaling", SCALING, "V only")]
    return [w for w in widgets if not (batch and w[0] == "combine_embeds")]


def _precise(boost: str, default: float) -> list:
    return [("weight", *W5), (boost, "FLOAT", default, -5.0, 5.0), ("combine_embeds", COMBINE, "concat"), START, END,
            ("embeds_scaling", SCALING, "V only")]


@pytest.mark.parametrize("name, display, category, widgets, sockets", [
    ("IPAdapterStyleComposition", "IPAdapter Style & Composition SDXL", "ipadapter/style_composition",
     _style_composition(False), ["model", "ipadapter", "image_style", "image_composition"]),
    ("IPAdapterStyleCompositionBatch", "IPAdapter Style & Composition Batch SDXL", "ipadapter/style_composition",
     _style_composition(True), ["model", "ipadapter", "image_style", "image_composition"]),
    ("IPAdapterPreciseStyleTransfer", "IPAdapter Precise Style Transfer", "ipadapter",
     _precise("style_boost", 1.0), ["model", "ipadapter", "image"]),
    ("IPAdapterPreciseStyleTransferBatch", "IPAdapter Precise Style Transfer Batch", "ipadapter",
     _precise("style_boost", 1.0), ["model", "ipadapter", "image"]),
    ("IPAdapterPreciseComposition", "IPAdapter Precise Composition", "ipadapter",
     _precise("composition_boost", 0.0), ["model", "ipadapter", "image"]),
    ("IPAdapterPreciseCompositionBatch", "IPAdapter Precise Composition Batch", "ipadapter",
     _precise("composition_boost", 0.0), ["model", "ipadapter", "image"]),
])
def test_declarations_equal_the_existing_pack(name, display, category, widgets, sockets):
    cls = NODE_CLASS_MAPPINGS[name]
    assert NODE_DISPLAY_NAME_MAPPINGS[name] == display and cls.CATEGORY == category
    assert _widgets(cls) == widgets
    assert _sockets(cls) == (sockets, OPTIONAL)
    assert cls.RETURN_TYPES == ("MODEL",) and cls.FUNCTION == "apply_ipadapter"


def test_mad_scientist_declaration_equals_the_existing_pack():
    cls = NODE_CLASS_MAPPINGS["IPAdapterMS"]
    assert (NODE_DISPLAY_NAME_MAPPINGS["IPAdapterMS"], cls.CATEGORY) == ("IPAdapter Mad Scientist", "ipadapter/dev")
    assert _widgets(cls) == [
        ("weight", *W5), ("weight_faceidv2", *W5), ("weight_type", WEIGHT_TYPES, "linear"),
        ("combine_embeds", COMBINE, "concat"), START, END, ("embeds_scaling", SCALING, "V only"),
        ("layer_weights", "STRING", "", None, None)]
    assert cls.INPUT_TYPES()["required"]["layer_weights"][1]["multiline"] is True
    assert _sockets(cls) == (["model", "ipadapter", "image"], OPTIONAL + ["insightface"])


def test_instant_style_declaration():
    cls = NODE_CLASS_MAPPINGS["IPAdapterInstantStyle"]
    assert cls is IPAdapterInstantStyle and NODE_DISPLAY_NAME_MAPPINGS["IPAdapterInstantStyle"] == "IPAdapter InstantStyle"
    assert _widgets(cls) == [("block_scales", "STRING", '{"up": {"block_0": [0.0, 1.0, 0.0]}}', None, None),
                             START, END, ("embeds_scaling", SCALING, "V only")]
    assert _sockets(cls) == (["model", "ipadapter", "image"], OPTIONAL)


@pytest.mark.parametrize("text", ['{"up": {"block_0": [0.0, 1.0, 0.0]}}', "{'down': {'block_2': [0, 1]}}", "0.5"])
def test_instant_style_accepts_dicts_and_numbers(text):
    assert IPAdapterInstantStyle.VALIDATE_INPUTS(text) is True


@pytest.mark.parametrize("text, message", [("", "empty"), ('{"up": __import__("os")}', "unexpected"),
                                           ("{'up': [1,", "bad syntax")])
def test_instant_style_reports_bad_text_without_running_it(text, message):
    verdict = IPAdapterInstantStyle.VALIDATE_INPUTS(text)
    assert isinstance(verdict, str) and message in verdict


def test_instant_style_names_the_valid_blocks_for_an_unknown_one():
    class Model:  # only the family is read before the block scales are checked
        family = "sd15"

    with pytest.raises(ValueError, match=r"IPAdapterInstantStyle: block_scales: .*'up' -> 'block_0'.*valid keys"):
        IPAdapterInstantStyle().apply_ipadapter(Model(), {"ipadapter": {"model": object()},
                                                          "clipvision": {"model": object()}},
                                                image=None, block_scales='{"up": {"block_0": 1.0}}')
