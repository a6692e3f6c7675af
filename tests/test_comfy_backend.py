"""The ComfyUI backend (core/backends/comfy.py) against the diffusers backend, on stand-in ComfyUI objects.

The attn2 replace patch gets the block's projected q/k/v and returns the attention before ``to_out``; a
diffusers processor gets the hidden states and returns after ``to_out``.  Feeding the patch
``attn.to_q(h)``, ``attn.to_k(ctx)``, ``attn.to_v(ctx)`` of the diffusers layer and applying ``attn.to_out``
to its result must give the diffusers backend's processor output for the same adapter (fp32, <= 1e-5), at
every SD1.5 and SDXL site and for both cond/uncond orders.
"""
from __future__ import annotations

import sys

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from fake_comfy import (
    SDXL,
    BaseModel,
    ModelPatcher,
    attention_module,
    extra_options,
    reference_attention,
    run_attn2,
    sd15_model,
    sdxl_model,
)
from ipadapter_nodes.core import application as application_module
from ipadapter_nodes.core.adapter import load_adapter
from ipadapter_nodes.core.application import Application
from ipadapter_nodes.core.backends import comfy
from ipadapter_nodes.core.backends.diffusers import (
    DiffusersModel,
    IPCrossAttnProcessor,
    UNetPatch,
    cross_attention_layers,
)
from ipadapter_nodes.core.embeds import Embeds
from ipadapter_nodes.runtime import tiny
from ipadapter_nodes.runtime.tiny_adapters import make_adapter

TOLERANCE = 1e-5
SCHEDULERS = {"sd15": tiny.SD15_SCHEDULER, "sdxl": tiny.SDXL_SCHEDULER}
CROSS = {"sd15": tiny.TINY_SD15["cross_attention_dim"], "sdxl": tiny.TINY_SDXL["cross_attention_dim"]}
# variant -> (family, feature, feature width of the tiny encoder it reads)
VARIANTS = {
    "sd15": ("sd15", "image_embeds", tiny.TINY_CLIP_VISION["vit-h"]["projection_dim"]),
    "sd15-plus": ("sd15", "hidden_states", tiny.TINY_CLIP_VISION["vit-h"]["hidden_size"]),
    "sdxl": ("sdxl", "image_embeds", tiny.TINY_CLIP_VISION["vit-bigG"]["projection_dim"]),
}

# The sites as ComfyUI names them (reference: unet_attn_blocks.json; IP-Adapter layer order down, up, mid):
# (block, number, transformer blocks in it), in adapter-layer order.
SD15_SITES = [("input", n, 1) for n in (1, 2, 4, 5, 7, 8)] + [("output", n, 1) for n in range(3, 12)] \
    + [("middle", 0, 1)]
SDXL_SITES = [("input", 4, 2), ("input", 5, 2), ("input", 7, 10), ("input", 8, 10), ("output", 0, 10),
              ("output", 1, 10), ("output", 2, 10), ("output", 3, 2), ("output", 4, 2), ("output", 5, 2),
              ("middle", 0, 10)]


def expand(sites):
    return [(block, number, index) for block, number, depth in sites for index in range(depth)]


# ---- fixtures -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    folder = tmp_path_factory.mktemp("comfy-adapters")
    return {name: load_adapter(make_adapter(name, folder / f"{name}.safetensors", seed=seed))
            for seed, name in enumerate(VARIANTS)}


def make_application(adapters, variant: str, seed: int = 0, count: int = 2, **fields) -> Application:
    _, feature, width = VARIANTS[variant]
    g = torch.Generator().manual_seed(seed)
    shape = (count, width) if feature == "image_embeds" else (count, 257, width)
    embeds = Embeds(torch.randn(*shape, generator=g), torch.randn(*shape, generator=g) * 0.1, feature)
    return Application(adapter=adapters[variant], embeds=embeds, **fields)


