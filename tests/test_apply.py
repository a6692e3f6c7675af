"""The apply contract (core/apply.py) and how its weights reach the layers of a real UNet.

* Per-layer weights: a spy on the image terms of every cross-attention layer in one tiny UNet call shows
  each weight type's map arriving at the right layer (SDXL style transfer only at up_blocks.0.attentions.1,
  the middle block weighted).
* The precise swap: at a swapped layer the cond chunk's output is exactly the text-only output and the
  uncond chunk gets the reference term; elsewhere both chunks are as with a plain weight.
* Per-frame weights with unfold_batch: a frame of weight 0 is exactly the no-adapter output.
* The contract's inputs: embeds instead of images, overrides, boost, encode_batch_size, errors naming the node.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from ipadapter_nodes.core import apply as engine
from ipadapter_nodes.core import weighting
from ipadapter_nodes.core.adapter import load_adapter
from ipadapter_nodes.core.application import Application
from ipadapter_nodes.core.backends import diffusers as backend
from ipadapter_nodes.core.backends.diffusers import DiffusersModel, IPCrossAttnProcessor, UNetPatch, patched_unet
from ipadapter_nodes.core.embeds import Embeds, combine_embeds
from ipadapter_nodes.core.encode import load_clip_vision
from ipadapter_nodes.runtime import tiny
from ipadapter_nodes.runtime.tiny_adapters import make_adapter

TOLERANCE = 1e-5
CROSS = {"sd15": tiny.TINY_SD15["cross_attention_dim"], "sdxl": tiny.TINY_SDXL["cross_attention_dim"]}
WIDTH = {"sd15": tiny.TINY_CLIP_VISION["vit-h"]["projection_dim"],
         "sdxl": tiny.TINY_CLIP_VISION["vit-bigG"]["projection_dim"]}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    folder = tmp_path_factory.mktemp("apply")
    names = ("sd15", "sdxl", "sd15-plus", "faceid-sd15")
    return {name: load_adapter(make_adapter(name, folder / f"{name}.safetensors", seed=seed))
            for seed, name in enumerate(names)}


def embeds_for(family: str, count: int = 1, seed: int = 0) -> Embeds:
    g = torch.Generator().manual_seed(seed)
    return Embeds(torch.randn(count, WIDTH[family], generator=g), torch.zeros(count, WIDTH[family]), "image_embeds")


def headless(unets, family: str) -> DiffusersModel:
    return DiffusersModel(unets[family], family, dict(tiny.SD15_SCHEDULER if family == "sd15" else tiny.SDXL_SCHEDULER))


def unet_inputs(family: str, batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    inputs = dict(sample=torch.randn(batch, 4, 8, 8, generator=g), timestep=torch.tensor(500),
                  encoder_hidden_states=torch.randn(batch, 77, CROSS[family], generator=g))
    if family == "sdxl":
        inputs["added_cond_kwargs"] = dict(text_embeds=torch.randn(batch, tiny.TINY_SDXL["pooled_dim"], generator=g),
                                           time_ids=torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch))
    return inputs


def run(model: DiffusersModel, inputs: dict, order=(1, 0)) -> torch.Tensor:
    with torch.no_grad(), patched_unet(model) as state:
        state.cond_or_uncond = list(order)
        return model.unet(**inputs).sample


def term_weights_per_layer(model: DiffusersModel, family: str, monkeypatch) -> dict[int, list]:
    """{layer: [term weights]} of one UNet call ([1, 0] batch), from a spy on the backend's image terms."""
    seen: dict[int, list] = {}
    original = backend.image_terms

    def spy(entries, layer, *args, **kwargs):
        terms = original(entries, layer, *args, **kwargs)
        seen[layer] = [t.weight for t in terms]
        return terms

    monkeypatch.setattr(backend, "image_terms", spy)
    run(model, unet_inputs(family))
    return seen


