"""KSampler / KSamplerAdvanced headless: ComfyUI's schedules and semantics, diffusers' schedulers as the oracle.

The real tiny UNets (``runtime.tiny``) are used where the UNet call itself is under test (Euler against a
hand-written diffusers loop, SDXL time ids, the KSamplerAdvanced split); a toy stand-in with the UNet's call
signature keeps the sampler × scheduler matrix and the step-rule oracles fast.
"""
from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import (DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler)

from ipadapter_nodes.core.backends.diffusers import DiffusersModel, SamplingState
from ipadapter_nodes.runtime import sampling, sigma_schedules, tiny
from ipadapter_nodes.runtime.standard_nodes.sampler import KSampler, KSamplerAdvanced

SD15_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                     beta_schedule="scaled_linear", prediction_type="epsilon")


# ------------------------------------------------------------------------------------------------ helpers
class ToyUNet(torch.nn.Module):
    """A cheap stand-in with UNet2DConditionModel's call signature; the prediction depends on x, t and the
    text context, and every call is recorded."""

    def __init__(self, context_dim: int = 32):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
            self.text = torch.nn.Linear(context_dim, 4)
        self.calls: list[dict] = []
        self.state: SamplingState | None = None

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None, return_dict=True):
        self.calls.append({"batch": sample.shape[0], "sample": sample.clone(),
                           "context": encoder_hidden_states.clone(),
                           "added": added_cond_kwargs,
                           "cond_or_uncond": None if self.state is None else list(self.state.cond_or_uncond)})
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1, 1, 1, 1) / 1000.0
        out = torch.tanh(self.conv(sample)) * (1.0 + t)
        out = out + self.text(encoder_hidden_states.mean(dim=1))[:, :, None, None]
        return (out,) if not return_dict else SimpleNamespace(sample=out)


def _model(unet, family: str = "sd15", **schedule) -> DiffusersModel:
    return DiffusersModel(unet=unet, family=family, scheduler_config={**SD15_SCHEDULE, **schedule})


def _cond(seed: int, dim: int = 32, batch: int = 1, **options) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, 77, dim, generator=generator), {"pooled_output": None, **options}]]


def _run(model, seed=1, steps=3, cfg=4.0, sampler="euler", scheduler="normal", latent=None, **kwargs):
    latent = latent if latent is not None else {"samples": torch.zeros(1, 4, 8, 8)}
    with torch.no_grad():
        return sampling.sample(model, seed, steps, cfg, sampler, scheduler, _cond(10), _cond(11), latent,
                               **kwargs)["samples"]


def _assert_close(ours: torch.Tensor, reference: torch.Tensor, tolerance: float = 1e-5) -> None:
    # Relative to the values' scale: random tiny UNets make latents of size ~10-50.
    scale = max(1.0, float(reference.abs().max()))
    assert float((ours - reference).abs().max()) <= tolerance * scale


@pytest.fixture(scope="module")
def sd15_unet():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return tiny.build_sd15_unet().eval()


@pytest.fixture
def train() -> sigma_schedules.TrainingSigmas:
    return sigma_schedules.TrainingSigmas.from_scheduler_config(SD15_SCHEDULE)


# ---------------------------------------------------------------------------------------------- schedules
def test_sd15_training_sigmas_match_comfyui_values(train):
    assert train.sigma_max == pytest.approx(14.6146, abs=1e-3)
    assert train.sigma_min == pytest.approx(0.0292, abs=1e-4)


def test_timestep_inverts_sigma(train):
    for t in (0.0, 0.5, 250.25, 998.75, 999.0):
        assert train.timestep(train.sigma(t)) == pytest.approx(t, abs=1e-3)


@pytest.mark.parametrize("scheduler", sigma_schedules.SCHEDULER_NAMES)
def test_schedule_has_steps_plus_one_decreasing_sigmas_ending_at_zero(train, scheduler):
    sigmas = sigma_schedules.calculate_sigmas(train, scheduler, 4)
    assert len(sigmas) == 5 and float(sigmas[-1]) == 0.0
    assert bool((sigmas[:-1] > sigmas[1:]).all())


