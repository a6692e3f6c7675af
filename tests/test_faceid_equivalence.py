"""FaceID against diffusers, and the FaceID attention LoRA against hand-computed weights.

* Faces found by real insightface (tiny ONNX packs) are encoded by ``core.faceid_apply.encode_faces``; our
  patched UNet must equal diffusers' own IP-Adapter path (``load_ip_adapter`` + ``ip_adapter_image_embeds``,
  with FaceID-Plus's CLIP embeds and shortcut set on ``unet.encoder_hid_proj.image_projection_layers[0]`` as
  diffusers documents) within 1e-5 in fp32, for FaceID, FaceID-Plus and Plus V2.
* The LoRA: peft is not installed, so diffusers cannot load the FaceID LoRA (it warns and skips it).  Our
  LoRA is compared instead with the weights ``W + s · up @ down`` computed by hand per module, the module of
  ``N.to_q_lora`` being taken from diffusers' own ``unet.attn_processors`` order, and whole-UNet outputs are
  compared with a copy of the UNet whose weights were edited by hand.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import torch

from ipadapter_nodes.core import faceid, faceid_apply, faceid_lora
from ipadapter_nodes.core.adapter import load_adapter
from ipadapter_nodes.core.application import Application
from ipadapter_nodes.core.backends.diffusers import DiffusersModel, patched_unet
from ipadapter_nodes.core.encode import load_clip_vision
from ipadapter_nodes.runtime import tiny
from ipadapter_nodes.runtime.tiny_adapters import make_adapter
from tiny_faces import face_image

TOLERANCE = 1e-5
# file name (as published, so that "plusv2" picks the V2 shortcut) -> tiny variant
FILES = {
    "ip-adapter-faceid_sd15.safetensors": "faceid-sd15",
    "ip-adapter-faceid-plus_sd15.safetensors": "faceid-plus-sd15",
    "ip-adapter-faceid-plusv2_sd15.safetensors": "faceid-plusv2-sd15",
}


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("faceid-adapters")
    for seed, (name, variant) in enumerate(FILES.items()):
        make_adapter(variant, folder / name, seed=seed + 20)
    return folder


@pytest.fixture(scope="module")
def pipe(tiny_models_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(Path(tiny_models_dir) / tiny.TINY_PATHS["tiny-sd15"],
                                                   safety_checker=None)


@pytest.fixture(scope="module")
def encoder(tiny_models_dir):
    return load_clip_vision(Path(tiny_models_dir) / tiny.TINY_PATHS["tiny-vit-h"])


@pytest.fixture(scope="module")
def insightface(tiny_faces_dir):
    return faceid.load_insightface("buffalo_l", root=tiny_faces_dir, provider="CPU")


def unet_inputs(batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(batch, 4, 8, 8, generator=g), timestep=torch.tensor(500),
                encoder_hidden_states=torch.randn(batch, 77, tiny.TINY_SD15["cross_attention_dim"], generator=g))


@contextlib.contextmanager
def sampling(model):
    """The sampler's order: the model's weight patches, then the IP-Adapter attention patch (CFG batch)."""
    with contextlib.ExitStack() as stack:
        for patch in model.patches:
            stack.enter_context(patch.applied(model.unet))
        state = stack.enter_context(patched_unet(model))
        state.cond_or_uncond = [1, 0]  # uncond chunk first
        yield state


def run(unet, inputs, applications=(), patches=()):
    """The UNet's output with our applications and weight patches."""
    model = DiffusersModel(unet, "sd15", {}, applications=tuple(applications), patches=tuple(patches))
    with torch.no_grad(), sampling(model):
        return unet(**inputs).sample


def diffusers_unet(pipe, folder: Path, name: str):
    twin = type(pipe)(**{**pipe.components, "unet": copy.deepcopy(pipe.unet)})
    # without peft diffusers loads the IP part and skips the LoRA with a warning
    twin.load_ip_adapter(str(folder), subfolder="", weight_name=name, image_encoder_folder=None)
    twin.set_ip_adapter_scale(1.0)
    return twin.unet


# ---- FaceID / Plus / Plus V2 against diffusers ----------------------------------------------------------------

