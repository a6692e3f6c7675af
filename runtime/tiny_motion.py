"""A deterministic tiny AnimateDiff motion module for the tiny SD1.5 model (tests and the demo).

``ensure_tiny_motion(models_dir)`` writes ``animatediff_models/tiny-motion-sd15/`` (a diffusers MotionAdapter
folder) and ``animatediff_models/tiny-motion-sd15.safetensors`` (the same weights in the original AnimateDiff
key layout, as ``mm_sd_v15_v2.ckpt`` has them), once; a version stamp inside the folder marks a finished build.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .tiny import TINY_SD15, _seeded

TINY_MOTION_VERSION = "1"
TINY_MOTION_SEED = 4101
TINY_MOTION = dict(
    block_out_channels=TINY_SD15["block_out_channels"],
    motion_layers_per_block=TINY_SD15["layers_per_block"],
    motion_num_attention_heads=8,       # AnimateDiff's value; single files are read with it
    motion_norm_num_groups=32,          # AnimateDiff's value (the tiny widths are multiples of 32)
    motion_max_seq_length=32,
    use_motion_mid_block=True,
)
FOLDER = "animatediff_models"
NAME = "tiny-motion-sd15"
STAMP = ".tiny-motion-version"


def build_motion_adapter():
    """The tiny MotionAdapter, seeded. Its output projections are random (AnimateDiff zero-initialises them
    before training), so frames really influence each other."""
    from diffusers import MotionAdapter

    return _seeded(TINY_MOTION_SEED, lambda: MotionAdapter(**TINY_MOTION))


def original_layout(state: dict) -> dict:
    """diffusers MotionAdapter keys → the original AnimateDiff checkpoint keys (inverse of diffusers' converter)."""
    out = {}
    for key, value in state.items():
        head, sep, rest = key.partition(".motion_modules.")
        index, _, tail = rest.partition(".")
        base = f"{head}{sep}{index}.temporal_transformer."
        if tail.endswith(".pos_embed.pe"):  # the original keeps the sinusoidal table on each attention block
            block = tail[: -len(".pos_embed.pe")]
            for attention in (0, 1):
                out[f"{base}{block}.attention_blocks.{attention}.pos_encoder.pe"] = value.clone()
            continue
        tail = (tail.replace("norm1", "norms.0").replace("norm2", "norms.1").replace("norm3", "ff_norm")
                .replace("attn1", "attention_blocks.0").replace("attn2", "attention_blocks.1"))
        out[base + tail] = value
    return out


def ensure_tiny_motion(models_dir: str | os.PathLike) -> dict[str, Path]:
    """Write the tiny motion module (folder + single file) into ``models_dir/animatediff_models``."""
    from safetensors.torch import save_file

    root = Path(models_dir).resolve() / FOLDER
    folder, single = root / NAME, root / f"{NAME}.safetensors"
    result = {NAME: folder, f"{NAME}.safetensors": single}
    if (folder / STAMP).is_file() and (folder / STAMP).read_text() == TINY_MOTION_VERSION and single.is_file():
        return result
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-motion-", dir=root))
    try:
        adapter = build_motion_adapter()
        adapter.save_pretrained(str(staging / NAME), safe_serialization=True)
        state = {k: v.detach().contiguous() for k, v in adapter.state_dict().items()}
        save_file(original_layout(state), str(staging / single.name), metadata={"format": "pt"})
        (staging / NAME / STAMP).write_text(TINY_MOTION_VERSION)
        for target in (folder, single):
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        os.replace(staging / single.name, single)
        os.replace(staging / NAME, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result