def test_schedule_end_points_against_the_training_sigmas(train):
    top, bottom = train.sigma_max, train.sigma_min
    first_and_last = {name: (float(s[0]), float(s[-2])) for name in sigma_schedules.SCHEDULER_NAMES
                      for s in [sigma_schedules.calculate_sigmas(train, name, 4)]}
    for name in ("normal", "karras", "exponential"):  # span the whole range
        assert first_and_last[name][0] == pytest.approx(top, rel=1e-5)
        assert first_and_last[name][1] == pytest.approx(bottom, rel=1e-5)
    # simple: every 250th training sigma from the top; sgm_uniform: linspace(999, 0, 5)[:-1]
    assert first_and_last["simple"] == pytest.approx((top, float(train.sigmas[-(1 + 750)])), rel=1e-6)
    assert first_and_last["sgm_uniform"] == pytest.approx((top, train.sigma(249.75)), rel=1e-6)
    # ddim_uniform: training sigmas 1, 251, 501, 751, top first
    assert first_and_last["ddim_uniform"] == pytest.approx(
        (float(train.sigmas[751]), float(train.sigmas[1])), rel=1e-6)
    middle = sigma_schedules.calculate_sigmas(train, "normal", 4)[1]
    assert float(middle) == pytest.approx(train.sigma(666.0), rel=1e-6)


def test_karras_follows_rho_7(train):
    sigmas = sigma_schedules.calculate_sigmas(train, "karras", 3)
    mid = ((train.sigma_max ** (1 / 7) + train.sigma_min ** (1 / 7)) / 2) ** 7
    assert float(sigmas[1]) == pytest.approx(mid, rel=1e-5)


def test_uni_pc_drops_the_penultimate_sigma(train):
    longer = sigma_schedules.calculate_sigmas(train, "karras", 4)
    sigmas = sigma_schedules.calculate_sigmas(train, "karras", 3, "uni_pc")
    assert torch.equal(sigmas, torch.cat([longer[:-2], longer[-1:]]))


def test_denoise_below_one_keeps_the_tail_of_a_longer_schedule(train):
    sigmas = sampling.ksampler_sigmas(train, "normal", "euler", 3, denoise=0.5)
    assert torch.equal(sigmas, sigma_schedules.calculate_sigmas(train, "normal", 6)[-4:])
    assert len(sampling.ksampler_sigmas(train, "normal", "euler", 3, denoise=0.0)) == 0


def test_advanced_step_window(train):
    full = sigma_schedules.calculate_sigmas(train, "normal", 4)
    ended = sampling.ksampler_sigmas(train, "normal", "euler", 4, last_step=2, force_full_denoise=True)
    assert torch.equal(ended, torch.tensor([float(full[0]), float(full[1]), 0.0]))
    leftover = sampling.ksampler_sigmas(train, "normal", "euler", 4, last_step=2)
    assert torch.equal(leftover, full[:3])
    assert torch.equal(sampling.ksampler_sigmas(train, "normal", "euler", 4, start_step=2), full[2:])
    assert len(sampling.ksampler_sigmas(train, "normal", "euler", 4, start_step=4)) == 0


# ------------------------------------------------------------------------------------------ the loop
@pytest.mark.parametrize("sampler", sampling.SAMPLER_NAMES)
def test_every_scheduler_is_deterministic_per_seed(sampler):
    model = _model(ToyUNet())
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    for scheduler in sigma_schedules.SCHEDULER_NAMES:
        first = _run(model, seed=7, sampler=sampler, scheduler=scheduler, latent=latent)
        again = _run(model, seed=7, sampler=sampler, scheduler=scheduler, latent=latent)
        other = _run(model, seed=8, sampler=sampler, scheduler=scheduler, latent=latent)
        assert bool(torch.isfinite(first).all()), (sampler, scheduler)
        assert torch.equal(first, again), (sampler, scheduler)
        assert float((first - other).abs().max()) > 1e-3, (sampler, scheduler)


def test_initial_noise_is_comfyui_noise():
    latent = torch.zeros(2, 4, 8, 8)
    expected = torch.randn(latent.shape, dtype=torch.float32, generator=torch.manual_seed(42), device="cpu")
    assert torch.equal(sampling.prepare_noise(latent, 42), expected)
    # batch_index: each latent keeps the noise of its place in the original batch
    picked = sampling.prepare_noise(latent[:1], 42, batch_index=[1])
    assert torch.equal(picked, expected[1:2])


def test_euler_normal_equals_a_diffusers_euler_loop(sd15_unet, train):
    cfg, seed, steps = 7.5, 3, 3
    ours = _run(_model(sd15_unet), seed=seed, steps=steps, cfg=cfg)
    sigmas = sigma_schedules.calculate_sigmas(train, "normal", steps)
    scheduler = EulerDiscreteScheduler.from_config(SD15_SCHEDULE)
    scheduler.set_timesteps(sigmas=sigmas.tolist())
    context = torch.cat([_cond(11)[0][0], _cond(10)[0][0]])  # uncond, cond
    # ComfyUI starts a full-strength run from noise * sqrt(1 + sigma_max²)
    x = torch.randn((1, 4, 8, 8), generator=torch.manual_seed(seed)) * math.sqrt(1 + float(sigmas[0]) ** 2)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            uncond, cond = sd15_unet(torch.cat([x_in] * 2), t, encoder_hidden_states=context).sample.chunk(2)
            x = scheduler.step(uncond + cfg * (cond - uncond), t, x).prev_sample
    _assert_close(ours, x)