@pytest.mark.parametrize("name, v2_weight", [
    ("ip-adapter-faceid_sd15.safetensors", None),
    ("ip-adapter-faceid-plus_sd15.safetensors", None),
    ("ip-adapter-faceid-plusv2_sd15.safetensors", 1.5),
], ids=["faceid", "faceid-plus", "faceid-plusv2"])
def test_faceid_unet_output_equals_diffusers_with_face_embeds(pipe, encoder, insightface, adapters_dir, name,
                                                             v2_weight):
    adapter = load_adapter(adapters_dir / name)
    assert faceid_apply.is_plus_v2(adapter) == (v2_weight is not None)
    faces = faceid_apply.encode_faces(adapter, insightface, face_image(160, seed=3), clip_vision=encoder)
    embeds = faces.embeds
    assert faces.face_image.shape == (1, 224, 224, 3)  # the SD1.5 crop
    assert torch.allclose(embeds.cond.norm(dim=-1), torch.ones(1), atol=1e-5)  # normed ArcFace embedding
    assert torch.equal(embeds.uncond, torch.zeros_like(embeds.cond))
    inputs = unet_inputs()

    theirs_unet = diffusers_unet(pipe, adapters_dir, name)
    projection = theirs_unet.encoder_hid_proj.image_projection_layers[0]
    if embeds.clip_cond is not None:
        projection.clip_embeds = torch.stack([embeds.clip_uncond, embeds.clip_cond])
        projection.shortcut = v2_weight is not None
        projection.shortcut_scale = 1.0 if v2_weight is None else v2_weight
    image_embeds = [torch.stack([embeds.uncond, embeds.cond])]
    with torch.no_grad():
        theirs = theirs_unet(**inputs, added_cond_kwargs={"image_embeds": image_embeds}).sample

    ours = run(pipe.unet, inputs, [Application(adapter, embeds, faceid_v2_weight=v2_weight)])
    plain = run(pipe.unet, inputs)
    assert (ours - plain).abs().max() > 1e-3, "the adapter must change the output for the comparison to mean anything"
    assert (ours - theirs).abs().max() <= TOLERANCE


def test_plus_v2_shortcut_weight_changes_the_output(pipe, encoder, insightface, adapters_dir):
    adapter = load_adapter(adapters_dir / "ip-adapter-faceid-plusv2_sd15.safetensors")
    embeds = faceid_apply.encode_faces(adapter, insightface, face_image(160, seed=3), clip_vision=encoder).embeds
    inputs = unet_inputs()
    v1 = run(pipe.unet, inputs, [Application(adapter, embeds)])
    v2 = run(pipe.unet, inputs, [Application(adapter, embeds, faceid_v2_weight=2.0)])
    assert (v1 - v2).abs().max() > 1e-4


# ---- the attention LoRA ---------------------------------------------------------------------------------------

def hand_deltas(unet, lora: dict, strength: float) -> dict[str, torch.Tensor]:
    """module name -> strength · up @ down, the module of ``N`` looked up in diffusers' attn_processors order."""
    processors = [name[: -len(".processor")] for name in unet.attn_processors]
    module_of = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
    deltas = {}
    for key, down in lora.items():
        if not key.endswith("_lora.down.weight"):
            continue
        index, projection = key.split(".")[0], key.split(".")[1][: -len("_lora")]
        up = lora[key.replace(".down.", ".up.")]
        deltas[f"{processors[int(index)]}.{module_of[projection]}"] = strength * (up.double() @ down.double())
    return deltas


def hand_patched_unet(unet, deltas: dict[str, torch.Tensor]):
    twin = copy.deepcopy(unet)
    with torch.no_grad():
        for name, delta in deltas.items():
            weight = twin.get_submodule(name).weight
            weight.copy_((weight.double() + delta).float())
    return twin


@pytest.fixture(scope="module")
def faceid_adapter(adapters_dir):
    return load_adapter(adapters_dir / "ip-adapter-faceid_sd15.safetensors")


def test_internal_lora_covers_every_attention_projection(pipe, faceid_adapter):
    deltas = faceid_lora.internal_deltas(faceid_adapter.lora, "sd15")
    processors = [name[: -len(".processor")] for name in pipe.unet.attn_processors]
    assert len(processors) == 32
    assert set(deltas) == {f"{p}.{m}" for p in processors for m in ("to_q", "to_k", "to_v", "to_out.0")}


def test_internal_lora_weights_equal_w_plus_strength_up_down(pipe, faceid_adapter):
    strength = 0.6
    model = faceid_lora.apply_internal_lora(DiffusersModel(pipe.unet, "sd15", {}), faceid_adapter, strength)
    (patch,) = model.patches
    expected = hand_deltas(pipe.unet, faceid_adapter.lora, strength)
    before = {name: pipe.unet.get_submodule(name).weight.detach().clone() for name in expected}
    with patch.applied(pipe.unet):
        for name, delta in expected.items():
            weight = pipe.unet.get_submodule(name).weight
            assert torch.allclose(weight.double(), before[name].double() + delta, atol=1e-6), name
    for name, original in before.items():  # restored exactly
        assert torch.equal(pipe.unet.get_submodule(name).weight, original), name


def test_lora_unet_output_equals_a_hand_patched_unet(pipe, faceid_adapter):
    strength = 0.8
    inputs = unet_inputs(seed=5)
    model = faceid_lora.apply_internal_lora(DiffusersModel(pipe.unet, "sd15", {}), faceid_adapter, strength)
    ours = run(pipe.unet, inputs, patches=model.patches)
    theirs = run(hand_patched_unet(pipe.unet, hand_deltas(pipe.unet, faceid_adapter.lora, strength)), inputs)
    plain = run(pipe.unet, inputs)
    assert (ours - plain).abs().max() > 1e-3
    assert (ours - theirs).abs().max() <= TOLERANCE


