"""IPAdapterWeights and its strategy nodes: declarations as in the existing pack, schedules by numbers."""
from __future__ import annotations

import math

import pytest
import torch

from ipadapter_nodes.core import weight_schedule as ws
from ipadapter_nodes.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from ipadapter_nodes.nodes.weights import (IPAdapterCombineWeights, IPAdapterPromptScheduleFromWeightsStrategy,
                                           IPAdapterWeights, IPAdapterWeightsFromStrategy)


def _widgets(cls) -> list[tuple]:
    """(name, type or options, default) of every widget input, in declaration order."""
    spec = cls.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            kind = entry[0]
            opts = entry[1] if len(entry) > 1 else {}
            if isinstance(kind, list):
                out.append((name, tuple(kind), opts.get("default", kind[0])))
            elif kind in ("FLOAT", "INT", "STRING", "BOOLEAN"):
                out.append((name, kind, opts.get("default")))
    return out


def test_declarations_equal_the_existing_pack():
    assert _widgets(IPAdapterWeights) == [
        ("weights", "STRING", "1.0, 0.0"),
        ("timing", ("custom", "linear", "ease_in_out", "ease_in", "ease_out", "random"), "linear"),
        ("frames", "INT", 0), ("start_frame", "INT", 0), ("end_frame", "INT", 9999),
        ("add_starting_frames", "INT", 0), ("add_ending_frames", "INT", 0),
        ("method", ("full batch", "shift batches", "alternate batches"), "full batch"),
    ]
    assert IPAdapterWeights.INPUT_TYPES()["optional"] == {"image": ("IMAGE",)}
    outputs = ("FLOAT", "FLOAT", "INT", "IMAGE", "IMAGE", "WEIGHTS_STRATEGY")
    names = ("weights", "weights_invert", "total_frames", "image_1", "image_2", "weights_strategy")
    for cls in (IPAdapterWeights, IPAdapterWeightsFromStrategy):
        assert (cls.RETURN_TYPES, cls.RETURN_NAMES, cls.CATEGORY) == (outputs, names, "ipadapter/weights")
    assert _widgets(IPAdapterWeightsFromStrategy) == []
    assert _widgets(IPAdapterPromptScheduleFromWeightsStrategy) == [("prompt", "STRING", "")]
    assert IPAdapterPromptScheduleFromWeightsStrategy.RETURN_NAMES == ("prompt_schedule",)
    assert _widgets(IPAdapterCombineWeights) == [("weights_1", "FLOAT", 0.0), ("weights_2", "FLOAT", 0.0)]
    assert (IPAdapterCombineWeights.RETURN_TYPES, IPAdapterCombineWeights.RETURN_NAMES,
            IPAdapterCombineWeights.CATEGORY) == (("FLOAT", "INT"), ("weights", "count"), "ipadapter/utils")
    assert {k: NODE_DISPLAY_NAME_MAPPINGS[k] for k in ("IPAdapterWeights", "IPAdapterWeightsFromStrategy",
                                                       "IPAdapterPromptScheduleFromWeightsStrategy",
                                                       "IPAdapterCombineWeights")} == {
        "IPAdapterWeights": "IPAdapter Weights",
        "IPAdapterWeightsFromStrategy": "IPAdapter Weights From Strategy",
        "IPAdapterPromptScheduleFromWeightsStrategy": "Prompt Schedule From Weights Strategy",
        "IPAdapterCombineWeights": "IPAdapter Combine Weights",
    }
    assert NODE_CLASS_MAPPINGS["IPAdapterWeights"] is IPAdapterWeights


def _weights(**kwargs) -> list[float]:
    return IPAdapterWeights().weights(**kwargs)[0]


@pytest.mark.parametrize("timing, middle", [
    ("linear", 0.5), ("ease_in_out", 0.5), ("ease_in", math.sin(math.pi / 4)), ("ease_out", 1 - math.cos(math.pi / 4)),
])
def test_ramps_go_from_the_first_to_the_last_value(timing, middle):
    assert _weights(weights="0.0, 1.0", timing=timing, frames=3) == pytest.approx([0.0, middle, 1.0], abs=1e-12)


def test_linear_ramp_of_five_frames():
    assert _weights(weights="1.0, 0.0", timing="linear", frames=5) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_ramp_between_start_and_end_frame_holds_the_ends():
    assert _weights(weights="0, 1", timing="linear", frames=6, start_frame=1, end_frame=4) == \
        pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0, 1.0])


def test_custom_timing_keeps_the_listed_values_and_reads_new_lines():
    assert _weights(weights="1, 0.5\n0.2", timing="custom") == [1.0, 0.5, 0.2]


