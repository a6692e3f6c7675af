"""Everything `ipadapter demo` needs besides the workflow: tiny models, a tiny adapter, a reference image."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

DEMO_WORKFLOW = Path(__file__).resolve().parent.parent / "workflows" / "demo.json"
DEMO_ADAPTER = "tiny-ip-adapter-plus_sd15.safetensors"
DEMO_REFERENCE = "reference.png"


def default_cache_dir() -> Path:
    """Where the demo keeps its tiny models: $IPADAPTER_TINY_CACHE or ~/.cache/ipadapter_nodes/tiny-models."""
    env = os.environ.get("IPADAPTER_TINY_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ipadapter_nodes" / "tiny-models"


def reference_image(size: int = 256) -> Image.Image:
    """A deterministic, recognisable reference picture: a warm disc on a cool diagonal gradient."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    rgb = np.stack([0.2 + 0.3 * xx, 0.3 + 0.4 * yy, 0.9 - 0.4 * xx], axis=-1)
    disc = ((xx - 0.55) ** 2 + (yy - 0.45) ** 2) < 0.09
    rgb[disc] = (0.95, 0.55, 0.2)
    return Image.fromarray((rgb.clip(0, 1) * 255).round().astype(np.uint8))


def prepare_demo(models_dir: Path, input_dir: Path) -> None:
    """Build the tiny model set and the demo adapter into ``models_dir``; put the reference image in ``input_dir``."""
    from . import tiny, tiny_adapters

    models_dir = Path(models_dir)
    tiny.ensure_tiny_models(models_dir)
    adapter = models_dir / "ipadapter" / DEMO_ADAPTER
    if not adapter.exists():
        adapter.parent.mkdir(parents=True, exist_ok=True)
        tiny_adapters.make_adapter("sd15-plus", adapter, widths="tiny", fmt="safetensors", seed=0)
    input_dir = Path(input_dir)
    input_dir.mkdir(parents=True, exist_ok=True)
    ref = input_dir / DEMO_REFERENCE
    if not ref.exists():
        tmp = ref.with_name(ref.name + ".tmp")
        reference_image().save(tmp, format="PNG")
        os.replace(tmp, ref)
