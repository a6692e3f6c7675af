"""CheckpointLoaderSimple headless: diffusers folders and single-file (LDM layout) checkpoints.

The ``checkpoints`` folder may hold diffusers pipeline folders (a directory with ``model_index.json``,
listed by its folder name) and single files (``.safetensors``/``.ckpt``, the layout people download).
The family (sd15/sdxl) is read from the weights, never from the name; so is an inpainting UNet (its first
convolution takes 9 channels: latent, mask and masked-image latent), for folders and single files alike.
Each checkpoint is loaded once per process (cached by path and modification time).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...core.checkpoint import check_safetensors_file, load_torch_weights
from ...core import folders
from ...core.backends.diffusers import DiffusersModel
from ..handles import TextEncoderHandle, VAEHandle
from ..models import hub_hint

SINGLE_FILE_EXTENSIONS = (".safetensors", ".ckpt", ".sft")
PIPELINE_MARKER = "model_index.json"

# Keys that tell the original (LDM/stability) layouts apart.
_SDXL_KEY_PREFIX = "conditioner.embedders.1."
_SD15_KEY_PREFIX = "cond_stage_model.transformer."
_SD2_KEY_PREFIX = "cond_stage_model.model."
_CONV_IN_KEY = "model.diffusion_model.input_blocks.0.0.weight"  # [320, in_channels, 3, 3]

_CACHE: dict[tuple[str, float], tuple[DiffusersModel, TextEncoderHandle, VAEHandle]] = {}


def list_checkpoints() -> list[str]:
    """Names for the ckpt_name combo: diffusers folders (not their contents) and single checkpoint files."""
    return folders.list_models("checkpoints", lambda path, files: PIPELINE_MARKER in files, SINGLE_FILE_EXTENSIONS)


def family_from_unet_config(config: Any) -> str:
    """'sdxl' for a UNet with SDXL's text-time conditioning or 2048-wide cross-attention, else 'sd15'."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    if get("addition_embed_type") == "text_time" or get("cross_attention_dim") == 2048:
        return "sdxl"
    return "sd15"


def family_from_keys(keys: Any, path: str) -> str:
    """Family of a single-file checkpoint from its key names (the text encoder layout differs)."""
    keys = list(keys)
    if any(k.startswith(_SDXL_KEY_PREFIX) for k in keys):
        return "sdxl"
    if any(k.startswith(_SD15_KEY_PREFIX) for k in keys):
        return "sd15"
    if any(k.startswith(_SD2_KEY_PREFIX) for k in keys):
        raise ValueError(f"CheckpointLoaderSimple: '{path}' is a Stable Diffusion 2.x checkpoint; only SD1.5 "
                         f"and SDXL checkpoints are supported headless")
    raise ValueError(
        f"CheckpointLoaderSimple: '{path}' is not an SD1.5 or SDXL checkpoint in the original layout (expected "
        f"keys starting with '{_SD15_KEY_PREFIX}' or '{_SDXL_KEY_PREFIX}'); UNet-only files belong in "
        f"'diffusion_models' and need a separate CLIP and VAE"
    )


