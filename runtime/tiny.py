"""Deterministic tiny models with the real block topology, for the demo and the tests.

The widths below are the contract shared by the tiny checkpoints, the tiny image encoders and the tiny
IP-Adapter files (``runtime/tiny_adapters.py``): a tiny adapter made for ``sd15`` must fit the tiny SD1.5
UNet and the tiny encoder it names, exactly like a real one fits the real models.

Real → tiny widths:
  SD1.5 cross-attention 768 → 32; SDXL 2048 → 64 (two text encoders of 32)
  CLIP ViT-H/14: hidden 1280 → 48, image_embeds 1024 → 32
  CLIP ViT-bigG/14: hidden 1664 → 64, image_embeds 1280 → 40
  Face embedding (insightface): 512 stays 512
Token counts (4, 16, 257, ...) and image size (224 px → 257 tokens) stay real.  The tokenizer is in
``runtime/tiny_tokenizer.py``.
"""
from __future__ import annotations

TINY_SD15 = dict(
    cross_attention_dim=32,
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=2,
    attention_head_dim=4,        # diffusers' legacy name: number of heads, as in the SD1.5 config
    norm_num_groups=16,
    text_hidden=32,
)
TINY_SDXL = dict(
    cross_attention_dim=64,
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(2, 4, 4),
    norm_num_groups=16,
    addition_time_embed_dim=8,
    text_hidden=(32, 32),        # text_encoder (CLIPTextModel), text_encoder_2 (with projection)
    pooled_dim=32,               # text_encoder_2 projection_dim
)
TINY_CLIP_VISION = {
    # name: (hidden_size, projection_dim) — tiny stand-ins for ViT-H/14 and ViT-bigG/14
    "vit-h": dict(hidden_size=48, projection_dim=32, num_hidden_layers=3, num_attention_heads=4,
                  intermediate_size=96, image_size=224, patch_size=14),
    "vit-bigG": dict(hidden_size=64, projection_dim=40, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=128, image_size=224, patch_size=14),
}

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .ldm_convert import write_ldm_checkpoint
from .tiny_tokenizer import TINY_VOCAB_SIZE, make_tokenizer, tiny_vocab, write_vocab_files

__all__ = [
    "TINY_SD15", "TINY_SDXL", "TINY_CLIP_VISION", "TINY_VAE", "TINY_TEXT", "TINY_CONTROLNET_HINT_CHANNELS",
    "TINY_PATHS", "TINY_VERSION", "STAMP_NAME", "CLIP_MEAN", "CLIP_STD", "SD15_SCHEDULER", "SDXL_SCHEDULER",
    "SEEDS", "build_sd15_unet", "build_sdxl_unet", "build_sd15_controlnet", "build_sdxl_controlnet",
    "build_clip_vision",
    "ensure_tiny_models",
    # re-exported from runtime.tiny_tokenizer, where they live
    "TINY_VOCAB_SIZE", "make_tokenizer", "tiny_vocab",
]

# Bump when anything below changes what is written; a models folder with another stamp is rebuilt.
TINY_VERSION = "4"
STAMP_NAME = ".tiny-models-version"

# The tiny VAE is not part of the shared contract: only its downscale factor (8) and 4 latent channels are.
TINY_VAE = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4)
TINY_TEXT = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=77)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# The noise schedules SD1.5 and SDXL were trained with (diffusers scheduler configs of the official repos).
SD15_SCHEDULER = dict(
    _class_name="PNDMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", trained_betas=None, skip_prk_steps=True, set_alpha_to_one=False,
    prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, clip_sample=False,
)
SDXL_SCHEDULER = dict(
    _class_name="EulerDiscreteScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", trained_betas=None, interpolation_type="linear", prediction_type="epsilon",
    sample_max_value=1.0, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
    timestep_spacing="leading", use_karras_sigmas=False, clip_sample=False,
)

