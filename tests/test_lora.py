"""LoRA: the weight-patch mechanism, the kohya and diffusers/PEFT key layouts, LoraLoader/LoraLoaderModelOnly.

Oracles: the delta ``W + strength · alpha/rank · up @ down`` computed by hand; diffusers' own kohya → diffusers
key converters (``lora_conversion_utils``) for the key mapping.  diffusers' ``load_lora_weights`` needs peft,
which is not installed here, so the forward check compares against a hand-merged weight instead.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from ipadapter_nodes.core import folders
from ipadapter_nodes.core.weight_patches import LowRankDelta, WeightPatch, merged
from ipadapter_nodes.runtime import lora as lora_files
from ipadapter_nodes.runtime.ldm_convert import unet_to_ldm
from ipadapter_nodes.runtime.sampling import sample
from ipadapter_nodes.runtime.standard_nodes import checkpoint
from ipadapter_nodes.runtime.standard_nodes.lora import LoraLoader, LoraLoaderModelOnly

RANK, ALPHA = 4, 2.0
SD15_UNET_TARGETS = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "down_blocks.0.attentions.0.proj_in",                          # a 1x1 convolution in SD1.5
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.0.resnets.0.conv1",                               # a 3x3 convolution
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
    "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0",
]
SD15_TEXT_TARGETS = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc1"]
SDXL_UNET_TARGETS = [
    "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q",
    "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k",
    "down_blocks.1.attentions.1.proj_in",                          # linear in SDXL
    "mid_block.attentions.0.transformer_blocks.3.ff.net.2",
    "up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_v",
    "up_blocks.1.attentions.0.proj_out",
]


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def layout(tmp_path_factory, tiny_models_dir):
    root = tmp_path_factory.mktemp("lora-models")
    (root / "loras").mkdir()
    previous = folders._provider
    folders.configure(folders.FolderLayout(models_dirs=[str(root), str(tiny_models_dir)],
                                           output_dir=str(root / "output")))
    yield root
    folders._provider = previous


@pytest.fixture(scope="module")
def sd15(layout):
    return checkpoint.load_checkpoint("tiny-sd15")


@pytest.fixture(scope="module")
def sdxl(layout):
    return checkpoint.load_checkpoint("tiny-sdxl")


def _factors(module: torch.nn.Module, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (down, up) of RANK for a Linear or Conv2d weight, shaped as kohya stores them."""
    weight = module.weight
    if weight.ndim == 4:
        down = torch.randn(RANK, weight.shape[1], *weight.shape[2:], generator=generator) * 0.3
        up = torch.randn(weight.shape[0], RANK, 1, 1, generator=generator) * 0.3
    else:
        down = torch.randn(RANK, weight.shape[1], generator=generator) * 0.3
        up = torch.randn(weight.shape[0], RANK, generator=generator) * 0.3
    return down, up


def _module(model: torch.nn.Module, name: str) -> str:
    """The real module name of a target spelled as LoRA files spell it (transformers 5's CLIPTextModel has no
    ``text_model`` level)."""
    if name.startswith("text_model.") and not hasattr(model, "text_model"):
        return name[len("text_model."):]
    return name


