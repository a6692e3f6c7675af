"""The diffusers backend (core/backends/diffusers.py) against diffusers' own IP-Adapter path.

One UNet forward with identical inputs: our patched UNet vs a copy of the same UNet with the same adapter
file loaded by ``pipe.load_ip_adapter``; max abs difference <= 1e-5 in fp32.  Then the backend's own
promises: weight 0 and steps outside start/end are bit-identical to the unpatched UNet, the processors are
restored, the projection runs once per sampling call.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from ipadapter_nodes.core.adapter import load_adapter
from ipadapter_nodes.core.application import Application
from ipadapter_nodes.core.backends.diffusers import DiffusersModel, NoiseSchedule, patched_unet
from ipadapter_nodes.core.embeds import encode_for_adapter
from ipadapter_nodes.core.encode import load_clip_vision
from ipadapter_nodes.runtime import tiny
from ipadapter_nodes.runtime.tiny_adapters import make_adapter

TOLERANCE = 1e-5
# variant -> (family, encoder) of the tiny models it fits
VARIANTS = {
    "sd15": ("sd15", "tiny-vit-h"),
    "sd15-plus": ("sd15", "tiny-vit-h"),
    "sd15-plus-face": ("sd15", "tiny-vit-h"),
    "sd15-full-face": ("sd15", "tiny-vit-h"),
    "faceid-plus-sd15": ("sd15", "tiny-vit-h"),
    "faceid-sd15": ("sd15", None),
    "portrait-sd15": ("sd15", None),
    "sdxl": ("sdxl", "tiny-vit-bigG"),
    "sdxl-plus-vit-h": ("sdxl", "tiny-vit-h"),
    "faceid-plusv2-sdxl": ("sdxl", "tiny-vit-h"),
    "portrait-unnorm-sdxl": ("sdxl", None),
}


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ipadapter")
    for seed, variant in enumerate(VARIANTS):
        make_adapter(variant, folder / f"{variant}.safetensors", seed=seed)
    return folder


@pytest.fixture(scope="module")
def pipes(tiny_models_dir):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    root = Path(tiny_models_dir)
    return {
        "sd15": StableDiffusionPipeline.from_pretrained(root / tiny.TINY_PATHS["tiny-sd15"], safety_checker=None),
        "sdxl": StableDiffusionXLPipeline.from_pretrained(root / tiny.TINY_PATHS["tiny-sdxl"]),
    }


@pytest.fixture(scope="module")
def encoders(tiny_models_dir):
    root = Path(tiny_models_dir)
    return {name: load_clip_vision(root / tiny.TINY_PATHS[name]) for name in ("tiny-vit-h", "tiny-vit-bigG")}


def diffusers_unet(pipe, folder: Path, variants: list[str], scales: list[float]):
    """A copy of ``pipe``'s UNet with the adapters loaded by diffusers' own loader."""
    twin = type(pipe)(**{**pipe.components, "unet": copy.deepcopy(pipe.unet)})
    twin.load_ip_adapter(str(folder), subfolder="", weight_name=[f"{v}.safetensors" for v in variants],
                         image_encoder_folder=None)
    twin.set_ip_adapter_scale(scales)
    return twin.unet


def unet_inputs(family: str, batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    cross = tiny.TINY_SD15["cross_attention_dim"] if family == "sd15" else tiny.TINY_SDXL["cross_attention_dim"]
    inputs = dict(sample=torch.randn(batch, 4, 8, 8, generator=g), timestep=torch.tensor(500),
                  encoder_hidden_states=torch.randn(batch, 77, cross, generator=g), added_cond_kwargs={})
    if family == "sdxl":
        inputs["added_cond_kwargs"] = dict(text_embeds=torch.randn(batch, tiny.TINY_SDXL["pooled_dim"], generator=g),
                                           time_ids=torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch))
    return inputs


def reference_images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 224, 224, 3, generator=torch.Generator().manual_seed(seed))


def embeds_for(adapter, encoders, variant: str, count: int, seed: int = 0):
    encoder = encoders.get(VARIANTS[variant][1])
    faces = None
    if adapter.spec.kind.startswith(("faceid", "portrait")):
        faces = torch.randn(count, 512, generator=torch.Generator().manual_seed(seed + 100))
    return encode_for_adapter(encoder, adapter.spec, reference_images(count, seed), uncond="diffusers",
                              face_embeds=faces)


def diffusers_image_embeds(embeds, kind: str) -> torch.Tensor:
    """diffusers' per-adapter layout for a CFG batch of one prompt: [2, n_img, ...], uncond first."""
    stacked = torch.stack([embeds.uncond, embeds.cond])
    # Portrait-unnorm runs a resampler over the face embedding as a one-token sequence
    return stacked.unsqueeze(2) if kind == "portrait-unnorm" else stacked


