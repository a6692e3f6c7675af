"""The tiny model set: deterministic, structure-faithful (SD1.5 / SDXL topology, 257-token CLIP vision)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ipadapter_nodes.runtime import tiny


def _files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*")
            if p.is_file() and not p.name.startswith(".")}


def _attn2_blocks(unet) -> list[str]:
    """The block kind (down/up/mid) of every cross-attention processor, in the UNet's processor order."""
    return [name.split("_")[0] for name in unet.attn_processors if name.endswith("attn2.processor")]


@pytest.fixture(scope="module")
def sd15_unet(tiny_models_dir):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(tiny_models_dir / "checkpoints/tiny-sd15"), subfolder="unet")


@pytest.fixture(scope="module")
def sdxl_unet(tiny_models_dir):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(tiny_models_dir / "checkpoints/tiny-sdxl"), subfolder="unet")


def test_two_builds_write_identical_weights_and_configs(tiny_models_dir, tmp_path):
    paths = tiny.ensure_tiny_models(tmp_path / "models")
    assert set(paths) == set(tiny.TINY_PATHS) and all(p.exists() for p in paths.values())
    fresh = _files(tmp_path / "models")
    assert len(fresh) >= 40  # every weight, config and tokenizer file of the six models
    for rel, path in fresh.items():
        earlier = tiny_models_dir / rel
        if rel.endswith(".safetensors"):
            a, b = load_file(str(earlier)), load_file(str(path))
            assert a.keys() == b.keys(), rel
            assert all(torch.equal(a[k], b[k]) for k in a), rel
        else:
            assert earlier.read_bytes() == path.read_bytes(), rel


def test_existing_current_set_is_not_rebuilt(tiny_models_dir):
    weights = tiny_models_dir / "checkpoints/tiny-sd15/unet/diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    tiny.ensure_tiny_models(tiny_models_dir)
    assert weights.stat().st_mtime_ns == before


def test_interrupted_build_leaves_nothing_half_written(tmp_path, monkeypatch):
    def fail(folder):
        raise KeyboardInterrupt("interrupted")

    monkeypatch.setattr(tiny, "_write_sdxl", fail)
    with pytest.raises(KeyboardInterrupt):
        tiny.ensure_tiny_models(tmp_path)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != ".tiny-models.lock"]
    assert leftovers == []


def test_sd15_unet_has_16_cross_attention_layers_in_order_down_up_mid(sd15_unet):
    blocks = _attn2_blocks(sd15_unet)
    assert blocks == ["down"] * 6 + ["up"] * 9 + ["mid"]
    assert sd15_unet.config.cross_attention_dim == tiny.TINY_SD15["cross_attention_dim"]
    assert list(sd15_unet.config.block_out_channels) == list(tiny.TINY_SD15["block_out_channels"])


def test_sdxl_unet_has_70_cross_attention_layers_in_order_down_up_mid(sdxl_unet):
    blocks = _attn2_blocks(sdxl_unet)
    # down: 2 blocks x (2, 10) transformer layers; up: 3 x (10, 2); mid: 10
    assert blocks == ["down"] * 24 + ["up"] * 36 + ["mid"] * 10
    cfg = sdxl_unet.config
    assert cfg.addition_embed_type == "text_time" and cfg.use_linear_projection is True
    assert cfg.cross_attention_dim == 64
    assert cfg.projection_class_embeddings_input_dim == 32 + 6 * 8


def test_sdxl_unet_runs_with_text_time_conditioning(sdxl_unet):
    with torch.no_grad():
        out = sdxl_unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 77, 64),
                        added_cond_kwargs={"text_embeds": torch.randn(1, 32),
                                           "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}).sample
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["vit-h", "vit-bigG"])
def test_clip_vision_yields_257_tokens_at_224_px(tiny_models_dir, name):
    from transformers import CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(str(tiny_models_dir / f"clip_vision/tiny-{name}"))
    widths = tiny.TINY_CLIP_VISION[name]
    with torch.no_grad():
        out = model(pixel_values=torch.randn(1, 3, 224, 224), output_hidden_states=True)
    assert out.last_hidden_state.shape == (1, 257, widths["hidden_size"])
    assert out.image_embeds.shape == (1, widths["projection_dim"])
    assert out.hidden_states[-2].shape == (1, 257, widths["hidden_size"])


