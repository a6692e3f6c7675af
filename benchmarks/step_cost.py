"""Per-denoising-step cost of IP-Adapter: no adapter vs diffusers' IP-Adapter vs ours.

Full SD1.5 UNet architecture (random weights, fp32, CPU), a CFG batch of 2 at 32×32 latents; base, Plus and
FaceID-Plus adapters at their real shapes, with 1, 4 and 16 reference images. For each configuration it
prints, side by side from one run:

* FLOPs of one steady-state step (attention counted: SDPA runs on its math backend while counting). The
  counts are taken on a copy of the model on PyTorch's ``meta`` device (shapes only, no arithmetic), so
  they are exact and cost no time; they are the hard numbers;
* the median wall time of a step over ``--rounds`` steps of one sampling call, with its spread (min-max);
* the added FLOPs over no adapter, as a percentage, and as a ratio to the floor: the attention over the image
  tokens alone (q·K_ipᵀ and A·V_ip at every cross-attention layer), which any implementation must pay.

diffusers runs the image projection inside every UNet call; ours runs it (and every layer's K/V) once per
sampling call, so our per-step extra should sit on that floor.

Run: ``python benchmarks/step_cost.py [--kinds base,plus,faceid-plus] [--images 1,4,16] [--rounds 3]
[--threads N] [--no-time]``.
"""
from __future__ import annotations

import argparse
import contextlib
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
# benchmark kind → tiny_adapters variant (real widths)
VARIANTS = {"base": "sd15", "plus": "sd15-plus", "faceid-plus": "faceid-plus-sd15"}


def build_unet(device: str = "cpu"):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):
        return UNet2DConditionModel(**SD15_UNET).eval()


def features(kind: str, images: int, device: str = "cpu") -> Embeds:
    """Random encoder features of ``images`` references at the real widths (ViT-H: 1024 / 257×1280)."""
    g = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    if kind == "base":
        cond = randn(images, 1024)
        return Embeds(cond=cond, uncond=torch.zeros_like(cond), feature="image_embeds")
    if kind == "plus":
        return Embeds(cond=randn(images, 257, 1280), uncond=randn(images, 257, 1280), feature="hidden_states")
    face = torch.nn.functional.normalize(randn(images, 512), dim=-1)
    return Embeds(cond=face, uncond=torch.zeros_like(face), feature="face",
                  clip_cond=randn(images, 257, 1280), clip_uncond=randn(images, 257, 1280))


def unet_inputs(device: str = "cpu"):
    g = torch.Generator().manual_seed(2)
    sample = torch.randn(BATCH, 4, LATENT, LATENT, generator=g).to(device)
    text = torch.randn(BATCH, 77, 768, generator=g).to(device)
    return sample, text, torch.tensor([500.0], device=device)