def run_ours(pipe, family, applications, inputs, cond_or_uncond=(1, 0), sigma=None):
    model = DiffusersModel(pipe.unet, family, dict(pipe.scheduler.config), applications=tuple(applications))
    with torch.no_grad(), patched_unet(model) as state:
        state.cond_or_uncond = list(cond_or_uncond)
        state.sigma = sigma
        return pipe.unet(**inputs).sample


def run_plain(unet, inputs):
    with torch.no_grad():
        return unet(**inputs).sample


@pytest.fixture(scope="module")
def plain_outputs(pipes) -> dict:
    """The unpatched UNet's output on ``unet_inputs(family)``, per family (computed once)."""
    return {family: run_plain(pipe.unet, unet_inputs(family)) for family, pipe in pipes.items()}


CASES = [
    # (adapters, images per adapter, weights, faceid v2 weight)
    pytest.param(["sd15"], [1], [1.0], None, id="sd15-base"),
    pytest.param(["sd15-plus"], [1], [0.8], None, id="sd15-plus"),
    pytest.param(["sd15-plus-face"], [1], [1.0], None, id="sd15-plus-face"),
    pytest.param(["sd15-full-face"], [1], [1.0], None, id="sd15-full-face"),
    pytest.param(["faceid-plus-sd15"], [1], [1.0], None, id="sd15-faceid-plus"),
    pytest.param(["faceid-plus-sd15"], [1], [1.0], 0.7, id="sd15-faceid-plusv2"),
    pytest.param(["faceid-sd15"], [1], [1.0], None, id="sd15-faceid"),
    pytest.param(["portrait-sd15"], [3], [1.0], None, id="sd15-portrait-3-faces"),
    pytest.param(["sd15-plus"], [3], [1.0], None, id="sd15-plus-3-images"),
    pytest.param(["sd15", "sd15-plus"], [2, 1], [0.6, 1.3], None, id="sd15-two-adapters"),
    pytest.param(["sdxl-plus-vit-h"], [2], [0.9], None, id="sdxl-plus-2-images"),
    pytest.param(["faceid-plusv2-sdxl"], [1], [1.0], 1.5, id="sdxl-faceid-plusv2"),
    pytest.param(["portrait-unnorm-sdxl"], [2], [1.0], None, id="sdxl-portrait-unnorm"),
    pytest.param(["sdxl", "sdxl-plus-vit-h"], [1, 1], [0.5, 1.0], None, id="sdxl-two-adapters"),
]


@pytest.mark.parametrize("variants, counts, weights, v2", CASES)
def test_unet_output_equals_diffusers(pipes, encoders, adapters_dir, plain_outputs, variants, counts, weights, v2):
    family = VARIANTS[variants[0]][0]
    pipe = pipes[family]
    applications, image_embeds = [], []
    for i, (variant, count, weight) in enumerate(zip(variants, counts, weights)):
        adapter = load_adapter(adapters_dir / f"{variant}.safetensors")
        embeds = embeds_for(adapter, encoders, variant, count, seed=i)
        applications.append(Application(adapter, embeds, weight=weight,
                                         faceid_v2_weight=v2 if embeds.clip_cond is not None else None))
        image_embeds.append(diffusers_image_embeds(embeds, adapter.spec.kind))
    inputs = unet_inputs(family)

    theirs_unet = diffusers_unet(pipe, adapters_dir, variants, weights)
    for layer, app in zip(theirs_unet.encoder_hid_proj.image_projection_layers, applications):
        if app.embeds.clip_cond is not None:  # FaceID-Plus: diffusers keeps the CLIP half as module state
            layer.clip_embeds = torch.stack([app.embeds.clip_uncond, app.embeds.clip_cond])
            layer.shortcut = v2 is not None
            layer.shortcut_scale = 1.0 if v2 is None else v2
    theirs = run_plain(theirs_unet, {**inputs, "added_cond_kwargs": {**inputs["added_cond_kwargs"],
                                                                      "image_embeds": image_embeds}})
    ours = run_ours(pipe, family, applications, inputs)
    plain = plain_outputs[family]

    assert (ours - plain).abs().max() > 1e-3, "the adapter must change the output for this test to mean anything"
    assert (ours - theirs).abs().max() <= TOLERANCE