# ---- per-layer weights reach the right layers ------------------------------------------------------------

def test_sdxl_style_transfer_acts_only_at_the_style_block(unets, adapters, monkeypatch):
    model = engine.apply_ipadapter(headless(unets, "sdxl"), adapters["sdxl"], embeds=embeds_for("sdxl"),
                                   weight=0.8, weight_type="style transfer", node="Test")
    seen = term_weights_per_layer(model, "sdxl", monkeypatch)
    assert sorted(seen) == list(range(34, 44))  # up_blocks.0.attentions.1: 10 transformer layers
    assert all(weights == [pytest.approx(0.8)] for weights in seen.values())


@pytest.mark.parametrize("family,weight_type", [("sd15", "weak middle"), ("sd15", "ease in"),
                                                ("sdxl", "strong middle"), ("sdxl", "composition")])
def test_every_layer_gets_the_weight_of_its_type(unets, adapters, monkeypatch, family, weight_type):
    model = engine.apply_ipadapter(headless(unets, family), adapters[family], embeds=embeds_for(family),
                                   weight=0.9, weight_type=weight_type, node="Test")
    seen = term_weights_per_layer(model, family, monkeypatch)
    expected = weighting.layer_weights(weight_type, 0.9, family).cond
    assert {layer: w[0] for layer, w in seen.items()} == pytest.approx(
        {layer: w for layer, w in enumerate(expected) if w != 0})
    if weight_type in ("weak middle", "strong middle"):  # the middle block is weighted, not skipped
        middle = 15 if family == "sd15" else 60
        assert seen[middle] == [pytest.approx(0.9 * (0.2 if weight_type == "weak middle" else 1.0))]


# ---- the precise swap ----------------------------------------------------------------------------------------

def _site(unets, family, layer, seed=0):
    patch = UNetPatch(unets[family], None, [])
    module = patch.layers[layer][1]
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 16, module.to_q.in_features, generator=g)
    context = torch.randn(2, 8, module.cross_attention_dim, generator=g)
    return patch, module, hidden, context


def _processor_output(patch, module, layer, hidden, context, applications):
    patch.set_applications(applications)
    patch.state.cond_or_uncond = [1, 0]  # row 0 uncond, row 1 cond
    with torch.no_grad():
        return IPCrossAttnProcessor(patch, layer, AttnProcessor2_0())(module, hidden, encoder_hidden_states=context)


@pytest.mark.parametrize("family,weight_type,swapped,kept", [
    ("sd15", "style transfer precise", 5, 2), ("sdxl", "style transfer precise", 20, 40),
    ("sdxl", "composition precise", 40, 20)])
def test_precise_types_move_the_reference_to_the_uncond_branch_at_the_swapped_layers(
        unets, adapters, family, weight_type, swapped, kept):
    lw = weighting.layer_weights(weight_type, 0.8, family, boost=1.3)
    assert lw.uncond[swapped] != 0 and lw.cond[swapped] == 0 and lw.uncond[kept] == 0 and lw.cond[kept] != 0
    embeds = embeds_for(family, seed=3)
    precise = Application(adapters[family], embeds, layer_weights=lw.cond, uncond_layer_weights=lw.uncond)
    # the reference on both branches, at the swapped layer's weight: its uncond row is the expected one
    reference_both = Application(adapters[family], Embeds(embeds.cond, embeds.cond, embeds.feature),
                                 weight=lw.uncond[swapped])
    patch, module, hidden, context = _site(unets, family, swapped)
    got = _processor_output(patch, module, swapped, hidden, context, [precise])
    text = _processor_output(patch, module, swapped, hidden, context, [])
    expected_uncond = _processor_output(patch, module, swapped, hidden, context, [reference_both])[0]
    assert torch.equal(got[1], text[1])                       # cond: text only, exactly
    assert (got[0] - text[0]).abs().max() > 1e-3              # uncond: the reference term is there
    assert (got[0] - expected_uncond).abs().max() <= TOLERANCE
    # at a layer that is not swapped, both rows are as with a plain weight
    patch, module, hidden, context = _site(unets, family, kept, seed=1)
    got = _processor_output(patch, module, kept, hidden, context, [precise])
    plain = _processor_output(patch, module, kept, hidden, context, [Application(adapters[family], embeds,
                                                                               weight=lw.cond[kept])])
    assert (got - plain).abs().max() <= TOLERANCE