def _toy_oracle(scheduler, seed: int, sigma0: float, vp: bool, cfg: float = 4.0, generator=None):
    """A hand-written diffusers loop on the toy UNet; ``vp`` schedulers start from unit-variance noise."""
    unet = ToyUNet()
    context = torch.cat([_cond(11)[0][0], _cond(10)[0][0]])
    x = torch.randn((1, 4, 8, 8), generator=torch.manual_seed(seed))
    x = x if vp else x * math.sqrt(1 + sigma0 ** 2)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            uncond, cond = unet(torch.cat([x_in] * 2), t, encoder_hidden_states=context).sample.chunk(2)
            kwargs = {} if generator is None else {"generator": generator}
            x = scheduler.step(uncond + cfg * (cond - uncond), t, x, **kwargs).prev_sample
    return x


def test_euler_ancestral_equals_diffusers_euler_ancestral():
    # 4 "normal" steps sit on training timesteps 999, 666, 333, 0: diffusers' own linspace schedule
    scheduler = EulerAncestralDiscreteScheduler.from_config(SD15_SCHEDULE)
    scheduler.set_timesteps(4)
    reference = _toy_oracle(scheduler, 5, float(scheduler.sigmas[0]), vp=False,
                            generator=torch.Generator().manual_seed(5))
    _assert_close(_run(_model(ToyUNet()), seed=5, steps=4, sampler="euler_ancestral"), reference)


@pytest.mark.parametrize("sampler, algorithm", [("dpmpp_2m", "dpmsolver++"),
                                                ("dpmpp_2m_sde", "sde-dpmsolver++")])
def test_dpmpp_2m_equals_diffusers_dpm_solver(sampler, algorithm):
    # k-diffusion drops to first order only on the step to sigma 0: lower_order_final=False with zero final
    scheduler = DPMSolverMultistepScheduler.from_config(
        SD15_SCHEDULE, algorithm_type=algorithm, solver_order=2, lower_order_final=False)
    scheduler.set_timesteps(timesteps=[999, 666, 333, 0])
    reference = _toy_oracle(scheduler, 6, float(scheduler.sigmas[0]), vp=True,
                            generator=torch.Generator().manual_seed(6))
    _assert_close(_run(_model(ToyUNet()), seed=6, steps=4, sampler=sampler), reference)


def test_v_prediction_euler_equals_diffusers(train):
    schedule = {**SD15_SCHEDULE, "prediction_type": "v_prediction"}
    sigmas = sigma_schedules.calculate_sigmas(train, "karras", 3)
    scheduler = EulerDiscreteScheduler.from_config(schedule)
    scheduler.set_timesteps(sigmas=sigmas.tolist())
    reference = _toy_oracle(scheduler, 4, float(sigmas[0]), vp=False)
    ours = _run(_model(ToyUNet(), prediction_type="v_prediction"), seed=4, scheduler="karras")
    _assert_close(ours, reference)


def test_sdxl_passes_pooled_output_and_time_ids_in_diffusers_order(train):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = tiny.build_sdxl_unet().eval()
    sizes = dict(width=1024, height=768, crop_w=16, crop_h=32, target_width=512, target_height=640)
    pooled = {"pos": torch.randn(1, 32, generator=torch.Generator().manual_seed(1)),
              "neg": torch.randn(1, 32, generator=torch.Generator().manual_seed(2))}
    positive = [[_cond(10, dim=64)[0][0], {"pooled_output": pooled["pos"], **sizes}]]
    negative = [[_cond(11, dim=64)[0][0], {"pooled_output": pooled["neg"], **sizes}]]
    cfg, steps, seed = 3.0, 2, 9
    with torch.no_grad():
        ours = sampling.sample(_model(unet, "sdxl"), seed, steps, cfg, "euler", "normal", positive, negative,
                               {"samples": torch.zeros(1, 4, 8, 8)})["samples"]
    # diffusers' StableDiffusionXLPipeline: original_size (h, w) + crops_coords_top_left + target_size (h, w)
    time_ids = torch.tensor([[768.0, 1024.0, 32.0, 16.0, 640.0, 512.0]]).repeat(2, 1)
    added = {"text_embeds": torch.cat([pooled["neg"], pooled["pos"]]), "time_ids": time_ids}
    context = torch.cat([negative[0][0], positive[0][0]])
    sigmas = sigma_schedules.calculate_sigmas(train, "normal", steps)
    scheduler = EulerDiscreteScheduler.from_config(SD15_SCHEDULE)
    scheduler.set_timesteps(sigmas=sigmas.tolist())
    x = torch.randn((1, 4, 8, 8), generator=torch.manual_seed(seed)) * math.sqrt(1 + float(sigmas[0]) ** 2)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            out = unet(torch.cat([x_in] * 2), t, encoder_hidden_states=context, added_cond_kwargs=added).sample
            uncond, cond = out.chunk(2)
            x = scheduler.step(uncond + cfg * (cond - uncond), t, x).prev_sample
    _assert_close(ours, x)


