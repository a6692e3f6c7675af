"""Peak memory (RSS) of a MODEL carrying N stacked applications of one adapter, side by side for several N.

Each N runs in its own subprocess (peak RSS is per process): a full-size SD1.5 UNet (random weights, fp32), a
Plus adapter at the real shapes written to a .safetensors file and loaded by ``core.adapter.load_adapter``,
the same reference features applied N times through ``core.apply.apply_ipadapter`` (each application on the
previous MODEL), then one denoising step at 32×32 latents (projection and K/V of every application).
``resource.getrusage`` gives the peak; the child also reports the peak before the applications (UNet and
adapter loaded), so the increase due to the applications is visible next to the adapter's own size: a
copy of the adapter per application would add about that size N-1 times.

Run: ``python benchmarks/memory.py [--counts 1,8]``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def child(count: int, adapter_file: str) -> dict:
    """Load, apply ``count`` times, run one step; the peaks in MiB."""
    import torch

    from ipadapter_nodes.core.adapter import load_adapter
    from ipadapter_nodes.core.apply import apply_ipadapter
    from ipadapter_nodes.core.backends.diffusers import DiffusersModel, patched_unet

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from step_cost import SCHEDULE, build_unet, features, unet_inputs

    torch.set_grad_enabled(False)
    unet = build_unet("cpu")
    adapter = load_adapter(adapter_file)
    sample, text, t = unet_inputs("cpu")
    embeds = features("plus", 1)
    loaded = _peak_mib()
    model = DiffusersModel(unet=unet, family="sd15", scheduler_config=SCHEDULE)
    for n in range(count):
        model = apply_ipadapter(model, adapter, embeds=embeds, weight=1.0 / count, node=f"apply {n}")
    applied = _peak_mib()
    with patched_unet(model) as state:
        state.sigma, state.cond_or_uncond = 1.0, [1, 0]
        unet(sample, t, encoder_hidden_states=text)
    return {"count": count, "loaded": loaded, "applied": applied, "stepped": _peak_mib(),
            "adapter_mib": sum(p.numel() * p.element_size() for p in _tensors(adapter)) / 2**20}


def _tensors(adapter):
    import torch

    yield from adapter.image_proj.state_dict().values()
    for layer in list(adapter.to_k_ip) + list(adapter.to_v_ip):
        yield layer.weight if isinstance(layer, torch.nn.Module) else layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", default="1,8")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.adapter)))
        return
    from ipadapter_nodes.runtime.tiny_adapters import make_adapter

    counts = [int(c) for c in args.counts.split(",")]
    with tempfile.TemporaryDirectory() as work:
        adapter_file = os.path.join(work, "ip-adapter-plus_sd15.safetensors")
        make_adapter("sd15-plus", adapter_file, widths="real", seed=3)
        results = []
        for count in counts:
            out = subprocess.run([sys.executable, __file__, "--child", str(count), "--adapter", adapter_file],
                                 check=True, capture_output=True, text=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first = results[0]
    print(f"SD1.5 UNet fp32 + Plus adapter ({first['adapter_mib']:.0f} MiB of weights), one step at 32x32; "
          f"peak RSS in MiB")
    print(f"{'applications':>12}{'loaded':>10}{'applied':>10}{'stepped':>10}{'step - loaded':>15}{'x peak':>9}")
    for r in results:
        print(f"{r['count']:>12}{r['loaded']:>10.0f}{r['applied']:>10.0f}{r['stepped']:>10.0f}"
              f"{r['stepped'] - r['loaded']:>15.1f}{r['stepped'] / first['stepped']:>9.3f}")


if __name__ == "__main__":
    main()