def patcher(family: str) -> ModelPatcher:
    return ModelPatcher(sd15_model(CROSS["sd15"]) if family == "sd15" else sdxl_model(CROSS["sdxl"]))


def site_inputs(module, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, 16, module.to_q.in_features, generator=g)
    context = torch.randn(batch, 8, module.cross_attention_dim, generator=g)
    return hidden, context


def diffusers_output(patch: UNetPatch, layer, hidden, context, sigma, order):
    """The diffusers backend's processor output at ``layer`` (its UNetPatch caches the projection)."""
    patch.state.sigma, patch.state.cond_or_uncond = sigma, list(order)
    module = patch.layers[layer][1]
    with torch.no_grad():
        return IPCrossAttnProcessor(patch, layer, AttnProcessor2_0())(module, hidden, encoder_hidden_states=context)


def qkv(module, hidden, context):
    with torch.no_grad():
        return module.to_q(hidden), module.to_k(context), module.to_v(context)


# One sampling run's schedule object: every call of a test is in the same run (the projection runs once).
SCHEDULE = torch.tensor([14.6146, 3.0, 0.0])


def options_for(module, key, order, sigma, batch_per_chunk, **more):
    more.setdefault("sample_sigmas", SCHEDULE)
    return extra_options(key[:2], key[2], module.heads, module.inner_dim // module.heads, cond_or_uncond=order,
                         sigma=sigma, batch=batch_per_chunk, **more)