def test_sdxl_time_ids_default_to_latent_size_times_8():
    toy = ToyUNet(context_dim=64)
    positive = [[_cond(10, dim=64)[0][0], {"pooled_output": torch.ones(1, 32)}]]
    with torch.no_grad():
        sampling.sample(_model(toy, "sdxl"), 0, 1, 1.0, "euler", "normal", positive, positive,
                        {"samples": torch.zeros(1, 4, 8, 12)})
    assert toy.calls[0]["added"]["time_ids"].tolist() == [[64.0, 96.0, 0.0, 0.0, 64.0, 96.0]]


@contextlib.contextmanager
def _recording_patch(toy: ToyUNet):
    toy.state = SamplingState()
    yield toy.state


def test_cfg_one_runs_only_the_cond_batch(monkeypatch):
    toy = ToyUNet()
    monkeypatch.setattr(sampling, "patched_unet", lambda model: _recording_patch(toy))
    _run(_model(toy), steps=3, cfg=1.0, latent={"samples": torch.zeros(2, 4, 8, 8)})
    assert [c["batch"] for c in toy.calls] == [2, 2, 2]
    assert all(c["cond_or_uncond"] == [0] for c in toy.calls)
    assert torch.equal(toy.calls[0]["context"][0], _cond(10)[0][0][0])


def test_cfg_above_one_runs_uncond_then_cond_in_one_batch(monkeypatch):
    toy = ToyUNet()
    monkeypatch.setattr(sampling, "patched_unet", lambda model: _recording_patch(toy))
    _run(_model(toy), steps=3, cfg=2.5, latent={"samples": torch.zeros(2, 4, 8, 8)})
    assert [c["batch"] for c in toy.calls] == [4, 4, 4]
    assert all(c["cond_or_uncond"] == [1, 0] for c in toy.calls)
    context = toy.calls[0]["context"]
    assert torch.equal(context[0], _cond(11)[0][0][0]) and torch.equal(context[2], _cond(10)[0][0][0])


def test_denoise_zero_returns_the_input_latent():
    toy = ToyUNet()
    samples = torch.randn(1, 4, 8, 8)
    result = KSampler().sample(_model(toy), 1, 4, 8.0, "euler", "normal", _cond(10), _cond(11),
                               {"samples": samples, "batch_index": [0]}, denoise=0.0)[0]
    assert torch.equal(result["samples"], samples) and result["batch_index"] == [0]
    assert toy.calls == []


def test_advanced_split_equals_one_ksampler_run(sd15_unet):
    model, latent = _model(sd15_unet), {"samples": torch.zeros(1, 4, 8, 8)}
    args = dict(cfg=5.0, sampler_name="euler", scheduler="karras", positive=_cond(10), negative=_cond(11))
    with torch.no_grad():
        whole = KSampler().sample(model, seed=12, steps=4, latent_image=latent, **args)[0]["samples"]
        first = KSamplerAdvanced().sample(model, "enable", 12, 4, latent_image=latent, start_at_step=0,
                                          end_at_step=2, return_with_leftover_noise="enable", **args)[0]
        second = KSamplerAdvanced().sample(model, "disable", 12, 4, latent_image=first, start_at_step=2,
                                           end_at_step=10000, return_with_leftover_noise="disable", **args)[0]
    _assert_close(second["samples"], whole)
    assert float((first["samples"] - whole).abs().max()) > 1e-2  # the first half really stopped early