def _load_folder(path: Path, name: str) -> tuple[DiffusersModel, TextEncoderHandle, VAEHandle]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    index = json.loads((path / PIPELINE_MARKER).read_text())
    unet = UNet2DConditionModel.from_pretrained(str(path), subfolder="unet", local_files_only=True)
    family = family_from_unet_config(unet.config)
    if family == "sdxl" or "text_encoder_2" in index:
        family = "sdxl"
    names = [("tokenizer", "text_encoder", CLIPTextModel)]
    if family == "sdxl":
        names.append(("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection))
    tokenizers, encoders = [], []
    for tok_name, enc_name, enc_class in names:
        if not (path / tok_name).is_dir() or not (path / enc_name).is_dir():
            raise FileNotFoundError(
                f"CheckpointLoaderSimple: '{name}' is a {family} diffusers folder but has no '{tok_name}/' "
                f"or '{enc_name}/' sub-folder"
            )
        tokenizers.append(CLIPTokenizer.from_pretrained(str(path / tok_name), local_files_only=True))
        encoders.append(enc_class.from_pretrained(str(path / enc_name), local_files_only=True))
    vae = AutoencoderKL.from_pretrained(str(path), subfolder="vae", local_files_only=True)
    scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    return _assemble(unet, family, scheduler_config, tokenizers, encoders, vae, name)


def _read_keys(path: Path) -> tuple[list[str], int | None]:
    """(key names, input channels of the UNet's first convolution or None) of a single-file checkpoint."""
    if path.suffix.lower() in (".safetensors", ".sft"):
        from safetensors import safe_open

        check_safetensors_file(path, "checkpoint")
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            in_channels = f.get_slice(_CONV_IN_KEY).get_shape()[1] if _CONV_IN_KEY in keys else None
            return keys, in_channels
    data = load_torch_weights(path, "checkpoint")  # weights_only: a pickle that would run code is refused
    if not isinstance(data, dict):
        raise ValueError(f"checkpoint '{path.name}': expected a dictionary of tensors, found {type(data).__name__}")
    data = data.get("state_dict", data)
    conv_in = data.get(_CONV_IN_KEY)
    return list(data.keys()), None if conv_in is None else int(conv_in.shape[1])


def _local_config_for(path: Path) -> Path | None:
    """A diffusers folder named like the file (``x/``) beside ``x.safetensors`` serves as its config."""
    sibling = path.with_suffix("")
    return sibling if (sibling / PIPELINE_MARKER).is_file() else None


def _load_single_file(path: Path, name: str) -> tuple[DiffusersModel, TextEncoderHandle, VAEHandle]:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    keys, in_channels = _read_keys(path)
    family = family_from_keys(keys, name)
    pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    config = _local_config_for(path)
    kwargs: dict[str, Any] = {}
    if config is not None:
        kwargs["config"] = str(config)
        if family == "sdxl":
            kwargs["text_encoder_2"] = _sdxl_second_text_encoder(path, config)
        if in_channels is not None and in_channels != _config_in_channels(config):
            # the weights decide: an inpainting file next to a plain folder (or the reverse) still loads
            from diffusers import UNet2DConditionModel

            kwargs["unet"] = UNet2DConditionModel.from_single_file(
                str(path), config=str(config), subfolder="unet", in_channels=in_channels)
    try:
        pipe = pipeline_class.from_single_file(str(path), **kwargs)
    except (OSError, ValueError) as err:  # the configs of real models come from the Hugging Face Hub
        hint = hub_hint("them")
        raise RuntimeError(
            f"CheckpointLoaderSimple: could not load the single-file {family} checkpoint '{name}': diffusers "
            f"needs the model's configuration files and {hint}. Either connect once so diffusers can cache "
            f"them, or put a diffusers folder named '{path.stem}' (with model_index.json) next to the file. "
            f"Cause: {err}"
        ) from err
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    scheduler_config = dict(pipe.scheduler.config)
    scheduler_config["_class_name"] = type(pipe.scheduler).__name__
    return _assemble(pipe.unet, family, scheduler_config, tokenizers, encoders, pipe.vae, name)


def _config_in_channels(config: Path) -> int:
    return int(json.loads((config / "unet" / "config.json").read_text()).get("in_channels", 4))


def _sdxl_second_text_encoder(path: Path, config: Path):
    """SDXL's OpenCLIP text encoder, converted with diffusers' own helper.

    diffusers tells SDXL's two text encoders apart by their widths; when both have the same width (as in
    the tiny test models) its single-file loader would put the first encoder's weights into the second,
    so the second one is converted explicitly here.
    """
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint, load_single_file_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    model = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(config / "text_encoder_2")))
    checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    state = convert_open_clip_checkpoint(model, checkpoint, prefix="conditioner.embedders.1.model.")
    wrapped = hasattr(model, "text_model")
    state = {(k if wrapped else k.removeprefix("text_model.")): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"CheckpointLoaderSimple: '{path.name}': the SDXL OpenCLIP text encoder does not fit "
                         f"its config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.eval()


def _assemble(unet, family, scheduler_config, tokenizers, encoders, vae, name):
    unet.eval().requires_grad_(False)
    model = DiffusersModel(unet=unet, family=family, scheduler_config=dict(scheduler_config), name=name)
    return model, TextEncoderHandle(family, tokenizers, encoders), VAEHandle(vae)


def load_checkpoint(name: str) -> tuple[DiffusersModel, TextEncoderHandle, VAEHandle]:
    """(MODEL, CLIP, VAE) of the checkpoint ``name`` of the ``checkpoints`` folder; cached per process."""
    path = Path(folders.get_full_path_or_raise("checkpoints", name, node="CheckpointLoaderSimple"))
    stamp = (path / PIPELINE_MARKER) if path.is_dir() else path
    if path.is_dir() and not stamp.is_file():
        raise FileNotFoundError(f"CheckpointLoaderSimple: '{name}' is a folder but not a diffusers pipeline "
                                f"folder (no {PIPELINE_MARKER} in {path})")
    key = (str(path.resolve()), stamp.stat().st_mtime)
    if key not in _CACHE:
        _CACHE[key] = _load_folder(path, name) if path.is_dir() else _load_single_file(path, name)
    return _CACHE[key]


class CheckpointLoaderSimple:
    """Load Checkpoint: MODEL, CLIP and VAE from one checkpoint."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ckpt_name": (list_checkpoints(), {"tooltip": "The name of the checkpoint (model) to load."}),
        }}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    RETURN_NAMES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = ("The model used for denoising latents.",
                       "The CLIP model used for encoding text prompts.",
                       "The VAE model used for encoding and decoding images to and from latent space.")
    FUNCTION = "load_checkpoint"
    CATEGORY = "loaders"
    DESCRIPTION = "Loads a diffusion model checkpoint, diffusion models are used to denoise latents."

    def load_checkpoint(self, ckpt_name: str):
        return load_checkpoint(ckpt_name)


NODE_CLASS_MAPPINGS = {"CheckpointLoaderSimple": CheckpointLoaderSimple}
NODE_DISPLAY_NAME_MAPPINGS = {"CheckpointLoaderSimple": "Load Checkpoint"}