def test_lora_strength_zero_leaves_the_model_as_is(pipe, faceid_adapter):
    model = DiffusersModel(pipe.unet, "sd15", {})
    assert faceid_lora.apply_internal_lora(model, faceid_adapter, 0.0) is model


def kohya_file(path: Path, unet, lora: dict, ldm: bool, alpha_ratio: float | None) -> Path:
    """The checkpoint's LoRA written as a kohya file (diffusers or LDM module names, optional alpha)."""
    from safetensors.torch import save_file

    processors = [name[: -len(".processor")] for name in unet.attn_processors]
    tensors = {}
    for key, down in lora.items():
        if not key.endswith("_lora.down.weight"):
            continue
        index, projection = key.split(".")[0], key.split(".")[1][: -len("_lora")]
        module = f"{processors[int(index)]}.{'to_out.0' if projection == 'to_out' else projection}"
        if ldm:
            module = faceid_lora.ldm_name(module)
        stem = "lora_unet_" + module.replace(".", "_")
        tensors[f"{stem}.lora_down.weight"] = down.contiguous()
        tensors[f"{stem}.lora_up.weight"] = lora[key.replace(".down.", ".up.")].contiguous()
        if alpha_ratio is not None:
            tensors[f"{stem}.alpha"] = torch.tensor(alpha_ratio * down.shape[0])
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("ldm, alpha_ratio", [(False, None), (True, 0.5)], ids=["diffusers-names", "ldm-names-alpha"])
def test_lora_file_equals_the_checkpoint_lora(pipe, faceid_adapter, tmp_path, ldm, alpha_ratio):
    path = kohya_file(tmp_path / "ip-adapter-faceid_sd15_lora.safetensors", pipe.unet, faceid_adapter.lora, ldm,
                      alpha_ratio)
    from_file = faceid_lora.file_deltas(faceid_lora.read_lora_file(path), "sd15")
    internal = faceid_lora.internal_deltas(faceid_adapter.lora, "sd15")
    assert set(from_file) == set(internal)
    scale = 1.0 if alpha_ratio is None else alpha_ratio
    for name, (delta,) in from_file.items():
        shape = pipe.unet.get_submodule(name).weight.shape
        assert torch.allclose(delta.delta(shape), scale * internal[name][0].delta(shape), atol=1e-7), name


def test_ldm_names_match_the_checkpoint_converter(pipe):
    from ipadapter_nodes.runtime.ldm_convert import unet_to_ldm

    modules = faceid_lora.projection_modules("sd15")
    converted = unet_to_ldm({f"{m}.weight": None for m in modules}, pipe.unet.config)
    prefix = "model.diffusion_model."
    theirs = sorted(k[len(prefix):-len(".weight")] for k in converted)
    assert sorted(faceid_lora.ldm_name(m) for m in modules) == theirs


def test_a_general_lora_file_is_refused_naming_its_keys(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "style_lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)}, str(path))
    with pytest.raises(faceid_lora.FaceIDLoraError, match="proj_in"):
        faceid_lora.file_deltas(faceid_lora.read_lora_file(path), "sd15")


class _Patcher:
    """The ModelPatcher calls the LoRA uses: ``model.state_dict()``, ``clone()``, ``add_patches``."""

    def __init__(self, state: dict, patches: dict | None = None):
        self.model = type("SD15", (), {"state_dict": lambda _self: state})()
        self.state, self.patches = state, dict(patches or {})

    def clone(self):
        return _Patcher(self.state, self.patches)

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        for key, value in patches.items():
            self.patches.setdefault(key, []).append((strength_patch, value, strength_model))
        return list(patches)


def test_comfy_model_gets_diff_patches_on_ldm_keys(pipe, faceid_adapter):
    unet_state = pipe.unet.state_dict()
    internal = faceid_lora.internal_deltas(faceid_adapter.lora, "sd15")
    state = {f"diffusion_model.{faceid_lora.ldm_name(m)}.weight": unet_state[f"{m}.weight"] for m in internal}
    patcher = _Patcher(state)
    patched = faceid_lora.patch_model(patcher, internal, 0.7, "test LoRA")
    assert patched is not patcher and patcher.patches == {}
    assert set(patched.patches) == set(state)
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    ((strength, (kind, (diff,)), _),) = patched.patches[f"diffusion_model.{faceid_lora.ldm_name(name)}.weight"]
    assert kind == "diff" and strength == 0.7
    expected = hand_deltas(pipe.unet, faceid_adapter.lora, 1.0)[name]
    assert torch.allclose(diff.double(), expected, atol=1e-7)
