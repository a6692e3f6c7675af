"""diffusers → original (LDM / stability) key layout, to write single-file checkpoints from diffusers folders.

diffusers only converts the other way; the tiny model set uses this to ship single-file copies of its
checkpoints, so the single-file loading path is tested on the same weights as the folders.
"""
from __future__ import annotations

from pathlib import Path


_LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_LDM_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                 "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
                 "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_LDM_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def _rename(key: str, prefixes: dict[str, str], inner: dict[str, str] | None = None) -> str | None:
    """Replace the longest matching block prefix of ``key``; then rename the first part of the rest."""
    for old in sorted(prefixes, key=len, reverse=True):
        if key.startswith(old):
            rest = key[len(old):]
            for a, b in (inner or {}).items():
                if rest.startswith(a + "."):
                    rest = b + rest[len(a):]
                    break
            return prefixes[old] + rest
    return None


def unet_to_ldm(state: dict, config) -> dict:
    """diffusers UNet2DConditionModel weights → ``model.diffusion_model.*`` keys (LDM layout)."""
    per = config.layers_per_block + 1  # LDM numbers resnet(+attention) pairs and the down/upsampler together
    levels = len(config.block_out_channels)
    resnets, others = {}, {"mid_block.attentions.0.": "middle_block.1."}
    for i in range(levels):
        for j in range(config.layers_per_block):
            resnets[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{i * per + j + 1}.0."
            others[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{i * per + j + 1}.1."
        others[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * per}.0.op."
        has_attn = any(k.startswith(f"up_blocks.{i}.attentions.") for k in state)
        for j in range(per):
            resnets[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{i * per + j}.0."
            others[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{i * per + j}.1."
        others[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{i * per + per - 1}.{2 if has_attn else 1}."
    resnets.update({"mid_block.resnets.0.": "middle_block.0.", "mid_block.resnets.1.": "middle_block.2."})
    top = {k + ".": v + "." for k, v in _LDM_UNET_TOP.items()}
    out = {}
    for key, value in state.items():
        new = _rename(key, resnets, _LDM_RESNET) or _rename(key, others) or _rename(key, top)
        if new is None:
            raise KeyError(f"unet_to_ldm: no LDM name for UNet weight '{key}'")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state: dict, config) -> dict:
    """diffusers AutoencoderKL weights → ``first_stage_model.*`` keys (LDM layout, attention as 1x1 convs)."""
    levels = len(config.block_out_channels)
    blocks = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}
    for part in ("encoder", "decoder"):
        blocks[f"{part}.mid_block.resnets.0."] = f"{part}.mid.block_1."
        blocks[f"{part}.mid_block.resnets.1."] = f"{part}.mid.block_2."
    for i in range(levels):
        blocks[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        blocks[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{levels - 1 - i}.upsample."
        for j in range(config.layers_per_block + 1):
            blocks[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
            blocks[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{levels - 1 - i}.block.{j}."
    attn = {f"{p}.mid_block.attentions.0.": f"{p}.mid.attn_1." for p in ("encoder", "decoder")}
    out = {}
    for key, value in state.items():
        new = _rename(key, attn, _LDM_VAE_ATTN)
        if new is not None and value.ndim == 2:  # LDM's VAE attention uses 1x1 convolutions
            value = value[:, :, None, None]
        new = new or _rename(key, blocks, {"conv_shortcut": "nin_shortcut"}) or key
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(state: dict, prefix: str) -> dict:
    """transformers CLIP text weights → ``<prefix>text_model.*`` keys (OpenAI CLIP layout inside LDM files)."""
    return {prefix + "text_model." + k.removeprefix("text_model."): v for k, v in state.items()
            if not k.endswith("position_ids")}


def openclip_to_ldm(state: dict, prefix: str) -> dict:
    """transformers CLIPTextModelWithProjection weights → OpenCLIP keys (SDXL's second text encoder)."""
    import torch

    state = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    out = {prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           prefix + "text_projection": state.pop("text_projection.weight").T.contiguous()}
    for key, value in state.items():
        if key.startswith("final_layer_norm."):
            out[prefix + "ln_final." + key.split(".")[-1]] = value
            continue
        layer, rest = key.removeprefix("encoder.layers.").split(".", 1)
        base = f"{prefix}transformer.resblocks.{layer}."
        if rest.startswith("self_attn.q_proj."):  # OpenCLIP stores q, k and v as one in_proj matrix
            kind = rest.rsplit(".", 1)[1]
            parts = [state[f"encoder.layers.{layer}.self_attn.{n}_proj.{kind}"] for n in "qkv"]
            out[base + "attn.in_proj_" + kind] = torch.cat(parts, dim=0)
        elif rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            continue
        else:
            out[base + _rename(rest, {"": ""}, _OPENCLIP_LAYER)] = value
    return out


def write_ldm_checkpoint(folder: Path, target: Path) -> None:
    """One ``.safetensors`` in the original layout from the diffusers folder ``folder`` (same weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    unet_config = UNet2DConditionModel.load_config(str(folder / "unet"))
    vae_config = AutoencoderKL.load_config(str(folder / "vae"))

    def weights(sub: str, name: str) -> dict:
        return load_file(str(folder / sub / name))

    def cfg(d: dict):
        return type("Config", (), d)

    state = unet_to_ldm(weights("unet", "diffusion_pytorch_model.safetensors"), cfg(unet_config))
    state.update(vae_to_ldm(weights("vae", "diffusion_pytorch_model.safetensors"), cfg(vae_config)))
    if (folder / "text_encoder_2").is_dir():
        state.update(clip_to_ldm(weights("text_encoder", "model.safetensors"), "conditioner.embedders.0.transformer."))
        state.update(openclip_to_ldm(weights("text_encoder_2", "model.safetensors"), "conditioner.embedders.1.model."))
    else:
        state.update(clip_to_ldm(weights("text_encoder", "model.safetensors"), "cond_stage_model.transformer."))
    save_file({k: v.contiguous() for k, v in state.items()}, str(target), metadata={"format": "pt"})


def controlnet_to_ldm(state: dict, config, down_blocks: int) -> dict:
    """A diffusers ControlNetModel state dict in the original ``control_model.*`` layout."""
    ldm_names = {"controlnet_cond_embedding.conv_in.": "input_hint_block.0.",
                 "controlnet_cond_embedding.conv_out.": "input_hint_block.14.",
                 "controlnet_mid_block.": "middle_block_out.0."}
    ldm_names.update({f"controlnet_cond_embedding.blocks.{i}.": f"input_hint_block.{2 * i + 2}." for i in range(6)})
    ldm_names.update({f"controlnet_down_blocks.{i}.": f"zero_convs.{i}.0." for i in range(down_blocks)})
    out, shared = {}, {}
    for key, value in state.items():
        prefix = next((p for p in ldm_names if key.startswith(p)), None)
        if prefix is None:
            shared[key] = value
        else:
            out["control_model." + ldm_names[prefix] + key[len(prefix):]] = value
    for key, value in unet_to_ldm(shared, config).items():  # the UNet-shaped part keeps the UNet's names
        out["control_model." + key.removeprefix("model.diffusion_model.")] = value
    return out
