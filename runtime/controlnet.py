"""ControlNets headless: the CONTROL_NET value, loading it, and the residuals it adds to the UNet.

What follows ComfyUI (``comfy/controlnet.py``, ``nodes.py``): ControlNetApplyAdvanced puts a ``"control"``
entry on every conditioning entry; that entry remembers the ControlNet applied before it, and the residuals
of a chain are summed.  Each link is active while the current sigma lies inside
``[percent_to_sigma(end_percent), percent_to_sigma(start_percent)]``; its hint image is resized to the
latent size x 8 (nearest-exact, centre crop) and its residuals are multiplied by its strength.  The
ControlNet sees the same scaled input ``x / sqrt(sigma² + 1)``, timestep and text context as the UNet
(never the inpainting channels), and SDXL ControlNets also get the UNet's ``added_cond_kwargs``.

The ControlNet's own attention layers are never patched: IP-Adapters only act on the main UNet's attn2.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core import folders
from ..core.backends.diffusers import NoiseSchedule
from .conditioning import resize_center
from .models import hub_hint

FOLDER = "controlnet"
CONFIG_NAME = "config.json"
SINGLE_FILE_EXTENSIONS = (".safetensors", ".sft", ".bin", ".pt", ".pth", ".ckpt")
_CACHE: dict[tuple[str, float], "ControlNetHandle"] = {}


@dataclass(frozen=True, eq=False)
class ControlNetHandle:
    """CONTROL_NET headless: a diffusers ``ControlNetModel`` and the model family it was trained for."""

    model: Any
    family: str
    name: str = ""


@dataclass(frozen=True, eq=False)
class ControlHint:
    """What ControlNetApplyAdvanced stores under ``"control"``: one link of a chain of ControlNets.

    ``image`` is the hint IMAGE ``[B,H,W,C]`` (0..1, as the node got it); ``previous`` is the control that
    was on the conditioning entry before (its residuals are added to this one's)."""

    controlnet: ControlNetHandle
    image: torch.Tensor
    strength: float
    start_percent: float = 0.0
    end_percent: float = 1.0
    previous: "ControlHint | None" = None

    def chain(self) -> list["ControlHint"]:
        """Every link, the first applied first."""
        links, link = [], self
        while link is not None:
            links.append(link)
            link = link.previous
        return links[::-1]


# ------------------------------------------------------------------------------------------------ loading
def family_from_config(config: Any) -> str:
    """'sdxl' for a ControlNet with SDXL's text-time conditioning or 2048-wide cross-attention, else 'sd15'."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    if get("addition_embed_type") == "text_time" or get("cross_attention_dim") == 2048:
        return "sdxl"
    return "sd15"


def list_controlnets() -> list[str]:
    """Names for the control_net_name combo: diffusers ControlNet folders (by folder name) and single files."""
    return folders.list_models(FOLDER, lambda path, files: CONFIG_NAME in files, SINGLE_FILE_EXTENSIONS)


def _load_folder(path: Path, name: str):
    import json

    from diffusers import ControlNetModel

    class_name = json.loads((path / CONFIG_NAME).read_text()).get("_class_name")
    if class_name not in (None, "ControlNetModel"):
        raise ValueError(f"ControlNetLoader: '{name}' is a diffusers {class_name} folder; only ControlNetModel "
                         "folders (SD1.5/SDXL ControlNets) are supported headless")
    return ControlNetModel.from_pretrained(str(path), local_files_only=True)


def _load_single_file(path: Path, name: str):
    from diffusers import ControlNetModel

    sibling = path.with_suffix("")
    kwargs = {"config": str(sibling)} if (sibling / CONFIG_NAME).is_file() else {}
    try:
        return ControlNetModel.from_single_file(str(path), **kwargs)
    except (OSError, ValueError) as err:  # without a local config diffusers fetches one from the Hub
        hint = hub_hint("it")
        raise RuntimeError(
            f"ControlNetLoader: could not load the single-file ControlNet '{name}': diffusers needs the "
            f"ControlNet's configuration and {hint}. Connect once so diffusers can cache it, or put a diffusers "
            f"ControlNet folder named '{path.stem}' (with {CONFIG_NAME}) next to the file. Cause: {err}"
        ) from err


def load_controlnet(name: str) -> ControlNetHandle:
    """The CONTROL_NET ``name`` of the ``controlnet`` folder (diffusers folder or single file); cached."""
    path = Path(folders.get_full_path_or_raise(FOLDER, name, node="ControlNetLoader"))
    stamp = path / CONFIG_NAME if path.is_dir() else path
    if path.is_dir() and not stamp.is_file():
        raise FileNotFoundError(f"ControlNetLoader: '{name}' is a folder but not a diffusers ControlNet folder "
                                f"(no {CONFIG_NAME} in {path})")
    key = (str(path.resolve()), stamp.stat().st_mtime)
    if key not in _CACHE:
        model = _load_folder(path, name) if path.is_dir() else _load_single_file(path, name)
        model.eval().requires_grad_(False)
        _CACHE[key] = ControlNetHandle(model, family_from_config(model.config), name)
    return _CACHE[key]


# ------------------------------------------------------------------------------------------------ hints
def resize_hint(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """IMAGE ``[B,H,W,C]`` → ``[B,C,height,width]``: centre-crop to the target aspect, then nearest-exact
    (ComfyUI's ``common_upscale(..., "nearest-exact", "center")``)."""
    hint = image.movedim(-1, 1)
    if tuple(hint.shape[-2:]) == (height, width):  # nearest-exact at the same size is the identity
        return hint
    return resize_center(hint, height, width, mode="nearest-exact")


def _to_batch(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    if tensor.shape[0] != batch:
        tensor = tensor.repeat(-(-batch // tensor.shape[0]), *[1] * (tensor.ndim - 1))[:batch]
    return tensor


# ------------------------------------------------------------------------------------------- during sampling
@dataclass
class ControlRun:
    """One chain of ControlNets during one sampling call: sigma windows, hint cache, residuals."""

    hint: ControlHint
    schedule: NoiseSchedule
    family: str
    windows: list[tuple[float, float]] = field(init=False)
    _hints: dict = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        links = self.hint.chain()
        for link in links:
            if link.controlnet.family != self.family:
                raise ValueError(
                    f"KSampler: ControlNet '{link.controlnet.name}' (from ControlNetApplyAdvanced) was made for "
                    f"{link.controlnet.family} but the model is {self.family}; load a ControlNet made for "
                    f"{self.family} checkpoints")
        self.windows = [(self.schedule.percent_to_sigma(l.start_percent), self.schedule.percent_to_sigma(l.end_percent))
                        for l in links]

    def _hint_for(self, link: ControlHint, height: int, width: int, device, dtype) -> torch.Tensor:
        key = (id(link), height, width)
        if key not in self._hints:
            self._hints[key] = resize_hint(link.image.to(torch.float32), height, width)[:, :3].to(device, dtype)
        return self._hints[key]

    def residuals(self, x_in: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, added: dict | None,
                  sigma: float, chunks: int) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        """Summed ``(down residuals, mid residual)`` of the active links for a UNet batch of ``chunks``
        equal chunks, or None when no link is active at ``sigma``."""
        down, mid = None, None
        for link, (start, end) in zip(self.hint.chain(), self.windows):
            if sigma > start or sigma < end:
                continue
            module = link.controlnet.model
            param = next(module.parameters())
            if param.device != x_in.device or param.dtype != x_in.dtype:
                module.to(x_in.device, x_in.dtype)
            hint = self._hint_for(link, x_in.shape[-2] * 8, x_in.shape[-1] * 8, x_in.device, x_in.dtype)
            hint = _to_batch(hint, x_in.shape[0] // chunks).repeat(chunks, 1, 1, 1)
            kwargs = {"added_cond_kwargs": added} if added is not None else {}
            d, m = module(x_in, timestep, encoder_hidden_states=context, controlnet_cond=hint,
                          conditioning_scale=float(link.strength), return_dict=False, **kwargs)
            down = list(d) if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        return None if down is None else (down, mid)
