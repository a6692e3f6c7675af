"""Shared fixtures: the tiny model set is built once per test session into a cached folder."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

# The tiny models are far too small for intra-op threads to pay off; on a busy 2-core machine they cost
# more in contention than they gain.
torch.set_num_threads(1)

# Tests never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
TINY_CACHE = Path(os.environ.get("IPADAPTER_TINY_CACHE", REPO / ".cache" / "tiny-models"))


@pytest.fixture(scope="session")
def tiny_models_dir() -> Path:
    """A ComfyUI-layout models folder holding the tiny models (built once, reused across runs)."""
    from ipadapter_nodes.runtime import tiny

    tiny.ensure_tiny_models(TINY_CACHE)
    return TINY_CACHE


@pytest.fixture(scope="session")
def tiny_faces_dir(tiny_models_dir) -> Path:
    """The tiny InsightFace packs (buffalo_l, antelopev2) inside the tiny models folder."""
    from tiny_faces import ensure_tiny_faces

    return ensure_tiny_faces(tiny_models_dir)


@pytest.fixture(scope="module")
def tiny_folders(tiny_models_dir):
    """Folders point at the tiny model set for one test module (``pytestmark = usefixtures("tiny_folders")``)."""
    from ipadapter_nodes.core import folders

    previous = folders._provider
    folders.configure(folders.FolderLayout(models_dirs=[str(tiny_models_dir)]))
    yield tiny_models_dir
    folders._provider = previous


@pytest.fixture
def dirs(tmp_path):
    """Empty models/input/output/temp folders under ``tmp_path``, installed as the folder layout."""
    from ipadapter_nodes.core import folders

    layout = folders.FolderLayout(models_dirs=[str(tmp_path / "models")], input_dir=str(tmp_path / "input"),
                                  output_dir=str(tmp_path / "output"), temp_dir=str(tmp_path / "temp"))
    for d in (layout.input_dir, layout.output_dir, layout.temp_dir):
        os.makedirs(d)
    saved = folders._provider
    folders.configure(layout)
    yield layout
    folders._provider = saved


@pytest.fixture(scope="module")
def unets():
    """Seeded tiny SD1.5- and SDXL-topology UNets built in memory (no files): {"sd15": ..., "sdxl": ...}."""
    from ipadapter_nodes.runtime import tiny

    def seeded(seed, build):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build().eval()

    return {"sd15": seeded(1, tiny.build_sd15_unet), "sdxl": seeded(2, tiny.build_sdxl_unet)}


@contextlib.contextmanager
def installed_folders(root: Path, *models_dirs: Path):
    """Install a folder layout with ``models_dirs`` and ``root``/input, output, temp; restore the previous one."""
    from ipadapter_nodes.core import folders

    previous = folders.provider()
    folders.configure(folders.FolderLayout(models_dirs=[str(d) for d in models_dirs],
                                           input_dir=str(root / "input"), output_dir=str(root / "output"),
                                           temp_dir=str(root / "temp")))
    try:
        yield
    finally:
        folders.configure(previous)
