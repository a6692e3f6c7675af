"""The weight types as data: one table of per-block maps, read by ``core.weighting``.

Every entry is keyed by the *pack block index* ``t`` used by ComfyUI_IPAdapter_plus (its
``transformer_index``): one index per attention module (``attentions.K``) of the UNet, counted over the
down blocks, then the middle block, then the up blocks.  SD1.5 has 16 (t 0-5 down, 6 mid, 7-15 up), SDXL 11
(t 0-3 down, 4 mid, 5-10 up; each SDXL index covers all 2 or 10 transformer layers of its module).
``core.weighting`` translates these onto our layer order (down, up, mid last).

A factor is ``(source, multiplier)``: the layer weight is ``multiplier * value(source)`` with the sources

* ``"weight"``: the node's weight ``w``;
* ``"composition"``: the composition weight ``c`` (Style & Composition's ``weight_composition``; 1.0 when a
  "style and composition" type is picked in a plain apply node, as in the pack);
* ``"boost"``: the precise types' boost ``b`` (``style_boost`` / ``composition_boost``; ``w`` when not given).
"""
from __future__ import annotations

from typing import Callable

Factor = tuple[str, float]

W: Factor = ("weight", 1.0)
W_QUARTER: Factor = ("weight", 0.25)
C: Factor = ("composition", 1.0)
C_QUARTER: Factor = ("composition", 0.25)
B: Factor = ("boost", 1.0)
B_QUARTER: Factor = ("boost", 0.25)
B_TENTH: Factor = ("boost", 0.1)

# Pack block indices per family (see the module docstring).
BLOCK_COUNT = {"sd15": 16, "sdxl": 11}

# The composition ("layout") blocks: SDXL t 3 = down_blocks.2.attentions.1 (InstantStyle's layout block);
# SD1.5 t 4, 5 = down_blocks.2.attentions.0 and .1 (input blocks 7 and 8; InstantStyle's SD1.5 layout block
# is down_blocks.2 too).  The precise types swap cond/uncond relative to these blocks.
COMPOSITION_BLOCKS = {"sdxl": frozenset({3}), "sd15": frozenset({4, 5})}


def _each(indices, factor: Factor) -> dict[int, Factor]:
    return {t: factor for t in indices}


def _all_but(family: str, excluded, factor: Factor) -> dict[int, Factor]:
    return {t: factor for t in range(BLOCK_COUNT[family]) if t not in set(excluded)}


# Weight types whose multiplier is a formula of (t, n = block count): the pack's ramps.
RAMPS: dict[str, Callable[[int, int], float]] = {
    "linear": lambda t, n: 1.0,
    "ease in": lambda t, n: 0.05 + 0.95 * (1.0 - t / n),
    "ease out": lambda t, n: 0.05 + 0.95 * (t / n),
    "ease in-out": lambda t, n: 0.05 + 0.95 * (1.0 - abs(t - n / 2) / (n / 2)),
    "reverse in-out": lambda t, n: 0.05 + 0.95 * (abs(t - n / 2) / (n / 2)),
}

# Weight types that scale whole UNet sections ("down" = the pack's input blocks, "up" = output, "mid").
SECTION_FACTORS: dict[str, dict[str, float]] = {
    "weak input": {"down": 0.2},
    "weak output": {"up": 0.2},
    "weak middle": {"mid": 0.2},
    "strong middle": {"down": 0.2, "up": 0.2},
}

# Weight types given as explicit block maps; a block that is absent gets weight 0 (no IP contribution).
BLOCK_MAPS: dict[str, dict[str, dict[int, Factor]]] = {
    "style transfer": {
        "sdxl": {6: W},
        "sd15": {**_each(range(0, 4), W), **_each(range(9, 16), W)},
    },
    "composition": {
        "sdxl": {3: W},
        "sd15": {4: W_QUARTER, 5: W},
    },
    "strong style transfer": {
        "sdxl": _all_but("sdxl", {3}, W),
        "sd15": _all_but("sd15", {4, 5}, W),
    },
    "style and composition": {
        "sdxl": {3: C, 6: W},
        "sd15": {**_each(range(0, 4), W), 4: C_QUARTER, 5: C, **_each(range(9, 16), W)},
    },
    "strong style and composition": {
        "sdxl": {**_all_but("sdxl", {3}, W), 3: C},
        "sd15": {**_all_but("sd15", {4, 5}, W), 4: C, 5: C},
    },
    "style transfer precise": {
        "sdxl": {3: B, 6: W},
        "sd15": {**_each(range(0, 4), W), 4: B_QUARTER, 5: B, **_each(range(9, 16), W)},
    },
    "composition precise": {
        "sdxl": {**_all_but("sdxl", {3, 6}, B_TENTH), 3: W, 6: B},
        "sd15": {**_each(range(0, 4), B), 4: W_QUARTER, 5: W, **_each(range(6, 9), B_TENTH),
                 **_each(range(9, 16), B)},
    },
}

# The precise types move the reference tokens to the uncond branch (and give the cond branch nothing) at
# some blocks: True = at the composition blocks, False = at every block except the composition blocks.
PRECISE_SWAP_AT_COMPOSITION: dict[str, bool] = {
    "style transfer precise": True,
    "composition precise": False,
}