def test_noise_mask_keeps_the_unmasked_latent():
    original = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    kept = _run(_model(ToyUNet()), latent={"samples": original, "noise_mask": torch.zeros(1, 1, 64, 64)})
    assert torch.equal(kept, original)
    everywhere = _run(_model(ToyUNet()), latent={"samples": original, "noise_mask": torch.ones(1, 1, 64, 64)})
    _assert_close(everywhere, _run(_model(ToyUNet()), latent={"samples": original}))
    half = torch.zeros(1, 1, 64, 64)
    half[..., 32:] = 1.0
    mixed = _run(_model(ToyUNet()), latent={"samples": original, "noise_mask": half})
    assert torch.equal(mixed[..., :3], original[..., :3])  # bilinear edge at column 4 of 8
    assert float((mixed[..., 5:] - original[..., 5:]).abs().max()) > 1e-2


def test_noise_mask_shows_the_unet_the_noised_original_outside_the_mask(train):
    # ComfyUI blends before every model call: outside the mask the UNet sees latent + noise * sigma
    original = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    toy, seed, steps = ToyUNet(), 4, 3
    _run(_model(toy), seed=seed, steps=steps, cfg=1.0, sampler="euler_ancestral",
         latent={"samples": original, "noise_mask": torch.zeros(1, 1, 64, 64)})
    noise = sampling.prepare_noise(original, seed)
    for call, sigma in zip(toy.calls, sigma_schedules.calculate_sigmas(train, "normal", steps).tolist()):
        _assert_close(call["sample"], (original + noise * sigma) / math.sqrt(sigma ** 2 + 1))


def test_gligen_conditioning_is_refused_with_a_clear_error():
    positive = _cond(10, gligen=("position", object(), []))
    with pytest.raises(NotImplementedError, match="'positive' conditioning entry 0 carries gligen"):
        sampling.sample(_model(ToyUNet()), 0, 2, 4.0, "euler", "normal", positive, _cond(11),
                        {"samples": torch.zeros(1, 4, 8, 8)})


def test_interrupt_between_steps_propagates(monkeypatch):
    from ipadapter_nodes.runtime import executor

    toy, checks = ToyUNet(), []

    def check() -> None:
        checks.append(1)
        if len(checks) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(executor, "check_interrupted", check)
    with pytest.raises(KeyboardInterrupt):
        _run(_model(toy), steps=4)
    assert len(toy.calls) == 1


# ------------------------------------------------------------------------------------------------ nodes
COMFY_SAMPLERS = {"euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2",
                  "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
                  "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "ddpm", "lcm", "ipndm", "deis",
                  "ddim", "uni_pc", "uni_pc_bh2"}
COMFY_SCHEDULERS = {"simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                    "linear_quadratic", "kl_optimal"}


def test_ksampler_inputs_follow_comfyui():
    inputs = KSampler.INPUT_TYPES()["required"]
    assert list(inputs) == ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive",
                            "negative", "latent_image", "denoise"]
    assert inputs["seed"] == ("INT", {"default": 0, "min": 0, "max": 18446744073709551615,
                                      "control_after_generate": True})
    assert inputs["steps"] == ("INT", {"default": 20, "min": 1, "max": 10000})
    assert inputs["cfg"] == ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01})
    assert inputs["denoise"] == ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01})
    assert set(inputs["sampler_name"][0]) <= COMFY_SAMPLERS
    assert set(inputs["scheduler"][0]) <= COMFY_SCHEDULERS
    assert KSampler.RETURN_TYPES == ("LATENT",)


def test_ksampler_advanced_inputs_follow_comfyui():
    inputs = KSamplerAdvanced.INPUT_TYPES()["required"]
    assert list(inputs) == ["model", "add_noise", "noise_seed", "steps", "cfg", "sampler_name", "scheduler",
                            "positive", "negative", "latent_image", "start_at_step", "end_at_step",
                            "return_with_leftover_noise"]
    assert inputs["add_noise"] == (["enable", "disable"],)
    assert inputs["return_with_leftover_noise"] == (["disable", "enable"],)
    assert inputs["start_at_step"] == ("INT", {"default": 0, "min": 0, "max": 10000})
    assert inputs["end_at_step"] == ("INT", {"default": 10000, "min": 0, "max": 10000})
    assert inputs["noise_seed"] == KSampler.INPUT_TYPES()["required"]["seed"]


def test_sampler_nodes_are_registered_for_headless_runs():
    from ipadapter_nodes.runtime.standard_nodes import NODE_CLASS_MAPPINGS

    assert NODE_CLASS_MAPPINGS["KSampler"] is KSampler
    assert NODE_CLASS_MAPPINGS["KSamplerAdvanced"] is KSamplerAdvanced