def test_without_cfg_the_batch_takes_the_cond_tokens(pipes, encoders, adapters_dir):
    pipe = pipes["sd15"]
    adapter = load_adapter(adapters_dir / "sd15-plus.safetensors")
    embeds = embeds_for(adapter, encoders, "sd15-plus", 1)
    inputs = unet_inputs("sd15", batch=1)
    theirs_unet = diffusers_unet(pipe, adapters_dir, ["sd15-plus"], [1.0])
    theirs = run_plain(theirs_unet, {**inputs, "added_cond_kwargs": {"image_embeds": [embeds.cond[None]]}})
    ours = run_ours(pipe, "sd15", [Application(adapter, embeds)], inputs, cond_or_uncond=[0])
    assert (ours - theirs).abs().max() <= TOLERANCE


# ---- the backend's own promises ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd15_base(pipes, encoders, adapters_dir):
    adapter = load_adapter(adapters_dir / "sd15.safetensors")
    return adapter, embeds_for(adapter, encoders, "sd15", 1)


def test_weight_zero_is_bit_identical_to_the_unpatched_unet(pipes, sd15_base, plain_outputs):
    adapter, embeds = sd15_base
    inputs = unet_inputs("sd15")
    plain = plain_outputs["sd15"]
    ours = run_ours(pipes["sd15"], "sd15", [Application(adapter, embeds, weight=0.0)], inputs)
    assert torch.equal(ours, plain)


def test_zero_layer_weights_skip_only_those_layers(pipes, sd15_base, plain_outputs):
    adapter, embeds = sd15_base
    inputs = unet_inputs("sd15")
    plain = plain_outputs["sd15"]
    none_active = Application(adapter, embeds, layer_weights=(0.0,) * 16)
    assert torch.equal(run_ours(pipes["sd15"], "sd15", [none_active], inputs), plain)
    mid_only = Application(adapter, embeds, layer_weights=(0.0,) * 15 + (1.0,))  # layer 15 = mid block
    assert (run_ours(pipes["sd15"], "sd15", [mid_only], inputs) - plain).abs().max() > 1e-4


def test_outside_start_end_is_bit_identical_and_inside_is_not(pipes, sd15_base, plain_outputs):
    adapter, embeds = sd15_base
    schedule = NoiseSchedule.from_config(dict(pipes["sd15"].scheduler.config))
    app = Application(adapter, embeds, start_at=0.25, end_at=0.5)
    start, end = schedule.percent_to_sigma(0.25), schedule.percent_to_sigma(0.5)
    inputs = unet_inputs("sd15")
    plain = plain_outputs["sd15"]
    for sigma in (start * 1.01, end * 0.99):
        assert torch.equal(run_ours(pipes["sd15"], "sd15", [app], inputs, sigma=sigma), plain)
    for sigma in (start, (start + end) / 2, end):
        assert (run_ours(pipes["sd15"], "sd15", [app], inputs, sigma=sigma) - plain).abs().max() > 1e-4


def test_percent_to_sigma_matches_comfyui_for_sd15(pipes):
    schedule = NoiseSchedule.from_config(dict(pipes["sd15"].scheduler.config))
    # values ComfyUI reports for SD1.5 (model_sampling.percent_to_sigma)
    for percent, sigma in ((0.25, 4.086), (0.5, 1.616), (0.75, 0.695)):
        assert schedule.percent_to_sigma(percent) == pytest.approx(sigma, abs=1e-3)
    assert schedule.percent_to_sigma(0.0) > 1e8 and schedule.percent_to_sigma(1.0) == 0.0
    assert schedule.sigma(999) == pytest.approx(14.6146, abs=1e-3)


def test_processors_are_restored_after_the_call_and_after_an_error(pipes, sd15_base):
    adapter, embeds = sd15_base
    unet = pipes["sd15"].unet
    before = dict(unet.attn_processors)
    model = DiffusersModel(unet, "sd15", dict(pipes["sd15"].scheduler.config),
                           applications=(Application(adapter, embeds),))
    with patched_unet(model):
        during = unet.attn_processors
        swapped = [name for name in before if during[name] is not before[name]]
        assert len(swapped) == 16 and all(name.endswith("attn2.processor") for name in swapped)
        assert any(name.startswith("mid_block") for name in swapped)
    assert all(unet.attn_processors[name] is proc for name, proc in before.items())
    with pytest.raises(KeyboardInterrupt):
        with patched_unet(model):
            raise KeyboardInterrupt
    assert all(unet.attn_processors[name] is proc for name, proc in before.items())


