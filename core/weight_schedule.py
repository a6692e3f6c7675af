"""Per-frame weight schedules: the math behind IPAdapterWeights and its strategy nodes.

An animation cross-fades reference images: frame ``f`` of the latent batch gets reference ``image_1[f]``
with weight ``weights[f]`` (and, through a second adapter, ``image_2[f]`` with ``weights_invert[f]``).
The schedule is built in two steps, as in the existing node pack:

1. **One segment** of ``frames`` weights from the ``weights`` text.  ``timing="custom"`` uses the listed
   values as they are; every other timing ramps from the first listed value to the last (0 -> 1 when the
   text is empty) over ``frames`` (at least 2) frames: the frames before ``start_frame`` hold the start
   value, the ramp runs from ``start_frame`` up to ``end_frame`` (clipped to ``frames``) and ends exactly on
   the end value, the frames from ``end_frame`` on hold the end value.  With ``t = i / (n - 1)`` over the
   ``n`` ramp frames: ``linear`` t, ``ease_in_out`` (1 - cos(pi t)) / 2, ``ease_in`` sin(pi t / 2),
   ``ease_out`` 1 - cos(pi t / 2) (the pack's names, which are swapped relative to the usual easing
   convention, are kept so shared workflows mean the same), ``random`` uniform in [start, end].
2. **Images** (optional batch of references): ``full batch`` gives every image one segment
   (``image_1`` = each image repeated ``frames`` times); ``shift batches`` cross-fades consecutive images
   (segment k: ``image_1`` = image k, ``image_2`` = image k+1); ``alternate batches`` cross-fades the chain
   with the two adapters taking turns (segment k: ``image_1`` = image 2*ceil(k/2), ``image_2`` = image
   2*floor(k/2)+1, and odd segments use the segment's weights inverted within their own range).  Hold
   frames (``add_starting_frames`` of the first image / weight, ``add_ending_frames`` of the last) are
   then added at the ends.  ``weights_invert`` is the whole list reversed.

Differences from the pack, all where it fails or is not reproducible: ``random`` draws from a generator
seeded with the strategy (the same strategy gives the same weights), a one-frame ramp is its end value (the
pack divides by zero), ``shift``/``alternate`` with fewer than two images are an error (the pack returns
empty batches), and the prompt schedule steps by the real segment length (the pack uses the ``frames``
widget, which is 0 by default for custom timings, putting every prompt on frame 0).
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

TIMINGS: tuple[str, ...] = ("custom", "linear", "ease_in_out", "ease_in", "ease_out", "random")
METHODS: tuple[str, ...] = ("full batch", "shift batches", "alternate batches")
# The keys of a WEIGHTS_STRATEGY value (a plain dict, as in the pack, so other packs can read it).
STRATEGY_KEYS: tuple[str, ...] = ("weights", "timing", "frames", "start_frame", "end_frame",
                                  "add_starting_frames", "add_ending_frames", "method", "frame_count")

# Ramp shapes, t in 0..1 -> fraction of the way from the start value to the end value.
_EASINGS: dict[str, Callable[[float], float]] = {
    "linear": lambda t: t,
    "ease_in_out": lambda t: (1.0 - math.cos(t * math.pi)) / 2.0,
    "ease_in": lambda t: math.sin(t * math.pi / 2.0),
    "ease_out": lambda t: 1.0 - math.cos(t * math.pi / 2.0),
}


@dataclass(frozen=True)
class WeightSchedule:
    """What IPAdapterWeights outputs: per-frame weights, their reverse, the frame count and the images."""

    weights: list[float]
    weights_invert: list[float]
    total_frames: int
    image_1: torch.Tensor | None
    image_2: torch.Tensor | None


def parse_weights(text: str) -> list[float]:
    """The numbers of a weights text: separated by commas or new lines, blanks skipped.

    Raises ValueError naming the item that is not a number.
    """
    values = []
    for position, item in enumerate(i.strip() for i in str(text).replace("\n", ",").split(",")):
        if not item:
            continue
        try:
            values.append(float(item))
        except ValueError:
            raise ValueError(f"weights: item {position + 1} {item!r} is not a number; write numbers separated "
                             f"by commas or new lines, e.g. '1.0, 0.5, 0.0'") from None
    return values


def make_strategy(weights: str = "1.0, 0.0", timing: str = "linear", frames: int = 0, start_frame: int = 0,
                  end_frame: int = 9999, add_starting_frames: int = 0, add_ending_frames: int = 0,
                  method: str = "full batch", frame_count: int = 0) -> dict[str, Any]:
    """A WEIGHTS_STRATEGY dict (the pack's keys) from IPAdapterWeights' widget values.

    ``frame_count`` is the number of reference images the strategy was made with (0: none).
    """
    if timing not in TIMINGS:
        raise ValueError(f"timing {timing!r} is not known; expected one of {', '.join(TIMINGS)}")
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not known; expected one of {', '.join(METHODS)}")
    counts = dict(frames=frames, start_frame=start_frame, end_frame=end_frame,
                  add_starting_frames=add_starting_frames, add_ending_frames=add_ending_frames,
                  frame_count=frame_count)
    for name, value in counts.items():
        if int(value) < 0:
            raise ValueError(f"{name} must be 0 or more, got {value}")
    return {"weights": str(weights), "timing": timing, "method": method,
            **{name: int(value) for name, value in counts.items()}}


def _strategy_seed(strategy: Mapping[str, Any]) -> int:
    text = json.dumps({k: strategy.get(k) for k in STRATEGY_KEYS}, sort_keys=True)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def segment_weights(strategy: Mapping[str, Any]) -> list[float]:
    """Step 1 of the module docstring: the weights of one segment (never empty)."""
    values = parse_weights(strategy["weights"])
    timing = strategy["timing"]
    if timing == "custom":
        return values or [0.0]
    frames = max(int(strategy["frames"]), 2)
    start, end = (values[0], values[-1]) if values else (0.0, 1.0)
    end_frame = min(int(strategy["end_frame"]), frames)
    start_frame = min(int(strategy["start_frame"]), end_frame)
    count = end_frame - start_frame
    if timing == "random":
        generator = random.Random(_strategy_seed(strategy))
        ramp = [generator.uniform(start, end) for _ in range(count)]
    else:
        easing = _EASINGS[timing]
        ramp = [start + (end - start) * easing(i / (count - 1) if count > 1 else 1.0) for i in range(count)]
        if ramp:
            ramp[-1] = end  # exactly the end value, whatever the float rounding
    return [start] * start_frame + ramp + [end] * (frames - end_frame)


def _inverted(weights: Sequence[float]) -> list[float]:
    """Weights mirrored within their own range (max <-> min)."""
    low, high = min(weights), max(weights)
    return [high - (w - low) for w in weights]


def _segments(images: torch.Tensor, method: str, segment: list[float]):
    """(image_1 indices, image_2 indices or None, weights per segment) for a batch of references."""
    count = images.shape[0]
    if method == "full batch":
        return list(range(count)), None, [segment] * count
    if count < 2:
        raise ValueError(f"IPAdapterWeights: method '{method}' cross-fades consecutive images and needs at least "
                         f"2 reference images, got {count}; use 'full batch' for one image")
    pairs = range(count - 1)
    if method == "shift batches":
        return list(pairs), [k + 1 for k in pairs], [segment] * (count - 1)
    inverted = _inverted(segment)
    return ([2 * ((k + 1) // 2) for k in pairs], [2 * (k // 2) + 1 for k in pairs],
            [segment if k % 2 == 0 else inverted for k in pairs])


def build_schedule(strategy: Mapping[str, Any], image: torch.Tensor | None = None) -> WeightSchedule:
    """The per-frame schedule of ``strategy`` (see the module docstring), for optional references ``image``."""
    missing = [k for k in STRATEGY_KEYS if k not in strategy]
    if missing:
        raise ValueError(f"weights_strategy is missing {missing}; connect the weights_strategy output of an "
                         f"IPAdapterWeights node")
    segment = segment_weights(strategy)
    image_1 = image_2 = None
    weights = list(segment)
    if image is not None:
        firsts, seconds, per_segment = _segments(image, strategy["method"], segment)
        length = len(segment)
        weights = [w for part in per_segment for w in part]
        image_1 = image[firsts].repeat_interleave(length, 0)
        image_2 = None if seconds is None else image[seconds].repeat_interleave(length, 0)
        head, tail = int(strategy["add_starting_frames"]), int(strategy["add_ending_frames"])
        if head > 0:
            weights = [weights[0]] * head + weights
            image_1 = torch.cat([image[:1].repeat(head, 1, 1, 1), image_1])
            image_2 = None if image_2 is None else torch.cat([image[:1].repeat(head, 1, 1, 1), image_2])
        if tail > 0:
            weights = weights + [weights[-1]] * tail
            image_1 = torch.cat([image_1, image[-1:].repeat(tail, 1, 1, 1)])
            image_2 = None if image_2 is None else torch.cat([image_2, image[-1:].repeat(tail, 1, 1, 1)])
    return WeightSchedule(weights, weights[::-1], len(weights), image_1, image_2)


def prompt_schedule(strategy: Mapping[str, Any], prompt: str) -> str:
    """A batch prompt schedule (``"frame": "prompt",`` lines, FizzNodes style) matching ``strategy``.

    One non-empty prompt line per reference image (the last repeated, extra lines dropped); image ``i``'s
    prompt starts at frame ``i * segment length + add_starting_frames``; with hold frames the first prompt
    also starts at frame 0 and the last one is repeated after the last segment.  Empty without prompts or
    without images in the strategy.
    """
    lines = [line for line in str(prompt).split("\n") if line.strip()]
    count = int(strategy["frame_count"])
    if not lines or count <= 0:
        return ""
    lines = (lines + [lines[-1]] * count)[:count]
    length = len(segment_weights(strategy))
    head, tail = int(strategy["add_starting_frames"]), int(strategy["add_ending_frames"])
    entries = []
    if head > 0:
        entries.append((0, lines[0]))
    entries += [(i * length + head, line) for i, line in enumerate(lines)]
    if tail > 0:
        entries.append((count * length + head, lines[-1]))
    return "".join(f"\"{frame}\": {json.dumps(text, ensure_ascii=False)},\n" for frame, text in entries)


def as_weight_list(value: float | Sequence[float]) -> list[float]:
    """A FLOAT socket value (a number, or a list of per-frame weights) as a list."""
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    return [float(value)]


def combine_weights(first: float | Sequence[float], second: float | Sequence[float]) -> list[float]:
    """Two weight lists (or numbers) joined end to end, as IPAdapterCombineWeights does."""
    return as_weight_list(first) + as_weight_list(second)