@pytest.mark.parametrize("name", ["vit-h", "vit-bigG"])
def test_clip_vision_single_file_holds_the_folder_weights(tiny_models_dir, name):
    single = load_file(str(tiny_models_dir / f"clip_vision/tiny-{name}.safetensors"))
    folder = load_file(str(tiny_models_dir / f"clip_vision/tiny-{name}/model.safetensors"))
    assert single.keys() == folder.keys()
    assert all(torch.equal(single[k], folder[k]) for k in single)
    assert "vision_model.embeddings.patch_embedding.weight" in single and "visual_projection.weight" in single


def test_clip_vision_preprocessor_is_clip_224_bicubic(tiny_models_dir):
    config = json.loads((tiny_models_dir / "clip_vision/tiny-vit-h/preprocessor_config.json").read_text())
    assert config["size"] == {"shortest_edge": 224} and config["crop_size"] == {"height": 224, "width": 224}
    assert config["image_mean"] == [0.48145466, 0.4578275, 0.40821073]
    assert config["image_std"] == [0.26862954, 0.26130258, 0.27577711]
    assert config["resample"] == 3  # bicubic


@pytest.mark.parametrize("family, subfolder, pad", [("sd15", "tokenizer", "<|endoftext|>"),
                                                     ("sdxl", "tokenizer", "<|endoftext|>"),
                                                     ("sdxl", "tokenizer_2", "!")])
def test_tokenizer_round_trips_ascii_and_pads_like_sd(tiny_models_dir, family, subfolder, pad):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tiny_models_dir / f"checkpoints/tiny-{family}/{subfolder}"))
    text = "a photo of the cat sitting on 3 chairs, in the garden!"
    ids = tok(text, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and tok.model_max_length == 77
    assert ids[0] == tok.convert_tokens_to_ids("<|startoftext|>")
    assert tok.pad_token == pad and ids[-1] == tok.convert_tokens_to_ids(pad)
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == "a photo of the cat sitting on 3 chairs , in the garden !"
    assert len(tok) == tiny.TINY_VOCAB_SIZE


@pytest.mark.parametrize("family, encoders", [("sd15", ["text_encoder"]), ("sdxl", ["text_encoder", "text_encoder_2"])])
def test_text_encoder_vocabulary_matches_tokenizer(tiny_models_dir, family, encoders):
    for enc in encoders:
        config = json.loads((tiny_models_dir / f"checkpoints/tiny-{family}/{enc}/config.json").read_text())
        assert config["vocab_size"] == tiny.TINY_VOCAB_SIZE
        assert config["max_position_embeddings"] == 77
        assert config["eos_token_id"] == tiny.TINY_VOCAB_SIZE - 1


@pytest.mark.parametrize("family, scheduler, scaling", [("sd15", "PNDMScheduler", 0.18215),
                                                        ("sdxl", "EulerDiscreteScheduler", 0.13025)])
def test_schedule_and_vae_scaling_are_the_real_ones(tiny_models_dir, family, scheduler, scaling):
    root = tiny_models_dir / f"checkpoints/tiny-{family}"
    sched = json.loads((root / "scheduler/scheduler_config.json").read_text())
    assert sched["_class_name"] == scheduler
    assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"]) == (0.00085, 0.012, "scaled_linear")
    assert (sched["num_train_timesteps"], sched["prediction_type"]) == (1000, "epsilon")
    vae = json.loads((root / "vae/config.json").read_text())
    assert vae["scaling_factor"] == scaling and vae["latent_channels"] == 4
    assert len(vae["block_out_channels"]) == 4  # downscale factor 8


def test_single_file_checkpoints_use_the_original_key_layout(tiny_models_dir):
    from safetensors import safe_open

    with safe_open(str(tiny_models_dir / "checkpoints/tiny-sd15.safetensors"), "pt") as f:
        sd15 = set(f.keys())
    with safe_open(str(tiny_models_dir / "checkpoints/tiny-sdxl.safetensors"), "pt") as f:
        sdxl = set(f.keys())
    assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in sd15
    assert "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight" in sd15
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in sd15
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in sd15
    assert "model.diffusion_model.label_emb.0.0.weight" in sdxl
    assert "model.diffusion_model.middle_block.1.transformer_blocks.9.attn2.to_k.weight" in sdxl
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in sdxl
    assert "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight" in sdxl
    assert "conditioner.embedders.1.model.text_projection" in sdxl