# Fixed seeds, one per model, so each model's weights do not depend on what else is built.
SEEDS = dict(sd15_unet=1501, sd15_vae=1502, sd15_text=1503, sdxl_unet=2101, sdxl_vae=2102, sdxl_text=2103,
             sdxl_text_2=2104, vit_h=3101, vit_bigG=3102, sd15_inpaint_unet=1504, controlnet_sd15=1505,
             controlnet_sdxl=2105)
# The ControlNet's hint encoder: 4 levels like the real (16, 32, 96, 256), so the original layout's
# input_hint_block numbering (0, 2, ..., 12, 14) holds.
TINY_CONTROLNET_HINT_CHANNELS = (8, 8, 16, 16)

# name -> path relative to the models folder (what ensure_tiny_models returns)
TINY_PATHS = {
    "tiny-sd15": "checkpoints/tiny-sd15",
    "tiny-sdxl": "checkpoints/tiny-sdxl",
    "tiny-sd15.safetensors": "checkpoints/tiny-sd15.safetensors",
    "tiny-sdxl.safetensors": "checkpoints/tiny-sdxl.safetensors",
    "tiny-sd15-inpaint": "checkpoints/tiny-sd15-inpaint",                    # 9-channel inpainting UNet
    "tiny-sd15-inpaint.safetensors": "checkpoints/tiny-sd15-inpaint.safetensors",
    "tiny-controlnet-sd15": "controlnet/tiny-controlnet-sd15",                # diffusers ControlNetModel
    "tiny-controlnet-sd15.safetensors": "controlnet/tiny-controlnet-sd15.safetensors",  # original layout
    "tiny-controlnet-sdxl": "controlnet/tiny-controlnet-sdxl",                # diffusers ControlNetModel
    "tiny-vit-h": "clip_vision/tiny-vit-h",
    "tiny-vit-bigG": "clip_vision/tiny-vit-bigG",
    "tiny-vit-h.safetensors": "clip_vision/tiny-vit-h.safetensors",
    "tiny-vit-bigG.safetensors": "clip_vision/tiny-vit-bigG.safetensors",
}


# ---------------------------------------------------------------------------------------------------------
# Model builders
# ---------------------------------------------------------------------------------------------------------

def _text_config(hidden: int, projection_dim: int | None = None, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig

    vocab, _ = tiny_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, hidden_act=act, projection_dim=projection_dim or hidden,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"], **TINY_TEXT,
    )


def _vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    n = len(TINY_VAE["block_out_channels"])
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, scaling_factor=scaling_factor, sample_size=64, **TINY_VAE,
    )


def build_sd15_unet(in_channels: int = 4):
    """UNet2DConditionModel with SD1.5's block topology (16 attn2 layers) and the TINY_SD15 widths
    (``in_channels`` 9: an inpainting UNet, latent + mask + masked image latent)."""
    from diffusers import UNet2DConditionModel

    t = TINY_SD15
    return UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=t["block_out_channels"], layers_per_block=t["layers_per_block"],
        cross_attention_dim=t["cross_attention_dim"], attention_head_dim=t["attention_head_dim"],
        norm_num_groups=t["norm_num_groups"],
    )


def build_sdxl_unet():
    """UNet2DConditionModel with SDXL's block topology (depths 0/2/10, 70 attn2 layers), TINY_SDXL widths."""
    from diffusers import UNet2DConditionModel

    t = TINY_SDXL
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=t["block_out_channels"], layers_per_block=t["layers_per_block"],
        transformer_layers_per_block=t["transformer_layers_per_block"],
        cross_attention_dim=t["cross_attention_dim"], attention_head_dim=t["attention_head_dim"],
        norm_num_groups=t["norm_num_groups"], use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=t["addition_time_embed_dim"],
        projection_class_embeddings_input_dim=t["pooled_dim"] + 6 * t["addition_time_embed_dim"],
    )


def _seeded(seed: int, make: Callable):
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def _scheduler(config: dict):
    import diffusers

    cfg = {k: v for k, v in config.items() if k != "_class_name"}
    return getattr(diffusers, config["_class_name"]).from_config(cfg)