def _kohya(parts: dict[str, tuple[torch.nn.Module, list[str]]], seed: int = 0,
           names: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """kohya keys for prefix → (model, module names); ``names`` renames modules (LDM spelling)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, (model, targets) in parts.items():
        for target in targets:
            down, up = _factors(model.get_submodule(_module(model, target)), generator)
            stem = prefix + (names or {}).get(target, target).replace(".", "_")
            state[f"{stem}.lora_down.weight"], state[f"{stem}.lora_up.weight"] = down, up
            state[f"{stem}.alpha"] = torch.tensor(ALPHA)
    return state


def _write(layout, name: str, state: dict, metadata: dict | None = None) -> str:
    path = layout / "loras" / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return str(path)


def _deltas(patch: WeightPatch, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: sum(d.delta(model.get_submodule(name).weight.shape) for d in items)
            for name, items in patch.deltas.items()}


def _assert_same_deltas(a: dict, b: dict) -> None:
    assert set(a) == set(b) and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def _cond(clip, text: str) -> list:
    cond, pooled = clip.encode(text)
    return [[cond, {"pooled_output": pooled}]]


def _image(model, clip, seed: int = 5) -> torch.Tensor:
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    with torch.no_grad():
        return sample(model, seed, 2, 5.0, "euler", "normal", _cond(clip, "a red cube"), _cond(clip, ""),
                      latent)["samples"]


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _bit_identical(module: torch.nn.Module, snapshot: dict) -> bool:
    return all(torch.equal(v, snapshot[k]) for k, v in module.state_dict().items())


# ---------------------------------------------------------------------------------------- the mechanism
def test_patch_adds_scaled_product_and_restores_exactly_after_an_interrupt():
    layer = torch.nn.Linear(6, 5)
    original = layer.weight.detach().clone()
    up, down = torch.randn(5, 2), torch.randn(2, 6)
    root = torch.nn.ModuleDict({"layer": layer})
    patch = WeightPatch({"layer": (LowRankDelta(up, down, scale=0.5, strength=0.8),)}, "test")
    with pytest.raises(KeyboardInterrupt):
        with patch.applied(root):
            torch.testing.assert_close(layer.weight, original + 0.4 * up @ down, rtol=0, atol=1e-6)
            raise KeyboardInterrupt
    assert torch.equal(layer.weight, original)


def test_stacked_patches_add_up_and_leave_weights_bit_identical():
    conv = torch.nn.Conv2d(3, 4, 3)
    root = torch.nn.ModuleDict({"conv": conv})
    original = conv.weight.detach().clone()
    first = LowRankDelta(torch.randn(4, 2, 1, 1), torch.randn(2, 3, 3, 3), scale=0.5)
    second = LowRankDelta(torch.randn(4, 1, 1, 1), torch.randn(1, 3, 3, 3), strength=-2.0)
    with WeightPatch({"conv": (first,)}).applied(root), WeightPatch({"conv": (second,)}).applied(root):
        expected = original.clone()
        for d in (first, second):
            expected += d.scale * d.strength * torch.einsum("or,rikl->oikl", d.up[:, :, 0, 0], d.down)
        torch.testing.assert_close(conv.weight, expected, rtol=0, atol=1e-5)
    assert torch.equal(conv.weight, original)


def test_patch_naming_missing_modules_raises_before_touching_weights():
    root = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2)})
    before = root.a.weight.detach().clone()
    patch = WeightPatch({"a": (LowRankDelta(torch.ones(2, 1), torch.ones(1, 2)),),
                         "b.c": (LowRankDelta(torch.ones(2, 1), torch.ones(1, 2)),)}, "LoRA 'x.safetensors'")
    with pytest.raises(KeyError, match=r"LoRA 'x.safetensors'.*'b.c'"):
        with patch.applied(root):
            pass
    assert torch.equal(root.a.weight, before)


def test_strength_zero_leaves_the_unet_output_bit_identical_and_strength_one_changes_it(sd15, layout):
    model, clip, _ = sd15
    path = _write(layout, "sd15-kohya-a.safetensors", _kohya({"lora_unet_": (model.unet, SD15_UNET_TARGETS)}))
    lora = lora_files.read_lora(path)
    zero, _ = lora_files.lora_patches(lora, model.unet, None, strength_model=0.0)
    one, _ = lora_files.lora_patches(lora, model.unet, None, strength_model=1.0)
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 32)
    with torch.no_grad():
        plain = model.unet(x, t, encoder_hidden_states=context).sample
        with zero.applied(model.unet):
            at_zero = model.unet(x, t, encoder_hidden_states=context).sample
        with one.applied(model.unet):
            at_one = model.unet(x, t, encoder_hidden_states=context).sample
    assert torch.equal(at_zero, plain)
    assert float((at_one - plain).abs().max()) > 1e-3


def test_lora_forward_equals_the_hand_merged_weight(sd15, layout):
    # diffusers' load_lora_weights/fuse_lora need peft (not installed): the oracle is W + alpha/rank * up @ down
    model, _, _ = sd15
    target = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    state = _kohya({"lora_unet_": (model.unet, [target])}, seed=7)
    stem = "lora_unet_" + target.replace(".", "_")
    (unet_patch, _) = lora_files.lora_patches(lora_files.read_lora(_write(layout, "one.safetensors", state)),
                                              model.unet, None, strength_model=0.7)
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([300.0]), torch.randn(1, 77, 32)
    layer = model.unet.get_submodule(target)
    original = layer.weight.detach().clone()
    with torch.no_grad():
        with unet_patch.applied(model.unet):
            ours = model.unet(x, t, encoder_hidden_states=context).sample
        merged = original + 0.7 * (ALPHA / RANK) * state[f"{stem}.lora_up.weight"] @ state[f"{stem}.lora_down.weight"]
        layer.weight.copy_(merged)
        try:
            reference = model.unet(x, t, encoder_hidden_states=context).sample
        finally:
            layer.weight.copy_(original)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ key layouts
def test_kohya_and_peft_layouts_give_the_same_deltas(sd15, layout):
    model, clip, _ = sd15
    kohya = _kohya({"lora_unet_": (model.unet, SD15_UNET_TARGETS),
                    "lora_te_": (clip.text_encoders[0], SD15_TEXT_TARGETS)}, seed=1)
    peft = {}
    for key, value in kohya.items():
        stem, _, role = key.partition(".")
        if role == "alpha":
            continue
        prefix, name = ("unet.", stem[len("lora_unet_"):]) if stem.startswith("lora_unet_") else \
            ("text_encoder.", stem[len("lora_te_"):])
        module = next(m for m in SD15_UNET_TARGETS + SD15_TEXT_TARGETS if m.replace(".", "_") == name)
        peft[f"{prefix}{module}.lora_{'A' if role.startswith('lora_down') else 'B'}.weight"] = value
    metadata = {"lora_adapter_metadata": json.dumps({"unet.r": RANK, "unet.lora_alpha": ALPHA,
                                                     "text_encoder.r": RANK, "text_encoder.lora_alpha": ALPHA})}
    a = lora_files.lora_patches(lora_files.read_lora(_write(layout, "k.safetensors", kohya)), model.unet,
                                clip.text_encoders)
    b = lora_files.lora_patches(lora_files.read_lora(_write(layout, "p.safetensors", peft, metadata)), model.unet,
                                clip.text_encoders)
    _assert_same_deltas(_deltas(a[0], model.unet), _deltas(b[0], model.unet))
    _assert_same_deltas(_deltas(a[1], clip.patch_root()), _deltas(b[1], clip.patch_root()))
    assert set(a[1].deltas) == {f"text_encoder.{_module(clip.text_encoders[0], n)}" for n in SD15_TEXT_TARGETS}
    # the scale is alpha / rank
    first = a[0].deltas[SD15_UNET_TARGETS[0]][0]
    assert first.scale == ALPHA / RANK


def test_kohya_sd15_keys_map_like_diffusers_converter(sd15, layout):
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

    model, clip, _ = sd15
    targets = [t for t in SD15_UNET_TARGETS]
    kohya = _kohya({"lora_unet_": (model.unet, targets), "lora_te_": (clip.text_encoders[0], SD15_TEXT_TARGETS)},
                   seed=2)
    kohya = {k: (torch.tensor(float(RANK)) if k.endswith(".alpha") else v) for k, v in kohya.items()}  # scale 1
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(dict(kohya))
    assert any("processor.to_q_lora.down.weight" in k for k in converted)  # diffusers' attention-processor form
    ours = lora_files.lora_patches(lora_files.read_lora(_write(layout, "k2.safetensors", kohya)), model.unet,
                                   clip.text_encoders)
    theirs = lora_files.lora_patches(lora_files.read_lora(_write(layout, "d2.safetensors", converted)), model.unet,
                                     clip.text_encoders)
    _assert_same_deltas(_deltas(ours[0], model.unet), _deltas(theirs[0], model.unet))
    _assert_same_deltas(_deltas(ours[1], clip.patch_root()), _deltas(theirs[1], clip.patch_root()))


def test_sdxl_kohya_ldm_names_map_like_diffusers_sgm_mapping(sdxl, layout):
    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                         _maybe_map_sgm_blocks_to_diffusers)

    model, clip, _ = sdxl
    ldm = unet_to_ldm({f"{t}.weight": None for t in SDXL_UNET_TARGETS}, model.unet.config)
    names = {t: k[len("model.diffusion_model."):-len(".weight")] for t, k in zip(SDXL_UNET_TARGETS, ldm)}
    assert names[SDXL_UNET_TARGETS[0]].startswith("input_blocks.")
    te1, te2 = clip.text_encoders
    kohya = _kohya({"lora_unet_": (model.unet, SDXL_UNET_TARGETS), "lora_te1_": (te1, SD15_TEXT_TARGETS),
                    "lora_te2_": (te2, SD15_TEXT_TARGETS)}, seed=3, names=names)
    kohya = {k: (torch.tensor(float(RANK)) if k.endswith(".alpha") else v) for k, v in kohya.items()}
    remapped = _maybe_map_sgm_blocks_to_diffusers(dict(kohya), model.unet.config)
    converted, _ = _convert_non_diffusers_lora_to_diffusers(remapped)
    ours = lora_files.lora_patches(lora_files.read_lora(_write(layout, "xl-k.safetensors", kohya)), model.unet,
                                   clip.text_encoders)
    theirs = lora_files.lora_patches(lora_files.read_lora(_write(layout, "xl-d.safetensors", converted)),
                                     model.unet, clip.text_encoders)
    assert set(ours[0].deltas) == set(SDXL_UNET_TARGETS)
    assert {n.split(".")[0] for n in ours[1].deltas} == {"text_encoder", "text_encoder_2"}
    _assert_same_deltas(_deltas(ours[0], model.unet), _deltas(theirs[0], model.unet))
    _assert_same_deltas(_deltas(ours[1], clip.patch_root()), _deltas(theirs[1], clip.patch_root()))


def test_a_lora_for_another_family_names_the_file_and_some_keys(sd15, sdxl, layout):
    xl_model, _, _ = sdxl
    path = _write(layout, "made-for-sdxl.safetensors", _kohya({"lora_unet_": (xl_model.unet, SDXL_UNET_TARGETS)}))
    with pytest.raises(lora_files.LoraFormatError, match=r"made-for-sdxl\.safetensors.*lora_unet_down_blocks_"):
        lora_files.lora_patches(lora_files.read_lora(path), sd15[0].unet, sd15[1].text_encoders)


def test_lycoris_files_are_refused_clearly(layout):
    path = _write(layout, "loha.safetensors", {"lora_unet_x.hada_w1_a": torch.zeros(2, 2),
                                               "lora_unet_x.hada_w1_b": torch.zeros(2, 2)})
    with pytest.raises(lora_files.LoraFormatError, match=r"loha\.safetensors.*LyCORIS"):
        lora_files.read_lora(path)


# ------------------------------------------------------------------------------------------------ nodes
def test_node_declarations_match_comfyui():
    required = LoraLoader.INPUT_TYPES()["required"]
    assert list(required) == ["model", "clip", "lora_name", "strength_model", "strength_clip"]
    for name in ("strength_model", "strength_clip"):
        options = required[name][1]
        assert (required[name][0], options["default"], options["min"], options["max"], options["step"]) == \
            ("FLOAT", 1.0, -100.0, 100.0, 0.01)
    assert LoraLoader.RETURN_TYPES == ("MODEL", "CLIP") and LoraLoader.FUNCTION == "load_lora"
    assert list(LoraLoaderModelOnly.INPUT_TYPES()["required"]) == ["model", "lora_name", "strength_model"]
    assert LoraLoaderModelOnly.RETURN_TYPES == ("MODEL",) and LoraLoaderModelOnly.CATEGORY == "loaders"


def test_lora_loader_changes_the_image_never_the_inputs_and_restores_the_weights(sd15, layout):
    model, clip, _ = sd15
    _write(layout, "style.safetensors", _kohya({"lora_unet_": (model.unet, SD15_UNET_TARGETS),
                                                "lora_te_": (clip.text_encoders[0], SD15_TEXT_TARGETS)}, seed=4))
    assert "style.safetensors" in LoraLoader.INPUT_TYPES()["required"]["lora_name"][0]
    unet_before, text_before = _snapshot(model.unet), _snapshot(clip.text_encoders[0])
    plain = _image(model, clip)
    patched_model, patched_clip = LoraLoader().load_lora(model, clip, "style.safetensors", 1.0, 1.0)
    assert model.patches == () and clip.patches == ()                      # inputs unchanged
    assert len(patched_model.patches) == 1 and len(patched_clip.patches) == 1
    styled = _image(patched_model, patched_clip)
    assert float((styled - plain).abs().max()) > 1e-3
    assert _bit_identical(model.unet, unet_before) and _bit_identical(clip.text_encoders[0], text_before)
    # the prompt encoding changes only through the patched handle
    assert not torch.equal(patched_clip.encode("a red cube")[0], clip.encode("a red cube")[0])
    assert torch.equal(_image(model, clip), plain)


def test_strength_zero_equals_no_lora(sd15, layout):
    model, clip, _ = sd15
    _write(layout, "zero.safetensors", _kohya({"lora_unet_": (model.unet, SD15_UNET_TARGETS)}, seed=6))
    plain = _image(model, clip)
    (only_model,) = LoraLoaderModelOnly().load_lora_model_only(model, "zero.safetensors", 0.0)
    assert only_model is model
    # the patch itself at strength 0, through the sampler's patch path, is exact too
    unet_patch, _ = lora_files.lora_patches(lora_files.load_lora_file(layout / "loras" / "zero.safetensors"),
                                            model.unet, None, strength_model=0.0)
    assert torch.equal(_image(model.replace(patches=(unet_patch,)), clip), plain)
    (at_one,) = LoraLoaderModelOnly().load_lora_model_only(model, "zero.safetensors", 1.0)
    assert not torch.equal(_image(at_one, clip), plain)


def test_two_loras_stack_in_order_of_application(sd15, layout):
    model, clip, _ = sd15
    _write(layout, "a.safetensors", _kohya({"lora_unet_": (model.unet, SD15_UNET_TARGETS[:3])}, seed=8))
    _write(layout, "b.safetensors", _kohya({"lora_unet_": (model.unet, SD15_UNET_TARGETS[2:])}, seed=9))
    once, _ = LoraLoader().load_lora(model, clip, "a.safetensors", 0.5, 0.0)
    twice, clip_out = LoraLoader().load_lora(once, clip, "b.safetensors", -1.0, 1.0)
    assert len(twice.patches) == 2 and clip_out is clip                   # no text entries: CLIP unchanged
    before = _snapshot(model.unet)
    image = _image(twice, clip)
    assert _bit_identical(model.unet, before)
    # stacking the two patches equals one patch holding both deltas
    single = model.replace(patches=(merged(twice.patches),))
    torch.testing.assert_close(image, _image(single, clip), rtol=0, atol=1e-4)
    assert float((image - _image(once, clip)).abs().max()) > 1e-3