def test_apply_passes_the_precise_swap_and_boost_to_the_application(unets, adapters):
    model = engine.apply_ipadapter(headless(unets, "sdxl"), adapters["sdxl"], embeds=embeds_for("sdxl"),
                                   weight=0.8, weight_type="composition precise", boost=0.3, node="Test")
    (app,) = model.applications
    expected = weighting.layer_weights("composition precise", 0.8, "sdxl", boost=0.3)
    assert (app.layer_weights, app.uncond_layer_weights) == (expected.cond, expected.uncond)


# ---- per-frame weights -----------------------------------------------------------------------------------------

def test_a_frame_of_weight_zero_is_the_no_adapter_output(unets, adapters):
    inputs = unet_inputs("sd15", batch=4)  # [uncond 0, uncond 1, cond 0, cond 1]
    embeds = embeds_for("sd15", count=2, seed=4)
    model = engine.apply_ipadapter(headless(unets, "sd15"), adapters["sd15"], embeds=embeds, weight=[0.0, 0.8],
                                   weight_type="ease out", unfold_batch=True, node="IPAdapterBatch")
    together = run(model, inputs)
    plain = run(headless(unets, "sd15"), inputs)
    assert torch.equal(together[[0, 2]], plain[[0, 2]])
    alone = engine.apply_ipadapter(headless(unets, "sd15"), adapters["sd15"],
                                   embeds=Embeds(embeds.cond[1:], embeds.uncond[1:], embeds.feature), weight=0.8,
                                   weight_type="ease out", node="IPAdapterBatch")
    rows = [1, 3]
    single = run(alone, {**inputs, "sample": inputs["sample"][rows],
                         "encoder_hidden_states": inputs["encoder_hidden_states"][rows]})
    assert (together[rows] - plain[rows]).abs().max() > 1e-3
    assert (together[rows] - single).abs().max() <= TOLERANCE


def test_per_frame_tables_follow_the_weight_type_per_frame(unets, adapters):
    model = engine.apply_ipadapter(headless(unets, "sd15"), adapters["sd15"], embeds=embeds_for("sd15", 3),
                                   weight=[0.2, 0.5, 1.0], weight_type="style transfer precise", boost=2.0,
                                   unfold_batch=True, node="Test")
    (app,) = model.applications
    for frame, w in enumerate((0.2, 0.5, 1.0)):
        expected = weighting.layer_weights("style transfer precise", w, "sd15", boost=2.0)
        assert app.frame_layer_weights[frame] == expected.cond
        assert app.frame_uncond_layer_weights[frame] == expected.uncond
    without_unfold = engine.apply_ipadapter(headless(unets, "sd15"), adapters["sd15"], embeds=embeds_for("sd15"),
                                            weight=[0.2, 0.5], node="Test").applications[0]
    assert without_unfold.weight == 0.2 and without_unfold.frame_layer_weights is None  # the pack's rule


# ---- the contract's inputs -------------------------------------------------------------------------------------

def test_a_layer_weights_override_replaces_the_weight_type(unets, adapters):
    override = weighting.LayerWeights(tuple(0.1 * i for i in range(16)))
    (app,) = engine.apply_ipadapter(headless(unets, "sd15"), adapters["sd15"], embeds=embeds_for("sd15"),
                                    weight=5.0, weight_type="ease in", layer_weights=override).applications
    assert app.layer_weights == override.cond and app.uncond_layer_weights is None