def test_random_timing_is_deterministic_and_within_range():
    first = _weights(weights="0.2, 0.8", timing="random", frames=8)
    assert first == _weights(weights="0.2, 0.8", timing="random", frames=8)
    assert len(first) == 8 and all(0.2 <= w <= 0.8 for w in first) and len(set(first)) == 8


def test_a_bad_number_is_named():
    with pytest.raises(ValueError, match="item 2 'x'"):
        _weights(weights="1, x", timing="custom")


def _images(count: int) -> torch.Tensor:
    return torch.arange(count, dtype=torch.float32).view(count, 1, 1, 1).expand(count, 2, 2, 3).clone()


def _ids(image: torch.Tensor) -> list[int]:
    return [int(v) for v in image[:, 0, 0, 0]]


def test_full_batch_repeats_each_image_for_one_segment():
    weights, invert, total, image_1, image_2, strategy = IPAdapterWeights().weights(
        weights="1, 0.5", timing="custom", image=_images(2))
    assert weights == [1.0, 0.5, 1.0, 0.5] and invert == [0.5, 1.0, 0.5, 1.0] and total == 4
    assert _ids(image_1) == [0, 0, 1, 1] and image_2 is None
    assert strategy["frame_count"] == 2


def test_shift_batches_cross_fade_consecutive_images():
    weights, _, total, image_1, image_2, _ = IPAdapterWeights().weights(
        weights="1, 0.5", timing="custom", method="shift batches", image=_images(3))
    assert weights == [1.0, 0.5, 1.0, 0.5] and total == 4
    assert _ids(image_1) == [0, 0, 1, 1] and _ids(image_2) == [1, 1, 2, 2]


@pytest.mark.parametrize("count, first, second, weights", [
    (4, [0, 0, 2, 2, 2, 2], [1, 1, 1, 1, 3, 3], [1.0, 0.5, 0.5, 1.0, 1.0, 0.5]),
    (3, [0, 0, 2, 2], [1, 1, 1, 1], [1.0, 0.5, 0.5, 1.0]),
])
def test_alternate_batches_take_turns_with_inverted_weights(count, first, second, weights):
    out = IPAdapterWeights().weights(weights="1, 0.5", timing="custom", method="alternate batches",
                                     image=_images(count))
    assert out[0] == weights and _ids(out[3]) == first and _ids(out[4]) == second


def test_hold_frames_repeat_the_first_and_last_image_and_weight():
    weights, _, total, image_1, _, _ = IPAdapterWeights().weights(
        weights="1, 0.5", timing="custom", add_starting_frames=2, add_ending_frames=1, image=_images(2))
    assert weights == [1.0, 1.0, 1.0, 0.5, 1.0, 0.5, 0.5] and total == 7
    assert _ids(image_1) == [0, 0, 0, 0, 1, 1, 1]


def test_cross_fades_need_two_images():
    with pytest.raises(ValueError, match="at least 2 reference images"):
        IPAdapterWeights().weights(weights="1, 0", timing="custom", method="shift batches", image=_images(1))


def test_from_strategy_reproduces_the_schedule_on_the_images():
    first = IPAdapterWeights().weights(weights="0, 1", timing="ease_in_out", frames=4, method="shift batches",
                                       image=_images(3))
    again = IPAdapterWeightsFromStrategy().weights(first[5], image=_images(3))
    assert again[:3] == first[:3] and torch.equal(again[3], first[3]) and torch.equal(again[4], first[4])


def test_prompt_schedule_keyframes_follow_the_segments():
    strategy = IPAdapterWeights().weights(weights="0, 1", timing="linear", frames=4, add_starting_frames=2,
                                          add_ending_frames=1, image=_images(2))[5]
    text = IPAdapterPromptScheduleFromWeightsStrategy().prompt_schedule(strategy, "a cat\n\nsays \"hi\"")[0]
    assert text == '"0": "a cat",\n"2": "a cat",\n"6": "says \\"hi\\"",\n"10": "says \\"hi\\"",\n'


def test_prompt_schedule_of_a_custom_timing_steps_by_its_length():
    strategy = ws.make_strategy("1, 0.5, 0", "custom", frame_count=2)
    assert ws.prompt_schedule(strategy, "x\ny\nz") == '"0": "x",\n"3": "y",\n'


def test_combine_weights_joins_lists_and_numbers():
    assert IPAdapterCombineWeights().combine(0.5, [1.0, 2.0]) == ([0.5, 1.0, 2.0], 3)
    assert IPAdapterCombineWeights().combine(0.25, 0.75) == ([0.25, 0.75], 2)