def test_projection_and_kv_run_once_per_sampling_call(pipes, sd15_base):
    adapter, embeds = sd15_base
    calls = []
    hook = adapter.image_proj.register_forward_hook(lambda *args: calls.append(1))
    try:
        model = DiffusersModel(pipes["sd15"].unet, "sd15", dict(pipes["sd15"].scheduler.config),
                               applications=(Application(adapter, embeds),))
        inputs = unet_inputs("sd15")
        outputs = []
        with torch.no_grad(), patched_unet(model) as state:
            state.cond_or_uncond = [1, 0]
            for sigma in (14.0, 5.0, 1.0, 0.1):
                state.sigma = sigma
                outputs.append(pipes["sd15"].unet(**inputs).sample)
        assert len(calls) == 1
        assert torch.equal(outputs[0], outputs[1])  # same timestep input, same cached K/V
        with patched_unet(model):
            with torch.no_grad():
                pipes["sd15"].unet(**inputs)
        assert len(calls) == 2  # a new sampling call projects again
    finally:
        hook.remove()


def test_kv_follow_the_query_dtype_of_a_float64_unet(pipes, sd15_base):
    adapter, embeds = sd15_base
    inputs = unet_inputs("sd15")
    unet64 = copy.deepcopy(pipes["sd15"].unet).double()
    inputs64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}
    model = DiffusersModel(unet64, "sd15", dict(pipes["sd15"].scheduler.config),
                           applications=(Application(adapter, embeds),))
    with torch.no_grad(), patched_unet(model) as state:
        state.cond_or_uncond = [1, 0]
        out64 = unet64(**inputs64).sample
    out32 = run_ours(pipes["sd15"], "sd15", [Application(adapter, embeds)], inputs)
    assert out64.dtype == torch.float64
    assert (out64 - out32.double()).abs().max() <= TOLERANCE


def test_unfold_batch_gives_reference_i_to_latent_i(pipes, encoders, adapters_dir):
    adapter = load_adapter(adapters_dir / "sd15-plus.safetensors")
    embeds = embeds_for(adapter, encoders, "sd15-plus", 2)
    inputs = unet_inputs("sd15", batch=4)  # [uncond 0, uncond 1, cond 0, cond 1]
    together = run_ours(pipes["sd15"], "sd15", [Application(adapter, embeds, unfold_batch=True)], inputs)
    for i in range(2):
        single = type(embeds)(embeds.cond[i:i + 1], embeds.uncond[i:i + 1], embeds.feature)
        rows = [i, 2 + i]
        alone = run_ours(pipes["sd15"], "sd15", [Application(adapter, single)],
                         {**inputs, "sample": inputs["sample"][rows],
                          "encoder_hidden_states": inputs["encoder_hidden_states"][rows]})
        assert (together[rows] - alone).abs().max() <= TOLERANCE
    concatenated = run_ours(pipes["sd15"], "sd15", [Application(adapter, embeds)], inputs)
    assert (together - concatenated).abs().max() > 1e-4


def test_k_plus_v_at_weight_one_equals_v_only(pipes, sd15_base):
    adapter, embeds = sd15_base
    inputs = unet_inputs("sd15")
    v_only = run_ours(pipes["sd15"], "sd15", [Application(adapter, embeds)], inputs)
    k_v = run_ours(pipes["sd15"], "sd15", [Application(adapter, embeds, embeds_scaling="K+V")], inputs)
    penalty = run_ours(pipes["sd15"], "sd15", [Application(adapter, embeds, embeds_scaling="K+V w/ C penalty")], inputs)
    assert torch.allclose(v_only, k_v, atol=1e-6)
    assert (v_only - penalty).abs().max() > 1e-4


def test_an_adapter_for_another_family_is_refused_by_name(pipes, encoders, adapters_dir):
    adapter = load_adapter(adapters_dir / "sdxl.safetensors")
    embeds = embeds_for(adapter, encoders, "sdxl", 1)
    with pytest.raises(ValueError, match=r"sdxl\.safetensors.*70.*16"):
        run_ours(pipes["sd15"], "sd15", [Application(adapter, embeds)], unet_inputs("sd15"))