def test_faceid_adapters_take_embeds_but_refuse_images(unets, adapters):
    faces = Embeds(torch.randn(1, 512), torch.zeros(1, 512), "face")
    (app,) = engine.apply_ipadapter(headless(unets, "sd15"), adapters["faceid-sd15"], embeds=faces).applications
    assert app.embeds is faces
    with pytest.raises(ValueError, match="IPAdapterAdvanced: .*FaceID-type adapter.*IPAdapterFaceID"):
        engine.apply_ipadapter(headless(unets, "sd15"), adapters["faceid-sd15"], object(), torch.rand(1, 32, 32, 3))


def test_errors_name_the_node(unets, adapters):
    model, adapter = headless(unets, "sd15"), adapters["sd15"]
    cases = [
        (dict(), "MyNode: give the reference either as 'image'.*neither"),
        (dict(embeds=embeds_for("sd15"), image=torch.rand(1, 8, 8, 3)), "MyNode: .*not both"),
        (dict(embeds=embeds_for("sd15"), boost=1.0), "MyNode: a boost .* only applies"),
        (dict(embeds=embeds_for("sd15"), layer_weights=(1.0,) * 3), "MyNode: layer_weights has 3 entries"),
        (dict(embeds=embeds_for("sd15"), weight=[], unfold_batch=True), "MyNode: the weight list is empty"),
        (dict(embeds=embeds_for("sd15"), attn_mask=torch.ones(2, 2, 2, 2, 2)), "MyNode: attn_mask"),
        (dict(embeds=embeds_for("sd15"), combine_embeds="median"), "MyNode: combine_embeds 'median'"),
    ]
    for inputs, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            engine.apply_ipadapter(model, adapter, node="MyNode", **inputs)


@pytest.fixture(scope="module")
def vit_h(tiny_models_dir):
    return load_clip_vision(Path(tiny_models_dir) / tiny.TINY_PATHS["tiny-vit-h"])


def test_encode_batch_size_gives_the_same_embeds_in_chunks(adapters, vit_h):
    images = torch.rand(5, 64, 64, 3, generator=torch.Generator().manual_seed(5))
    negative = torch.rand(5, 64, 64, 3, generator=torch.Generator().manual_seed(6))
    whole = engine.encode_images(adapters["sd15-plus"], vit_h, images, negative)
    chunked = engine.encode_images(adapters["sd15-plus"], vit_h, images, negative, encode_batch_size=2)
    assert chunked.count == 5
    assert torch.allclose(whole.cond, chunked.cond, atol=1e-5)
    assert torch.allclose(whole.uncond, chunked.uncond, atol=1e-5)
    averaged = engine.encode_images(adapters["sd15-plus"], vit_h, images, combine_embeds="average")
    assert averaged.count == 1 and torch.allclose(averaged.cond, whole.cond.mean(0, keepdim=True), atol=1e-5)


def test_combine_embeds_max_and_min_are_element_wise_over_all_given_images():
    first = Embeds(torch.tensor([[1.0, -2.0], [0.0, 5.0]]), torch.zeros(2, 2), "image_embeds")
    second = Embeds(torch.tensor([[3.0, -4.0]]), torch.ones(1, 2), "image_embeds")
    assert torch.equal(combine_embeds([first, second], "max").cond, torch.tensor([[3.0, 5.0]]))
    assert torch.equal(combine_embeds([first, second], "min").cond, torch.tensor([[0.0, -4.0]]))
    assert torch.equal(combine_embeds([first, second], "min").uncond, torch.zeros(1, 2))
    concatenated = combine_embeds([first, second], "concat")
    assert concatenated.count == 3 and torch.equal(concatenated.uncond[2], torch.ones(2))
    with pytest.raises(ValueError, match="embeds 2 hold hidden_states"):
        combine_embeds([first, Embeds(torch.zeros(1, 3, 2), torch.zeros(1, 3, 2), "hidden_states")], "add")