def count_flops(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def time_steps(fn, rounds: int) -> tuple[float, float, float]:
    """(median, min, max) seconds of ``rounds`` calls."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), max(times)


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


class Bench:
    """One UNet on one device with diffusers' and our ways of running an adapter on it."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.unet = build_unet(device)
        self.sample, self.text, self.t = unet_inputs(device)

    def plain(self):
        return self.unet(self.sample, self.t, encoder_hidden_states=self.text).sample

    @contextlib.contextmanager
    def diffusers(self, kind: str, state_dict: dict, embeds: Embeds):
        """A step function running diffusers' IP-Adapter (projection inside every UNet call)."""
        self.unet._load_ip_adapter_weights([state_dict])
        # diffusers' layout: [CFG batch, images, ...] with the uncond half first
        image_embeds = torch.stack([embeds.uncond, embeds.cond])
        if kind == "faceid-plus":
            projection = self.unet.encoder_hid_proj.image_projection_layers[0]
            projection.clip_embeds = torch.stack([embeds.clip_uncond, embeds.clip_cond])
            projection.shortcut = False

        def step():
            return self.unet(self.sample, self.t, encoder_hidden_states=self.text,
                             added_cond_kwargs={"image_embeds": [image_embeds]}).sample

        try:
            yield step
        finally:
            _restore_plain(self.unet)

    @contextlib.contextmanager
    def ours(self, adapter, embeds: Embeds):
        """A step function running ours after the first step of a sampling call (projection + K/V done)."""
        model = DiffusersModel(unet=self.unet, family="sd15", scheduler_config=SCHEDULE,
                               applications=(Application(adapter=adapter, embeds=embeds),))
        with patched_unet(model) as state:
            state.sigma, state.cond_or_uncond = 1.0, [1, 0]
            self.plain()  # first step: projection + K/V
            yield self.plain


def _restore_plain(unet) -> None:
    """Back to diffusers' default processors and no image projection, as before loading the adapter."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    unet.encoder_hid_proj = None
    unet.register_to_config(encoder_hid_dim_type=None)


def _state_dict(kind: str, device: str) -> dict:
    """A random adapter of ``kind`` at the real shapes; FaceID's attention LoRA left out (it changes UNet
    weights, not the per-step attention, and diffusers loads it separately)."""
    state = random_state_dict(VARIANTS[kind], widths="real", device=device, seed=3)
    state["ip_adapter"] = {k: v for k, v in state["ip_adapter"].items() if "lora" not in k}
    return state


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", default="base,plus,faceid-plus", help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--images", default="1,4,16", help="reference image counts")
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--no-time", action="store_true", help="FLOPs only (no CPU model is built)")
    args = parser.parse_args()
    kinds, counts = _csv(args.kinds), [int(n) for n in _csv(args.images)]
    unknown = [k for k in kinds if k not in VARIANTS]
    if unknown:
        parser.error(f"unknown kinds {unknown}; expected some of {', '.join(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    meta = Bench("meta")
    timed = None if args.no_time else Bench("cpu")
    lengths = attn2_query_lengths(meta.unet, meta.plain)
    base_flops = count_flops(meta.plain)
    base_time = time_steps(timed.plain, args.rounds) if timed else None
    print(f"SD1.5 UNet, fp32, latents {LATENT}x{LATENT}, CFG batch {BATCH}, {torch.get_num_threads()} threads; "
          f"times: median (min-max) of {args.rounds} steps")
    print(f"{'config':<28}{'GFLOPs/step':>12}{'+FLOPs':>9}{'x floor':>9}{'s/step':>8}{'(min-max)':>14}{'x time':>8}")
    _row("no adapter", base_flops, None, None, base_time, base_time)

    for kind in kinds:
        for images in counts:
            results = {}
            for label, bench in (("flops", meta), ("time", timed)):
                if bench is None:
                    continue
                state_dict = _state_dict(kind, bench.device)
                adapter = from_state_dict(state_dict, f"<random {VARIANTS[kind]}>")
                embeds = features(kind, images, bench.device)
                measure = count_flops if label == "flops" else (lambda fn: time_steps(fn, args.rounds))
                with bench.diffusers(kind, state_dict, embeds) as step:
                    results["diffusers", label] = measure(step)
                with bench.ours(adapter, embeds) as step:
                    results["ours", label] = measure(step)
                floor = image_attention_floor(meta.unet, lengths, adapter.spec.tokens * images)
            for who in ("diffusers", "ours"):
                _row(f"{who} {kind} x{images}", results[who, "flops"], base_flops, floor,
                     results.get((who, "time")), base_time)
            ratio = (results["diffusers", "flops"] - base_flops) / max(1, results["ours", "flops"] - base_flops)
            print(f"{'  floor':<28}{floor / 1e9:>12.3f}{100 * floor / base_flops:>8.2f}%"
                  f"   diffusers/ours added FLOPs: {ratio:.1f}x")


def _row(label: str, flops: int, base_flops: int | None, floor: int | None, timing, base_time) -> None:
    extra = "" if base_flops is None else f"{100 * (flops - base_flops) / base_flops:>8.2f}%"
    over = "" if floor is None else f"{(flops - base_flops) / floor:>9.2f}"
    line = f"{label:<28}{flops / 1e9:>12.2f}{extra:>9}{over:>9}"
    if timing is not None:
        median, low, high = timing
        line += f"{median:>8.2f}{f'({low:.2f}-{high:.2f})':>14}{median / base_time[0]:>8.3f}"
    print(line, flush=True)


if __name__ == "__main__":
    main()