def _write_sd15(folder: Path, inpaint: bool = False) -> None:
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from transformers import CLIPTextModel

    # The inpainting checkpoint shares the VAE and text encoder of tiny-sd15 (same seeds), like the real ones.
    unet = (_seeded(SEEDS["sd15_inpaint_unet"], lambda: build_sd15_unet(9)) if inpaint
            else _seeded(SEEDS["sd15_unet"], build_sd15_unet))
    pipe = (StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline)(
        unet=unet,
        vae=_seeded(SEEDS["sd15_vae"], lambda: _vae(0.18215)),
        text_encoder=_seeded(SEEDS["sd15_text"], lambda: CLIPTextModel(_text_config(TINY_SD15["text_hidden"]))),
        tokenizer=make_tokenizer("<|endoftext|>"),
        scheduler=_scheduler(SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    write_vocab_files(folder / "tokenizer")


def _write_sdxl(folder: Path) -> None:
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    t = TINY_SDXL
    h1, h2 = t["text_hidden"]
    pipe = StableDiffusionXLPipeline(
        unet=_seeded(SEEDS["sdxl_unet"], build_sdxl_unet),
        vae=_seeded(SEEDS["sdxl_vae"], lambda: _vae(0.13025)),
        text_encoder=_seeded(SEEDS["sdxl_text"], lambda: CLIPTextModel(_text_config(h1))),
        text_encoder_2=_seeded(SEEDS["sdxl_text_2"], lambda: CLIPTextModelWithProjection(
            _text_config(h2, projection_dim=t["pooled_dim"], act="gelu"))),
        tokenizer=make_tokenizer("<|endoftext|>"),
        tokenizer_2=make_tokenizer("!"),
        scheduler=_scheduler(SDXL_SCHEDULER),
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        write_vocab_files(folder / name)


def _controlnet_from(unet, seed: int):
    """ControlNetModel made from ``unet`` (as real ControlNets start from their UNet's weights); the layers
    diffusers starts at zero (hint output, zero convs) get small weights drawn from ``seed`` so it acts."""
    import torch
    from diffusers import ControlNetModel

    # the hint encoder is not in the UNet: its initial weights come from the global generator, so seed it
    model = _seeded(seed, lambda: ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=TINY_CONTROLNET_HINT_CHANNELS))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("controlnet_down_blocks.", "controlnet_mid_block.",
                                "controlnet_cond_embedding.conv_out.")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval()


def build_sd15_controlnet():
    """ControlNetModel made from the tiny SD1.5 UNet, its zero-initialised layers given seeded weights."""
    return _controlnet_from(_seeded(SEEDS["sd15_unet"], build_sd15_unet), SEEDS["controlnet_sd15"])


def build_sdxl_controlnet():
    """ControlNetModel made from the tiny SDXL UNet (text-time conditioning, depths 0/2/10), its
    zero-initialised layers given seeded weights."""
    return _controlnet_from(_seeded(SEEDS["sdxl_unet"], build_sdxl_unet), SEEDS["controlnet_sdxl"])


def _write_controlnet(folder: Path, single_file: Path | None = None, build: Callable = build_sd15_controlnet) -> None:
    """The ControlNet ``build()`` makes, as a diffusers folder and (when ``single_file`` is given) as one
    file in the original (``control_model.*``) layout."""
    from safetensors.torch import save_file

    from .ldm_convert import controlnet_to_ldm

    model = build()
    model.save_pretrained(str(folder), safe_serialization=True)
    if single_file is None:
        return
    state = controlnet_to_ldm(model.state_dict(), model.config, len(model.controlnet_down_blocks))
    save_file({k: v.contiguous() for k, v in state.items()}, str(single_file), metadata={"format": "pt"})


def build_clip_vision(name: str):
    """CLIPVisionModelWithProjection with the TINY_CLIP_VISION widths of ``name`` ("vit-h" or "vit-bigG")."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    act = "gelu"  # OpenCLIP ViT-H/bigG use GELU
    return CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_act=act, **TINY_CLIP_VISION[name]))


def _preprocessor_config(image_size: int) -> dict:
    # CLIPImageProcessor settings of the real ViT-H/bigG encoders: shortest side → 224 (bicubic), centre crop.
    return {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD, "do_convert_rgb": True,
    }


def _write_clip_vision(folder: Path, single_file: Path, name: str, seed: int) -> None:
    from safetensors.torch import save_file

    model = _seeded(seed, lambda: build_clip_vision(name))
    model.save_pretrained(str(folder), safe_serialization=True)
    size = TINY_CLIP_VISION[name]["image_size"]
    (folder / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(size), indent=2) + "\n")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # Heads and activation cannot be read from shapes: say them in the metadata, as a careful exporter would.
    spec = TINY_CLIP_VISION[name]
    save_file(state, str(single_file), metadata={"format": "pt", "num_attention_heads": str(spec["num_attention_heads"]),
                                                 "hidden_act": "gelu"})


# ---------------------------------------------------------------------------------------------------------
# The model set on disk
# ---------------------------------------------------------------------------------------------------------

def _stamp_text() -> str:
    return json.dumps({"version": TINY_VERSION, "paths": TINY_PATHS}, sort_keys=True)


def _is_current(models_dir: Path) -> bool:
    stamp = models_dir / STAMP_NAME
    if not stamp.is_file() or stamp.read_text() != _stamp_text():
        return False
    return all((models_dir / rel).exists() for rel in TINY_PATHS.values())


@contextlib.contextmanager
def _build_lock(models_dir: Path) -> Iterator[None]:
    """Serialise builds of one models folder between processes (tests may run in parallel)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; the stamp check still avoids most rebuilds
        yield
        return
    with open(models_dir / ".tiny-models.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_all(root: Path) -> None:
    """Write every tiny model under ``root`` (a fresh, empty folder)."""
    (root / "checkpoints").mkdir(parents=True)
    (root / "clip_vision").mkdir(parents=True)
    (root / "controlnet").mkdir(parents=True)
    _write_sd15(root / TINY_PATHS["tiny-sd15"])
    _write_sdxl(root / TINY_PATHS["tiny-sdxl"])
    _write_sd15(root / TINY_PATHS["tiny-sd15-inpaint"], inpaint=True)
    for name in ("tiny-sd15", "tiny-sdxl", "tiny-sd15-inpaint"):
        write_ldm_checkpoint(root / TINY_PATHS[name], root / TINY_PATHS[name + ".safetensors"])
    _write_controlnet(root / TINY_PATHS["tiny-controlnet-sd15"], root / TINY_PATHS["tiny-controlnet-sd15.safetensors"])
    _write_controlnet(root / TINY_PATHS["tiny-controlnet-sdxl"], build=build_sdxl_controlnet)
    _write_clip_vision(root / TINY_PATHS["tiny-vit-h"], root / TINY_PATHS["tiny-vit-h.safetensors"],
                       "vit-h", SEEDS["vit_h"])
    _write_clip_vision(root / TINY_PATHS["tiny-vit-bigG"], root / TINY_PATHS["tiny-vit-bigG.safetensors"],
                       "vit-bigG", SEEDS["vit_bigG"])


def ensure_tiny_models(models_dir: str | os.PathLike) -> dict[str, Path]:
    """Build the tiny model set into ``models_dir`` (ComfyUI layout) unless it is already there.

    Everything is written into a temporary folder inside ``models_dir`` first and moved into place only
    when complete; the version stamp is written last, so an interrupted build is redone on the next call.
    Returns name -> absolute path (keys of :data:`TINY_PATHS`).
    """
    models_dir = Path(models_dir).resolve()
    models_dir.mkdir(parents=True, exist_ok=True)
    result = {name: models_dir / rel for name, rel in TINY_PATHS.items()}
    if _is_current(models_dir):
        return result
    with _build_lock(models_dir):
        if _is_current(models_dir):  # another process finished the build while we waited
            return result
        (models_dir / STAMP_NAME).unlink(missing_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=models_dir))
        try:
            _build_all(staging)
            for rel in TINY_PATHS.values():
                target = models_dir / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
                os.replace(staging / rel, target)
            (models_dir / STAMP_NAME).write_text(_stamp_text())
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return result