def comfy_output(model, module, key, hidden, context, sigma, order, **more):
    q, k, v = qkv(module, hidden, context)
    options = options_for(module, key, order, sigma, hidden.shape[0] // len(order), **more)
    with torch.no_grad():
        return module.to_out[0](run_attn2(model, q, k, v, options))


# ---- the site table -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,sites", [("sd15", SD15_SITES), ("sdxl", SDXL_SITES)])
def test_block_keys_follow_the_adapter_layer_order(family, sites):
    assert list(comfy.BLOCK_KEYS[family]) == expand(sites)


def test_every_site_gets_a_patch_including_the_middle_block(adapters):
    for family, variant in (("sd15", "sd15"), ("sdxl", "sdxl")):
        patched = comfy.apply_application(patcher(family), make_application(adapters, variant))
        replace = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
        assert sorted(replace) == sorted(comfy.BLOCK_KEYS[family])
        assert ("middle", 0, 0) in replace
        assert [replace[key].layer for key in comfy.BLOCK_KEYS[family]] == list(range(len(replace)))


# ---- same numbers as the diffusers backend --------------------------------------------------------------

@pytest.mark.parametrize("order", [[1, 0], [0, 1]])
@pytest.mark.parametrize("family,variant,scaling", [("sd15", "sd15", "V only"), ("sdxl", "sdxl", "K+V"),
                                                    ("sd15", "sd15-plus", "K+mean(V) w/ C penalty")])
def test_patch_equals_diffusers_backend_at_every_site(unets, adapters, family, variant, scaling, order):
    unet = unets[family]
    layers = len(comfy.BLOCK_KEYS[family])
    # a different weight per layer, so a site mapped to the wrong layer shows
    app = make_application(adapters, variant, embeds_scaling=scaling,
                           layer_weights=tuple(0.4 + 0.05 * i for i in range(layers)))
    patched = comfy.apply_application(patcher(family), app)
    reference = UNetPatch(unet, SCHEDULERS[family], [app])
    worst = 0.0
    for layer, key in enumerate(comfy.BLOCK_KEYS[family]):
        module = reference.layers[layer][1]
        hidden, context = site_inputs(module, 2 * len(order), seed=layer)
        expected = diffusers_output(reference, layer, hidden, context, 3.0, order)
        got = comfy_output(patched, module, key, hidden, context, 3.0, order)
        text = module.to_out[0](reference_attention(*qkv(module, hidden, context), module.heads))
        assert (expected - text).abs().max() > 1e-3, f"the adapter did nothing at {key}"
        worst = max(worst, float((got - expected).abs().max()))
    assert worst <= TOLERANCE


def test_cond_and_uncond_chunks_follow_cond_or_uncond(unets, adapters):
    """Swapping the order of the chunks swaps the rows of the output: [1, 0] is not read as [0, 1]."""
    unet = unets["sd15"]
    module = cross_attention_layers(unet)[0][1]
    patched = comfy.apply_application(patcher("sd15"), make_application(adapters, "sd15"))
    hidden, context = site_inputs(module, 2, seed=3)
    key = comfy.BLOCK_KEYS["sd15"][0]
    out_10 = comfy_output(patched, module, key, hidden, context, 3.0, [1, 0])
    out_01 = comfy_output(patched, module, key, hidden.flip(0), context.flip(0), 3.0, [0, 1])
    assert torch.allclose(out_10, out_01.flip(0), atol=1e-6)
    assert (out_10[0] - out_10[1]).abs().max() > 1e-3


def test_two_applications_stack_on_a_clone(unets, adapters):
    unet = unets["sd15"]
    first = make_application(adapters, "sd15", seed=1, weight=0.8)
    second = make_application(adapters, "sd15-plus", seed=2, weight=0.6, embeds_scaling="K+V")
    once = comfy.apply_application(patcher("sd15"), first)
    twice = comfy.apply_application(once, second)
    assert comfy.applications_of(twice) == (first, second)
    assert comfy.applications_of(once) == (first,)
    both, only_first = UNetPatch(unet, SCHEDULERS["sd15"], [first, second]), UNetPatch(unet, SCHEDULERS["sd15"], [first])
    for layer in (0, 6, 15):
        key = comfy.BLOCK_KEYS["sd15"][layer]
        module = cross_attention_layers(unet)[layer][1]
        hidden, context = site_inputs(module, 4, seed=layer)
        expected = diffusers_output(both, layer, hidden, context, 3.0, [1, 0])
        got = comfy_output(twice, module, key, hidden, context, 3.0, [1, 0])
        assert (got - expected).abs().max() <= TOLERANCE
        expected_first = diffusers_output(only_first, layer, hidden, context, 3.0, [1, 0])
        assert (comfy_output(once, module, key, hidden, context, 3.0, [1, 0]) - expected_first).abs().max() <= TOLERANCE


# ---- wrapping another pack's patch -----------------------------------------------------------------------

class ForeignPatch:
    """Another pack's attn2 replace patch: half the text attention plus a constant; counts calls and moves."""

    def __init__(self):
        self.calls = 0
        self.moved_to = []

    def __call__(self, q, k, v, extra_options):
        self.calls += 1
        return 0.5 * reference_attention(q, k, v, extra_options["n_heads"]) + 0.25

    def to(self, device_or_dtype):
        self.moved_to.append(device_or_dtype)
        return self


@pytest.mark.parametrize("three_tuple", [False, True])
def test_a_foreign_patch_on_the_site_is_wrapped_and_kept(unets, adapters, three_tuple):
    unet = unets["sd15"]
    layer = 15  # the middle block, ("middle", 0, 0)
    key = comfy.BLOCK_KEYS["sd15"][layer]
    assert key == ("middle", 0, 0)
    module = cross_attention_layers(unet)[layer][1]
    app = make_application(adapters, "sd15")
    base = patcher("sd15")
    foreign = ForeignPatch()
    base.set_model_attn2_replace(foreign, key[0], key[1], key[2] if three_tuple else None)
    patched = comfy.apply_application(base, app)
    hidden, context = site_inputs(module, 4, seed=7)
    q, k, v = qkv(module, hidden, context)
    options = options_for(module, key, [1, 0], 3.0, 2)
    with torch.no_grad():
        got = run_attn2(patched, q, k, v, options)
        clean = run_attn2(comfy.apply_application(patcher("sd15"), app), q, k, v, options)
    text = reference_attention(q, k, v, module.heads)
    foreign_out = 0.5 * text + 0.25
    wrapped_copy = patched.model_options["transformer_options"]["patches_replace"]["attn2"][key].previous
    assert wrapped_copy.calls == 1 and foreign.calls == 0  # the clone's copy of it is called, the input's not
    assert torch.allclose(got, foreign_out + (clean - text), atol=1e-6)
    patched.model_patches_to(torch.float16)
    # ComfyUI only sees our patch on the 3-tuple key, so we pass the move on; a 2-tuple entry it moves itself
    assert wrapped_copy.moved_to == [torch.float16] * (1 if three_tuple else 2)


# ---- step range and weight 0: exactly the text attention ----------------------------------------------------

@pytest.mark.parametrize("fields,sigma,active", [
    (dict(start_at=0.5), 14.0, False),      # before start_at (percent_to_sigma(0.5) ~ 1.616)
    (dict(start_at=0.5), 1.0, True),
    (dict(end_at=0.5), 0.5, False),         # after end_at
    (dict(end_at=0.5), 5.0, True),
    (dict(weight=0.0), 3.0, False),
])
def test_outside_the_step_range_or_at_weight_zero_the_output_is_the_text_attention(unets, adapters, fields,
                                                                                   sigma, active):
    unet = unets["sd15"]
    module = cross_attention_layers(unet)[4][1]
    key = comfy.BLOCK_KEYS["sd15"][4]
    patched = comfy.apply_application(patcher("sd15"), make_application(adapters, "sd15", **fields))
    hidden, context = site_inputs(module, 4, seed=11)
    q, k, v = qkv(module, hidden, context)
    with torch.no_grad():
        got = run_attn2(patched, q, k, v, options_for(module, key, [1, 0], sigma, 2))
    text = reference_attention(q, k, v, module.heads)
    if active:
        assert (got - text).abs().max() > 1e-3
    else:
        assert torch.equal(got, text)


def test_a_zero_layer_weight_switches_only_that_site_off(unets, adapters):
    unet = unets["sd15"]
    weights = tuple(0.0 if i == 2 else 1.0 for i in range(16))
    patched = comfy.apply_application(patcher("sd15"), make_application(adapters, "sd15", layer_weights=weights))
    for layer, changed in ((2, False), (3, True)):
        module = cross_attention_layers(unet)[layer][1]
        hidden, context = site_inputs(module, 2, seed=layer)
        q, k, v = qkv(module, hidden, context)
        with torch.no_grad():
            got = run_attn2(patched, q, k, v, options_for(module, comfy.BLOCK_KEYS["sd15"][layer], [0], 3.0, 2))
        assert torch.equal(got, reference_attention(q, k, v, module.heads)) != changed


# ---- dtype and device ------------------------------------------------------------------------------------

def test_to_float16_returns_the_patch_and_kv_follow_the_query_dtype(unets, adapters):
    unet = unets["sd15"]
    module = cross_attention_layers(unet)[0][1]
    key = comfy.BLOCK_KEYS["sd15"][0]
    patched = comfy.apply_application(patcher("sd15"), make_application(adapters, "sd15"))
    patch = patched.model_options["transformer_options"]["patches_replace"]["attn2"][key]
    hidden, context = site_inputs(module, 4, seed=5)
    q, k, v = qkv(module, hidden, context)
    options = options_for(module, key, [1, 0], 3.0, 2)
    with torch.no_grad():
        full = patch(q, k, v, options)
        assert patch.to(torch.float16) is patch and patch.to(torch.device("cpu")) is patch
        half = patch(q.half(), k.half(), v.half(), options)
        again = patch(q, k, v, options)
    assert half.dtype == torch.float16 and again.dtype == torch.float32
    assert (half.float() - full).abs().max() < 2e-2
    assert torch.equal(again, full)


# ---- the run cache --------------------------------------------------------------------------------------

def test_projection_runs_once_per_sampling_run(unets, adapters, monkeypatch):
    calls = []
    original = application_module.project_embeds
    monkeypatch.setattr(application_module, "project_embeds", lambda app: calls.append(1) or original(app))
    unet = unets["sd15"]
    patched = comfy.apply_application(patcher("sd15"), make_application(adapters, "sd15"))

    def step(sigma, schedule, layers=(0, 6, 15)):
        for layer in layers:
            module = cross_attention_layers(unet)[layer][1]
            hidden, context = site_inputs(module, 2, seed=layer)
            q, k, v = qkv(module, hidden, context)
            options = options_for(module, comfy.BLOCK_KEYS["sd15"][layer], [0], sigma, 2)
            if schedule is None:
                del options["sample_sigmas"]
            else:
                options["sample_sigmas"] = schedule
            with torch.no_grad():
                run_attn2(patched, q, k, v, options)

    first_run, second_run = torch.tensor([14.6, 3.0, 0.0]), torch.tensor([14.6, 3.0, 0.0])
    step(14.6, first_run)
    step(3.0, first_run)
    assert len(calls) == 1
    step(14.6, second_run)  # a new sampling call: a new schedule object
    assert len(calls) == 2
    step(5.0, None)         # without sample_sigmas: a sigma below the last one is the same run ...
    assert len(calls) == 2
    step(9.0, None)         # ... and a larger one starts a new run
    assert len(calls) == 3
    patched.model_patches_to(torch.device("cpu"))  # ComfyUI moving (or offloading) the model drops the cache
    step(8.0, None)
    assert len(calls) == 4


# ---- ComfyUI's own objects -------------------------------------------------------------------------------

def test_the_input_patcher_is_never_changed(adapters):
    base = patcher("sd15")
    foreign = ForeignPatch()
    base.set_model_attn2_replace(foreign, "input", 1)
    options = base.model_options["transformer_options"]
    before = dict(options)
    attn2_before = dict(options["patches_replace"]["attn2"])
    patched = comfy.apply_application(base, make_application(adapters, "sd15"))
    assert patched is not base
    assert base.model_options["transformer_options"] is options and dict(options) == before
    assert options["patches_replace"]["attn2"] == attn2_before
    assert comfy.APPLICATIONS_KEY not in options and comfy.applications_of(base) == ()


def test_cloning_a_patched_model_shares_the_application_instead_of_copying_it(unets, adapters):
    app = make_application(adapters, "sd15")
    patched = comfy.apply_application(patcher("sd15"), app)
    clone = patched.clone()
    key = comfy.BLOCK_KEYS["sd15"][0]
    ours = patched.model_options["transformer_options"]["patches_replace"]["attn2"][key]
    theirs = clone.model_options["transformer_options"]["patches_replace"]["attn2"][key]
    assert theirs is not ours and theirs.run is ours.run
    assert comfy.applications_of(clone)[0] is app
    module = cross_attention_layers(unets["sd15"])[0][1]
    hidden, context = site_inputs(module, 2, seed=1)
    assert torch.equal(comfy_output(clone, module, key, hidden, context, 3.0, [0]),
                       comfy_output(patched, module, key, hidden, context, 3.0, [0]))


def test_comfyui_attention_kernel_computes_the_text_part_when_loaded(unets, adapters, monkeypatch):
    seen = []

    def kernel(q, k, v, heads, **kwargs):
        seen.append(heads)
        return reference_attention(q, k, v, heads) * 2.0  # recognisably not ours

    monkeypatch.setitem(sys.modules, comfy.COMFY_ATTENTION_MODULE, attention_module(kernel))
    module = cross_attention_layers(unets["sd15"])[0][1]
    key = comfy.BLOCK_KEYS["sd15"][0]
    patched = comfy.apply_application(patcher("sd15"), make_application(adapters, "sd15", start_at=0.5))
    hidden, context = site_inputs(module, 2, seed=2)
    q, k, v = qkv(module, hidden, context)
    with torch.no_grad():
        got = run_attn2(patched, q, k, v, options_for(module, key, [0], 14.0, 2))  # inactive step
    assert seen == [module.heads]
    assert torch.equal(got, reference_attention(q, k, v, module.heads) * 2.0)


@pytest.mark.parametrize("model,family", [
    (sd15_model(), "sd15"),                        # 16 sites in the unet_config depth lists
    (sdxl_model(), "sdxl"),                        # 70 sites
    (SDXL(dict(context_dim=2048)), "sdxl"),        # no depth lists: the class name
    (BaseModel(dict(context_dim=768)), "sd15"),    # no depth lists, generic class: the context width
])
def test_model_family_from_the_unet(model, family):
    assert comfy.model_family(ModelPatcher(model)) == family


def test_a_model_of_another_family_is_refused():
    with pytest.raises(ValueError, match="neither SD1.5"):
        comfy.model_family(ModelPatcher(BaseModel(dict(context_dim=1024))))


def test_an_adapter_for_the_other_family_is_refused_with_both_layer_counts(adapters):
    with pytest.raises(ValueError, match=r"70 cross-attention layers.*SD1\.5 model has 16"):
        comfy.apply_application(patcher("sd15"), make_application(adapters, "sdxl"))


def test_is_comfy_model_tells_a_model_patcher_from_the_headless_model():
    assert comfy.is_comfy_model(patcher("sd15"))
    assert not comfy.is_comfy_model(DiffusersModel(unet=None, family="sd15", scheduler_config={}))
    assert not comfy.is_comfy_model(object())
    with pytest.raises(TypeError, match="ModelPatcher"):
        comfy.apply_application(object(), None)


@pytest.mark.parametrize("family,variant,weight_type", [("sd15", "sd15", "style transfer precise"),
                                                         ("sdxl", "sdxl", "composition precise")])
def test_patch_with_a_mask_and_a_precise_type_equals_diffusers_backend(unets, adapters, family, variant, weight_type):
    """A 4x4-token latent (16 query tokens at every site, as site_inputs gives): ComfyUI's original_shape and
    activations_shape against the diffusers backend's latent size, same mask, same numbers."""
    from ipadapter_nodes.core import weighting

    unet = unets[family]
    mask = torch.zeros(2, 24, 24)
    mask[0, :, :12] = 1.0
    mask[1, 6:18, 6:18] = 0.5  # one mask per latent, not binary
    lw = weighting.layer_weights(weight_type, 0.9, family, boost=1.4)
    app = make_application(adapters, variant, layer_weights=lw.cond, uncond_layer_weights=lw.uncond, attn_mask=mask)
    patched = comfy.apply_application(patcher(family), app)
    reference = UNetPatch(unet, SCHEDULERS[family], [app])
    reference.state.latent_hw = (4, 4)
    worst, swapped_seen = 0.0, False
    for layer, key in enumerate(comfy.BLOCK_KEYS[family]):
        module = reference.layers[layer][1]
        hidden, context = site_inputs(module, 4, seed=layer)
        expected = diffusers_output(reference, layer, hidden, context, 3.0, [1, 0])
        q, k, v = qkv(module, hidden, context)
        options = options_for(module, key, [1, 0], 3.0, 2)
        options.update(original_shape=[4, 4, 4, 4], activations_shape=[4, module.inner_dim, 4, 4])
        with torch.no_grad():
            got = module.to_out[0](run_attn2(patched, q, k, v, options))
        worst = max(worst, float((got - expected).abs().max()))
        if lw.uncond[layer]:
            swapped_seen = True
            text = module.to_out[0](reference_attention(*qkv(module, hidden, context), module.heads))
            assert torch.allclose(got[2:], text[2:], atol=1e-6)          # cond rows: text only
            assert (got[:2] - text[:2]).abs().max() > 1e-4               # uncond rows: the reference
    assert swapped_seen and worst <= TOLERANCE
