"""Per-frame weight nodes: IPAdapterWeights, IPAdapterWeightsFromStrategy,
IPAdapterPromptScheduleFromWeightsStrategy, IPAdapterCombineWeights.  The math is in ``core.weight_schedule``.

A FLOAT output here carries a *list* of per-frame weights (as in the existing pack); the Batch apply nodes
take it on their ``weight`` input.
"""
from __future__ import annotations

from ..core import weight_schedule as schedule

_COUNT = {"default": 0, "min": 0, "max": 9999, "step": 1}
_OUTPUTS = ("FLOAT", "FLOAT", "INT", "IMAGE", "IMAGE", "WEIGHTS_STRATEGY")
_OUTPUT_NAMES = ("weights", "weights_invert", "total_frames", "image_1", "image_2", "weights_strategy")


def _outputs(strategy: dict, image) -> tuple:
    result = schedule.build_schedule(strategy, image)
    return (result.weights, result.weights_invert, result.total_frames, result.image_1, result.image_2, strategy)


class IPAdapterWeights:
    """A per-frame weight schedule (ramps, cross-fades of an image batch) for animations."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "weights": ("STRING", {"default": "1.0, 0.0", "multiline": True}),
                "timing": (list(schedule.TIMINGS), {"default": "linear"}),
                "frames": ("INT", dict(_COUNT)),
                "start_frame": ("INT", dict(_COUNT)),
                "end_frame": ("INT", {**_COUNT, "default": 9999}),
                "add_starting_frames": ("INT", dict(_COUNT)),
                "add_ending_frames": ("INT", dict(_COUNT)),
                "method": (list(schedule.METHODS), {"default": "full batch"}),
            },
            "optional": {
                "image": ("IMAGE",),
            },
        }

    RETURN_TYPES = _OUTPUTS
    RETURN_NAMES = _OUTPUT_NAMES
    FUNCTION = "weights"
    CATEGORY = "ipadapter/weights"

    def weights(self, weights="1.0, 0.0", timing="linear", frames=0, start_frame=0, end_frame=9999,
                add_starting_frames=0, add_ending_frames=0, method="full batch", image=None):
        strategy = schedule.make_strategy(weights, timing, frames, start_frame, end_frame, add_starting_frames,
                                          add_ending_frames, method,
                                          frame_count=0 if image is None else image.shape[0])
        return _outputs(strategy, image)


class IPAdapterWeightsFromStrategy:
    """Re-runs a stored IPAdapterWeights strategy (e.g. on another image batch)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"weights_strategy": ("WEIGHTS_STRATEGY",)},
            "optional": {"image": ("IMAGE",)},
        }

    RETURN_TYPES = _OUTPUTS
    RETURN_NAMES = _OUTPUT_NAMES
    FUNCTION = "weights"
    CATEGORY = "ipadapter/weights"

    def weights(self, weights_strategy, image=None):
        return _outputs(dict(weights_strategy), image)


class IPAdapterPromptScheduleFromWeightsStrategy:
    """A batch prompt schedule whose keyframes follow a weights strategy's segments."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "weights_strategy": ("WEIGHTS_STRATEGY",),
                "prompt": ("STRING", {"default": "", "multiline": True}),
            },
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("prompt_schedule",)
    FUNCTION = "prompt_schedule"
    CATEGORY = "ipadapter/weights"

    def prompt_schedule(self, weights_strategy, prompt=""):
        return (schedule.prompt_schedule(weights_strategy, prompt),)


class IPAdapterCombineWeights:
    """Two weight lists (or numbers) joined end to end."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "weights_1": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05}),
                "weights_2": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05}),
            },
        }

    RETURN_TYPES = ("FLOAT", "INT")
    RETURN_NAMES = ("weights", "count")
    FUNCTION = "combine"
    CATEGORY = "ipadapter/utils"

    def combine(self, weights_1, weights_2):
        weights = schedule.combine_weights(weights_1, weights_2)
        return (weights, len(weights))


NODE_CLASS_MAPPINGS = {
    "IPAdapterWeights": IPAdapterWeights,
    "IPAdapterWeightsFromStrategy": IPAdapterWeightsFromStrategy,
    "IPAdapterPromptScheduleFromWeightsStrategy": IPAdapterPromptScheduleFromWeightsStrategy,
    "IPAdapterCombineWeights": IPAdapterCombineWeights,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "IPAdapterWeights": "IPAdapter Weights",
    "IPAdapterWeightsFromStrategy": "IPAdapter Weights From Strategy",
    "IPAdapterPromptScheduleFromWeightsStrategy": "Prompt Schedule From Weights Strategy",
    "IPAdapterCombineWeights": "IPAdapter Combine Weights",
}
