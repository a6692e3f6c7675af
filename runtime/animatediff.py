"""AnimateDiff headless: motion modules turn the MODEL's UNet into a video UNet the sampler calls per frame.

The sampler knows nothing about video: it denoises a LATENT batch and calls ``model.unet`` like a
``UNet2DConditionModel`` on ``cat([uncond, cond])`` (``n`` chunks of the latent batch).  Here the latent batch
*is* the video: :class:`FrameBatchUNet` (a diffusers ``UNetMotionModel``) takes that ``[n·F, C, H, W]`` call,
runs it as ``n`` videos of ``F`` frames ``[n, C, F, H, W]`` (each CFG chunk its own video, so guidance never
mixes frames of the cond and uncond passes) and returns ``[n·F, C, H, W]``.

How it finds ``n``: the ``batch_chunks`` keyword when the caller passes it; else, while an IP-Adapter patch is
installed, the ``cond_or_uncond`` the sampler gave that patch; else from the call itself — the sampler repeats
the latent once per chunk and gives every row of a chunk the same conditioning, so ``F`` is the longest run
that is both a period of the samples and a block of equal conditioning rows.  (That inference cannot tell
"two identical chunks" from "one video whose halves are equal"; it only matters when the cond and uncond
conditioning are identical and no IP-Adapter is applied.)

The video UNet *shares* the 2D UNet's modules (no copy of the weights) and the motion adapter's motion modules;
module names stay those of the 2D UNet (``down_blocks.0.attentions.0...``) plus ``...motion_modules...``, so
LoRA patches and the IP-Adapter backend (which skips ``motion_modules`` layers) work unchanged.  diffusers'
``UNetMotionModel.from_unet2d`` is used for the configuration only; its weight copy leaves out SDXL's
``add_embedding``, sharing does not.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from ..core import folders
from ..core.backends.diffusers import DiffusersModel, IPCrossAttnProcessor, cross_attention_layers

FOLDER = "animatediff_models"
SINGLE_FILE_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")
# AnimateDiff's fixed settings, for single files (their shapes do not say them); overridable by metadata
SINGLE_FILE_DEFAULTS = {"motion_num_attention_heads": 8, "motion_norm_num_groups": 32}


# ------------------------------------------------------------------------------------------- motion files
def _is_adapter_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("diffusion_pytorch_model*"))


def list_motion_modules() -> list[str]:
    """Names for the motion_module combo: MotionAdapter folders (by folder name) and single files."""
    return folders.list_models(FOLDER, lambda path, files: _is_adapter_folder(path), SINGLE_FILE_EXTENSIONS)


def _read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix.lower() in (".safetensors", ".sft"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
    data = torch.load(str(path), map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}, {}


def single_file_config(state: dict[str, torch.Tensor], metadata: dict[str, str], name: str) -> dict:
    """MotionAdapter config of an original-layout AnimateDiff file, from its shapes (+ heads/groups)."""
    levels = sorted({int(k.split(".")[1]) for k in state if k.startswith("down_blocks.")})
    if not levels or not any(".motion_modules." in k for k in state):
        raise ValueError(f"AnimateDiffLoader: '{name}' is not an AnimateDiff motion module (no "
                         "'down_blocks.N.motion_modules.' keys); put motion modules in the 'animatediff_models' folder")

    def width(prefix: str) -> int:
        return int(state[f"{prefix}.motion_modules.0.temporal_transformer.proj_in.weight"].shape[0])

    layers = len({k.split(".")[3] for k in state if k.startswith("down_blocks.0.motion_modules.")})
    pe = [v for k, v in state.items() if k.endswith("pos_encoder.pe")]
    config = dict(block_out_channels=[width(f"down_blocks.{i}") for i in levels], motion_layers_per_block=layers,
                  motion_max_seq_length=int(pe[0].shape[1]) if pe else 32,
                  use_motion_mid_block=any(k.startswith("mid_block.") for k in state))
    for key, default in SINGLE_FILE_DEFAULTS.items():
        config[key] = int(metadata.get(key, default))
    return config


def _adapter_from_single_file(path: Path):
    from diffusers import MotionAdapter
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    state, metadata = _read_state(path)
    adapter = MotionAdapter(**single_file_config(state, metadata, path.name))
    converted = convert_animatediff_checkpoint_to_diffusers(state)
    missing, unexpected = adapter.load_state_dict(converted, strict=False)
    missing = [k for k in missing if not k.endswith("pos_embed.pe")]  # sinusoidal, rebuilt by the module
    if missing or unexpected:
        raise ValueError(f"AnimateDiffLoader: '{path.name}' does not fit the motion adapter its shapes describe "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]}); is it an SD1.5 AnimateDiff file?")
    return adapter


_ADAPTERS: dict[tuple[str, float], Any] = {}


def load_motion_adapter(name: str):
    """The diffusers MotionAdapter ``name`` of the animatediff_models folder (folder or single file); cached."""
    from diffusers import MotionAdapter

    path = Path(folders.get_full_path_or_raise(FOLDER, name, node="AnimateDiffLoader"))
    stamp = path / "config.json" if path.is_dir() else path
    if path.is_dir() and not _is_adapter_folder(path):
        raise FileNotFoundError(f"AnimateDiffLoader: '{name}' is a folder but not a diffusers MotionAdapter folder "
                                f"(needs config.json and diffusion_pytorch_model.safetensors in {path})")
    key = (str(path.resolve()), stamp.stat().st_mtime)
    if key not in _ADAPTERS:
        if path.is_dir():
            adapter = MotionAdapter.from_pretrained(str(path), local_files_only=True)
        else:
            adapter = _adapter_from_single_file(path)
        _ADAPTERS[key] = adapter.eval().requires_grad_(False)
    return _ADAPTERS[key]


# ------------------------------------------------------------------------------------------- video UNet
@functools.lru_cache(maxsize=None)  # one class, so isinstance checks agree
def _motion_unet_class():
    from diffusers import UNetMotionModel

    class FrameBatchUNet(UNetMotionModel):
        """UNetMotionModel called like a UNet2DConditionModel: the frames are the batch (see the module doc)."""

        is_video_unet = True

        def forward(self, sample, timestep, encoder_hidden_states, *args, batch_chunks: int | None = None,
                    added_cond_kwargs: dict | None = None, return_dict: bool = True, **kwargs):
            if sample.ndim == 5:  # already a video batch: diffusers' own convention
                return super().forward(sample, timestep, encoder_hidden_states, *args,
                                       added_cond_kwargs=added_cond_kwargs, return_dict=return_dict, **kwargs)
            rows = sample.shape[0]
            chunks = batch_chunks or self.ip_chunks() or infer_chunks(sample, encoder_hidden_states, added_cond_kwargs)
            if rows % chunks:
                raise ValueError(f"AnimateDiff: a UNet batch of {rows} latents cannot be split into {chunks} "
                                 "conditioning chunks")
            frames = rows // chunks
            limit = int(self.config.motion_max_seq_length)
            if frames > limit:
                raise ValueError(f"AnimateDiff: {frames} frames but this motion module handles at most {limit}; "
                                 f"use a latent batch of at most {limit} frames")
            video = sample.reshape(chunks, frames, *sample.shape[1:]).permute(0, 2, 1, 3, 4)
            timestep = torch.as_tensor(timestep, device=sample.device)
            if timestep.ndim and timestep.shape[0] == rows:
                timestep = timestep.reshape(chunks, frames)[:, 0]  # one timestep per video
            if encoder_hidden_states.shape[0] == chunks != rows:  # one context per video: one per frame
                encoder_hidden_states = encoder_hidden_states.repeat_interleave(frames, dim=0)
            if added_cond_kwargs:  # SDXL: the model repeats its embedding per frame itself
                added_cond_kwargs = {k: (v.reshape(chunks, frames, *v.shape[1:])[:, 0]
                                         if torch.is_tensor(v) and v.shape[0] == rows else v)
                                     for k, v in added_cond_kwargs.items()}
            out = super().forward(video, timestep, encoder_hidden_states, *args, added_cond_kwargs=added_cond_kwargs,
                                  return_dict=False, **kwargs)[0]
            out = out.permute(0, 2, 1, 3, 4).reshape(rows, *out.shape[1:2], *out.shape[3:])
            return (out,) if not return_dict else _Output(out)

        def ip_chunks(self) -> int | None:
            """The chunk count of the current UNet call from an installed IP-Adapter patch, if any."""
            layers = getattr(self, "_first_cross_attention", None)
            if layers is None:
                layers = self._first_cross_attention = cross_attention_layers(self)[:1]
            for _, module in layers:
                processor = module.processor
                if isinstance(processor, IPCrossAttnProcessor):
                    return len(processor.patch.state.cond_or_uncond) or None
            return None

    return FrameBatchUNet


class _Output:
    def __init__(self, sample: torch.Tensor):
        self.sample = sample

    def __getitem__(self, index: int) -> torch.Tensor:
        return (self.sample,)[index]


def infer_chunks(sample: torch.Tensor, context: torch.Tensor, added: dict | None = None) -> int:
    """Number of conditioning chunks in a sampler's UNet batch (see the module docstring).

    The largest frame count F dividing the batch such that the samples repeat every F rows and the context
    (and SDXL's added conditioning) is constant inside each block of F rows; the result is ``rows // F``.
    """
    rows = sample.shape[0]
    per_row = [context] + [v for v in (added or {}).values() if torch.is_tensor(v) and v.shape[0] == rows]
    for frames in sorted((d for d in range(1, rows + 1) if rows % d == 0), reverse=True):
        blocks = rows // frames
        x = sample.reshape(blocks, frames, -1)
        if not bool((x == x[:1]).all()):
            continue
        if all(bool((t.reshape(blocks, frames, -1) == t.reshape(blocks, frames, -1)[:, :1]).all())
               for t in per_row if t.shape[0] == rows):
            return blocks
    return rows


def make_video_unet(unet: Any, adapter: Any):
    """A FrameBatchUNet sharing ``unet``'s modules and ``adapter``'s motion modules (nothing is copied)."""
    cls = _motion_unet_class()
    with torch.device("meta"):  # the configuration only: every weight is replaced by a shared module below
        video = cls.from_unet2d(unet, motion_adapter=adapter, load_weights=False)
    for name in ("conv_in", "time_proj", "time_embedding", "add_time_proj", "add_embedding", "conv_norm_out",
                 "conv_act", "conv_out"):
        if getattr(unet, name, None) is not None:
            setattr(video, name, getattr(unet, name))
    for ours, theirs, motion in ((video.down_blocks, unet.down_blocks, adapter.down_blocks),
                                 (video.up_blocks, unet.up_blocks, adapter.up_blocks)):
        for block, source, modules in zip(ours, theirs, motion):
            for part in ("resnets", "attentions", "downsamplers", "upsamplers"):
                if getattr(source, part, None) is not None:
                    setattr(block, part, getattr(source, part))
            block.motion_modules = modules.motion_modules
    video.mid_block.resnets = unet.mid_block.resnets
    video.mid_block.attentions = unet.mid_block.attentions
    if hasattr(video.mid_block, "motion_modules"):
        video.mid_block.motion_modules = adapter.mid_block.motion_modules
    left = [n for n, t in list(video.named_parameters()) + list(video.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"AnimateDiff: the video UNet has weights that neither the UNet nor the motion adapter "
                           f"provides: {left[:5]}")
    param, motion = next(unet.parameters()), next(adapter.parameters())
    if (motion.device, motion.dtype) != (param.device, param.dtype):  # a no-op cast still warns in diffusers
        adapter.to(device=param.device, dtype=param.dtype)
    return video.eval().requires_grad_(False)


_VIDEO: dict[tuple[int, int], tuple[Any, Any, Any]] = {}


def animatediff_model(model: DiffusersModel, adapter: Any, name: str = "") -> DiffusersModel:
    """A new MODEL whose UNet is the video UNet of ``model.unet`` + ``adapter`` (built once per pair)."""
    if model.family != "sd15":
        raise ValueError(f"AnimateDiffLoader: model '{model.name}' is {model.family}; only SD1.5 motion modules "
                         "are supported headless")
    if getattr(model.unet, "is_video_unet", False):
        raise ValueError(f"AnimateDiffLoader: model '{model.name}' already has motion modules")
    key = (id(model.unet), id(adapter))
    if key not in _VIDEO:
        try:
            video = make_video_unet(model.unet, adapter)
        except ValueError as err:  # diffusers' block-compatibility checks
            raise ValueError(f"AnimateDiffLoader: motion module '{name}' does not fit model '{model.name}': {err}") from None
        _VIDEO[key] = (model.unet, adapter, video)  # keeps both alive so the ids stay theirs
    return model.replace(unet=_VIDEO[key][2], name=f"{model.name}+{name}" if name else model.name)

