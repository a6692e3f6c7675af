"""Per-denoising-step cost of IP-Adapter: no adapter vs diffusers' IP-Adapter vs ours.

Full SD1.5 UNet architecture (random weights, fp32, CPU), a CFG batch of 2 at 32×32 latents, base and Plus
adapters at their real shapes. For each configuration it prints:

* FLOPs of one steady-state step (attention counted: SDPA runs on its math backend while counting);
* the median wall time of a step over several steps of one sampling call;
* the added FLOPs over no adapter, as a percentage, and as a ratio to the floor: the attention over the image
  tokens alone (q·K_ipᵀ and A·V_ip at every cross-attention layer), which any implementation must pay.

diffusers runs the image projection inside every UNet call; ours runs it (and every layer's K/V) once per
sampling call, so our per-step extra should sit on that floor.

Run: ``python benchmarks/step_cost.py [--steps 5] [--threads N]``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ipadapter_nodes.core.adapter import from_state_dict
from ipadapter_nodes.core.application import Application
from ipadapter_nodes.core.backends.diffusers import DiffusersModel, patched_unet
from ipadapter_nodes.core.embeds import Embeds
from ipadapter_nodes.runtime.tiny_adapters import random_state_dict

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
LATENT = 32
BATCH = 2  # uncond + cond


def build_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**SD15_UNET).eval()


def features(kind: str, images: int) -> Embeds:
    g = torch.Generator().manual_seed(1)
    if kind == "base":
        cond = torch.randn(images, 1024, generator=g)
        return Embeds(cond=cond, uncond=torch.zeros_like(cond), feature="image_embeds")
    cond = torch.randn(images, 257, 1280, generator=g)
    return Embeds(cond=cond, uncond=torch.randn(images, 257, 1280, generator=g), feature="hidden_states")


def unet_inputs():
    g = torch.Generator().manual_seed(2)
    sample = torch.randn(BATCH, 4, LATENT, LATENT, generator=g)
    text = torch.randn(BATCH, 77, 768, generator=g)
    return sample, text


def count_flops(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def time_steps(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def attn2_query_lengths(unet, run) -> dict[str, int]:
    """Latent tokens each cross-attention layer attends from, recorded during one plain UNet call."""
    lengths: dict[str, int] = {}

    def recorder(name):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            lengths.setdefault(name, hidden.shape[1])
        return hook

    hooks = [module.register_forward_pre_hook(recorder(name), with_kwargs=True)
             for name, module in unet.named_modules() if name.endswith("attn2")]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return lengths


def image_attention_floor(unet, lengths: dict[str, int], tokens: int) -> int:
    """FLOPs of the image-token attention alone: q·K_ipᵀ and A·V_ip (2·L·T·C each) per layer, whole batch."""
    flops = 0
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            width = module.to_q.out_features
            flops += 2 * (2 * BATCH * lengths[name] * tokens * width)
    return flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--images", type=int, default=1)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    unet = build_unet()
    sample, text = unet_inputs()
    t = torch.tensor([500.0])

    def plain():
        return unet(sample, t, encoder_hidden_states=text).sample

    lengths = attn2_query_lengths(unet, plain)
    base_flops = count_flops(plain)
    base_time = time_steps(plain, args.steps)
    print(f"{'config':<22}{'GFLOPs/step':>12}{'+FLOPs':>9}{'x floor':>9}{'ms/step':>10}{'x time':>8}")
    print(f"{'no adapter':<22}{base_flops / 1e9:>12.2f}{'':>9}{'':>9}{base_time * 1e3:>10.0f}{1.0:>8.3f}")

    for kind, variant in (("base", "sd15"), ("plus", "sd15-plus")):
        state_dict = random_state_dict(variant, widths="real", seed=3)
        adapter = from_state_dict(state_dict, f"<random {variant}>")
        embeds = features(kind, args.images)
        floor = image_attention_floor(unet, lengths, adapter.spec.tokens * args.images)

        # diffusers: its processors and projection, projection re-run inside every UNet call.
        unet._load_ip_adapter_weights([state_dict])
        # diffusers' layout: [CFG batch, images, ...] with the uncond half first
        image_embeds = torch.stack([embeds.uncond, embeds.cond])

        def with_diffusers():
            return unet(sample, t, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [image_embeds]}).sample

        d_flops = count_flops(with_diffusers)
        d_time = time_steps(with_diffusers, args.steps)
        _restore_plain(unet)

        # ours: projection and K/V once per sampling call, then steady-state steps.
        model = DiffusersModel(unet=unet, family="sd15", scheduler_config=SCHEDULE,
                               applications=(Application(adapter=adapter, embeds=embeds),))
        with patched_unet(model) as state:
            state.sigma, state.cond_or_uncond = 1.0, [1, 0]
            plain()  # first step: projection + K/V
            o_flops = count_flops(plain)
            o_time = time_steps(plain, args.steps)

        for label, flops, seconds in ((f"diffusers {kind}", d_flops, d_time), (f"ours {kind}", o_flops, o_time)):
            extra = flops - base_flops
            print(f"{label:<22}{flops / 1e9:>12.2f}{100 * extra / base_flops:>8.2f}%{extra / floor:>9.2f}"
                  f"{seconds * 1e3:>10.0f}{seconds / base_time:>8.3f}")
        print(f"{'  floor ' + kind:<22}{floor / 1e9:>12.3f}{100 * floor / base_flops:>8.2f}%")


def _restore_plain(unet) -> None:
    """Back to diffusers' default processors and no image projection, as before loading the adapter."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    unet.encoder_hid_proj = None
    unet.register_to_config(encoder_hid_dim_type=None)


if __name__ == "__main__":
    main()
