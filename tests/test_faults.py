"""Faults end in a message that names the file or node, what was expected and what was found, and lose nothing.

Covered: damaged files (truncated or corrupt safetensors, pickles that would run code), adapters of the
wrong family or with the wrong image encoder, missing model files, mask/latent size mismatches, empty image
batches, NaN in an input image, fp16/bf16/fp32 mixes, an interrupt mid-sampling (no output file, UNet
restored, exit 130) and path traversal in every file-name input of every node class (found automatically).
"""
from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter_nodes.core import folders
from ipadapter_nodes.runtime import registry
from ipadapter_nodes.runtime.models import configure_folders
from ipadapter_nodes.runtime.node_specs import input_specs
from ipadapter_nodes.runtime.validate import format_errors, validate_prompt

SENTINEL = "zz-sentinel"
TRAVERSALS = ("../x", "/etc/passwd", "sub/../../x")
#: STRING inputs whose value is a file name (outputs: a prefix inside the output folder).
_FILE_STRING = re.compile(r"(file|path|prefix|dir|folder)", re.IGNORECASE)


# ============================================================================ file-name inputs, found
@dataclass(frozen=True)
class FileInput:
    """One input of one node class that takes a file name: a combo listing a folder, or a file STRING."""

    class_type: str
    name: str
    folder: str   # the model folder, "input", "output" (file STRINGs) or "fixed list" (names from a table)


class _RecordingLayout(folders.FolderLayout):
    """A folder layout that remembers which folders the node classes asked for."""

    def __init__(self, root: Path) -> None:
        super().__init__(models_dirs=[str(root / "models")], input_dir=str(root / "input"),
                         output_dir=str(root / "output"), temp_dir=str(root / "temp"))
        self.asked: set[str] = set()

    def get_folder_paths(self, folder: str) -> list[str]:
        self.asked.add(folder)
        return super().get_folder_paths(folder)


def _sentinels(folder: str) -> list[str]:
    # a file per extension family and a model folder, so every kind of listing shows one of them
    return [f"{SENTINEL}-{folder}{ext}" for ext in (".safetensors", ".png", ".ipadpt")] + [f"{SENTINEL}-{folder}-dir"]


def _write_sentinels(base: Path, folder: str) -> None:
    base.mkdir(parents=True, exist_ok=True)
    for name in _sentinels(folder)[:-1]:
        (base / name).write_bytes(b"")
    model_dir = base / _sentinels(folder)[-1]
    model_dir.mkdir(exist_ok=True)
    for marker in ("model_index.json", "config.json"):
        (model_dir / marker).write_text("{}")
    (model_dir / "diffusion_pytorch_model.safetensors").write_bytes(b"")


def discover_file_inputs(root: Path) -> list[FileInput]:
    """Every file-name input of every registered node class, found by what its combo lists.

    Sentinel files are put in every folder any class asks for (and in the input folder); a combo that then
    lists a sentinel takes a file name from that folder.  STRING inputs named like a file/path/prefix are
    file names too.  The previous folder provider is restored.
    """
    previous = folders.provider()
    layout = _RecordingLayout(root)
    folders.configure(layout)
    try:
        classes = registry.node_classes()
        for cls in classes.values():
            cls.INPUT_TYPES()
        for folder in sorted(layout.asked):
            for base in layout.get_folder_paths(folder):
                _write_sentinels(Path(base), folder)
        _write_sentinels(Path(layout.input_dir), "input")
        found = []
        for class_type, cls in sorted(classes.items()):
            for spec in input_specs(cls):
                listed = [c for c in spec.choices or [] if isinstance(c, str) and SENTINEL in c]
                if listed:
                    folder = listed[0].split(f"{SENTINEL}-", 1)[1].split("/")[0]
                    folder = next(f for f in sorted(layout.asked | {"input"}, key=len, reverse=True)
                                  if folder.startswith(f))
                    found.append(FileInput(class_type, spec.name, folder))
                elif spec.type == "STRING" and _FILE_STRING.search(spec.name):
                    found.append(FileInput(class_type, spec.name, "output"))
                elif spec.choices is not None and (_FILE_STRING.search(spec.name) or spec.name.endswith("_name")):
                    found.append(FileInput(class_type, spec.name, "fixed list"))   # e.g. an InsightFace pack
        return found
    finally:
        folders.configure(previous)


# ============================================================================ path traversal, every input
class FaultSink:
    """An output node that takes anything, so validation reaches the node under test."""

    RETURN_TYPES = ()
    FUNCTION = "take"
    OUTPUT_NODE = True
    CATEGORY = "test"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("*",)}}

    def take(self, value):
        return {"ui": {}}


#: A value of each socket type, for running a node with one input under test (a new type needs a row here).
SAMPLES = {
    "IMAGE": lambda: torch.rand(2, 16, 16, 3),
    "MASK": lambda: torch.zeros(1, 16, 16),
    "LATENT": lambda: {"samples": torch.zeros(1, 4, 8, 8)},
    "EMBEDS": lambda: _embeds(),
}


def _embeds():
    from ipadapter_nodes.core.embeds import Embeds

    return Embeds(torch.randn(1, 8), torch.zeros(1, 8), "image_embeds")


class FaultSource:
    """Gives a sample value of the socket type named by ``kind``."""

    RETURN_TYPES = ("*",)
    FUNCTION = "give"
    CATEGORY = "test"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"kind": ("STRING", {"default": "IMAGE"})}}

    def give(self, kind):
        return (SAMPLES[kind](),)


@pytest.fixture(autouse=True)
def _restore_folders():
    previous = folders.provider()
    yield
    folders.configure(previous)


@pytest.fixture(scope="module")
def file_inputs(tmp_path_factory) -> list[FileInput]:
    return discover_file_inputs(tmp_path_factory.mktemp("sentinels"))


def test_file_inputs_are_discovered_for_every_kind_of_file(file_inputs):
    found = {(f.class_type, f.name): f.folder for f in file_inputs}
    # the known ones, so discovery itself cannot silently find nothing
    assert found[("CheckpointLoaderSimple", "ckpt_name")] == "checkpoints"
    assert found[("CLIPVisionLoader", "clip_name")] == "clip_vision"
    assert found[("IPAdapterModelLoader", "ipadapter_file")] == "ipadapter"
    assert found[("LoraLoader", "lora_name")] == "loras"
    assert found[("ControlNetLoader", "control_net_name")] == "controlnet"
    assert found[("LoadImage", "image")] == "input"
    assert found[("IPAdapterLoadEmbeds", "embeds")] == "input"
    assert found[("AnimateDiffLoader", "motion_module")] == "animatediff_models"
    assert found[("SaveImage", "filename_prefix")] == "output"
    assert found[("IPAdapterSaveEmbeds", "filename_prefix")] == "output"


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("evil", TRAVERSALS)
def test_path_traversal_is_refused_in_every_file_name_input(file_inputs, tmp_path, evil):
    from ipadapter_nodes.runtime.executor import Executor, NodeExecutionError

    root = tmp_path / "a" / "b"
    configure_folders(models_dir=root / "models", input_dir=root / "input", output_dir=root / "output")
    (root / "input").mkdir(parents=True)
    (root / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x", format="PNG")   # what "../x" would reach
    classes = {**registry.node_classes(), "FaultSink": FaultSink, "FaultSource": FaultSource}
    refused_at_run = []
    for item in file_inputs:
        cls = classes[item.class_type]
        # never write outside the test folder, even if a node were to accept an absolute prefix
        value = str(tmp_path / "abs" / "passwd") if item.folder == "output" and evil.startswith("/") else evil
        prompt = {"1": {"class_type": item.class_type, "inputs": {item.name: value}}}
        if not getattr(cls, "OUTPUT_NODE", False):
            prompt["2"] = {"class_type": "FaultSink", "inputs": {"value": ["1", 0]}}
        result = validate_prompt(prompt, classes)
        errors = [e for e in result.node_errors.get("1", {}).get("errors", [])
                  if e["extra_info"].get("input_name") == item.name]
        if errors:
            text = format_errors(result)
            assert item.class_type in text and f"'{item.name}'" in text and value in text, text
            continue
        # Not a listed value (an output prefix): the node must refuse it when it runs, writing nothing.
        for spec in input_specs(cls):
            if spec.name == item.name or spec.section != "required":
                continue
            if spec.type in SAMPLES:
                source = f"src_{spec.name}"
                prompt[source] = {"class_type": "FaultSource", "inputs": {"kind": spec.type}}
                prompt["1"]["inputs"][spec.name] = [source, 0]
            elif "default" in spec.options or spec.choices:
                prompt["1"]["inputs"][spec.name] = spec.options.get("default", (spec.choices or [None])[0])
            else:
                pytest.fail(f"{item.class_type}.{spec.name}: add a SAMPLES row for type {spec.type}")
        before = _files_under(tmp_path)
        with pytest.raises(NodeExecutionError) as caught:
            Executor(classes, progress=False).execute(prompt)
        message = str(caught.value)
        assert item.class_type in message and value in message, message
        assert re.search(r"outside|absolute|not allowed", message), message
        assert _files_under(tmp_path) == before
        refused_at_run.append(item.class_type)
    assert refused_at_run, "no output file-name input was checked at run time"


# ============================================================================ workflows on the tiny models
SD15_PLUS, SDXL_BASE = "plus_sd15.safetensors", "base_sdxl.safetensors"
ADAPTERS = {SD15_PLUS: ("sd15-plus", torch.float32), SDXL_BASE: ("sdxl", torch.float32),
            "plus_sd15_fp16.safetensors": ("sd15-plus", torch.float16),
            "plus_sd15_bf16.safetensors": ("sd15-plus", torch.bfloat16)}


@pytest.fixture(scope="module")
def tiny_layout(tiny_models_dir, tmp_path_factory) -> dict[str, Path]:
    """Models (the tiny set reached read-only as extra paths, adapters of each kind), input, output."""
    from ipadapter_nodes.runtime.tiny_adapters import make_adapter

    root = tmp_path_factory.mktemp("faults")
    paths = {"models": root / "models", "input": root / "input", "output": root / "output",
             "extra": root / "extra_model_paths.yaml"}
    for name, (variant, dtype) in ADAPTERS.items():
        make_adapter(variant, paths["models"] / "ipadapter" / name, seed=3, dtype=dtype)
    paths["input"].mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(paths["input"] / "ref.png")
    paths["extra"].write_text(f"tiny:\n  base_path: {tiny_models_dir}\n  checkpoints: checkpoints\n"
                              f"  clip_vision: clip_vision\n")
    return paths


def _configure(layout: dict[str, Path]) -> None:
    configure_folders(models_dir=layout["models"], input_dir=layout["input"], output_dir=layout["output"],
                      extra_model_paths=layout["extra"])


def _prompt(adapter: str = SD15_PLUS, clip_name: str = "tiny-vit-h.safetensors", steps: int = 2) -> dict:
    """Checkpoint, reference, adapter, encoder, prompts, 64 px latent, IPAdapterAdvanced (8), KSampler (9),
    decode, SaveImage."""
    def node(class_type, **inputs):
        return {"class_type": class_type, "inputs": inputs}

    return {
        "1": node("CheckpointLoaderSimple", ckpt_name="tiny-sd15"),
        "2": node("LoadImage", image="ref.png"),
        "3": node("IPAdapterModelLoader", ipadapter_file=adapter),
        "4": node("CLIPVisionLoader", clip_name=clip_name),
        "5": node("CLIPTextEncode", text="a house", clip=["1", 1]),
        "6": node("CLIPTextEncode", text="", clip=["1", 1]),
        "7": node("EmptyLatentImage", width=64, height=64, batch_size=1),
        "8": node("IPAdapterAdvanced", model=["1", 0], ipadapter=["3", 0], image=["2", 0], clip_vision=["4", 0],
                  weight=0.8, weight_type="linear", combine_embeds="concat", start_at=0.0, end_at=1.0,
                  embeds_scaling="V only"),
        "9": node("KSampler", model=["8", 0], seed=1, steps=steps, cfg=5.0, sampler_name="euler",
                  scheduler="normal", positive=["5", 0], negative=["6", 0], latent_image=["7", 0], denoise=1.0),
        "10": node("VAEDecode", samples=["9", 0], vae=["1", 2]),
        "11": node("SaveImage", images=["10", 0], filename_prefix="fault"),
    }


def _run_cli(layout: dict[str, Path], prompt: dict, tmp_path: Path, capsys) -> tuple[int, str]:
    from ipadapter_nodes.runtime import cli

    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(prompt))
    code = cli.main(["run", str(path), "--models-dir", str(layout["models"]), "--input-dir", str(layout["input"]),
                     "--output-dir", str(layout["output"]), "--extra-model-paths", str(layout["extra"])])
    return code, capsys.readouterr().err


def _outputs(layout: dict[str, Path]) -> list[Path]:
    return sorted(p for p in layout["output"].rglob("*") if p.is_file()) if layout["output"].exists() else []


def test_an_sdxl_adapter_on_an_sd15_model_exits_1_naming_the_node(tiny_layout, tmp_path, capsys):
    before = _outputs(tiny_layout)
    code, err = _run_cli(tiny_layout, _prompt(adapter=SDXL_BASE, clip_name="tiny-vit-bigG.safetensors"),
                         tmp_path, capsys)
    assert code == 1 and "Traceback" not in err
    assert "node 8" in err and "IPAdapterAdvanced" in err and SDXL_BASE in err
    assert "SDXL" in err and "SD1.5" in err and "load the SD1.5 version" in err
    assert _outputs(tiny_layout) == before


def test_a_plus_adapter_with_a_bigG_encoder_names_both_widths(tiny_layout, tmp_path, capsys):
    before = _outputs(tiny_layout)
    code, err = _run_cli(tiny_layout, _prompt(clip_name="tiny-vit-bigG.safetensors"), tmp_path, capsys)
    assert code == 1 and "Traceback" not in err
    assert "node 8" in err and "IPAdapterAdvanced" in err
    assert "needs" in err and "48-d" in err and "64-d" in err      # the tiny ViT-H and ViT-bigG widths
    assert _outputs(tiny_layout) == before


def test_a_missing_model_file_is_refused_at_validation_naming_the_input(tiny_layout, tmp_path, capsys):
    code, err = _run_cli(tiny_layout, _prompt(adapter="ip-adapter-plus_sd15.safetensors"), tmp_path, capsys)
    assert code == 2 and "Traceback" not in err
    assert "node 3" in err and "IPAdapterModelLoader" in err and "'ipadapter_file'" in err
    assert "value_not_in_list" in err and "'ip-adapter-plus_sd15.safetensors' not in" in err


@pytest.mark.parametrize("adapter", ["plus_sd15_fp16.safetensors", "plus_sd15_bf16.safetensors"])
def test_a_half_precision_adapter_on_an_fp32_model_runs_without_dtype_errors(tiny_layout, tmp_path, capsys,
                                                                             adapter):
    before = set(_outputs(tiny_layout))
    code, err = _run_cli(tiny_layout, _prompt(adapter=adapter), tmp_path, capsys)
    assert code == 0, err
    written = set(_outputs(tiny_layout)) - before
    assert len(written) == 1
    pixels = np.asarray(Image.open(written.pop()))
    assert pixels.shape == (64, 64, 3) and pixels.std() > 0


def test_a_bf16_model_with_an_fp32_adapter_samples_without_dtype_errors(tiny_layout):
    import copy
    import dataclasses

    from ipadapter_nodes.core import adapter as adapters
    from ipadapter_nodes.core.apply import apply_ipadapter
    from ipadapter_nodes.core.encode import load_clip_vision
    from ipadapter_nodes.runtime.sampling import sample
    from ipadapter_nodes.runtime.standard_nodes.checkpoint import load_checkpoint

    _configure(tiny_layout)
    model, clip, _vae = load_checkpoint("tiny-sd15")
    bf16 = dataclasses.replace(model, unet=copy.deepcopy(model.unet).to(torch.bfloat16))
    encoder = load_clip_vision(folders.get_full_path("clip_vision", "tiny-vit-h.safetensors"))
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    patched = apply_ipadapter(bf16, adapters.load_adapter(tiny_layout["models"] / "ipadapter" / SD15_PLUS),
                              encoder, image, weight=1.0)
    cond, pooled = clip.encode("a house")
    positive, negative = [[cond, {"pooled_output": pooled}]], [[torch.zeros_like(cond), {"pooled_output": pooled}]]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    with_adapter = sample(patched, 1, 2, 5.0, "euler", "normal", positive, negative, latent)["samples"]
    without = sample(bf16, 1, 2, 5.0, "euler", "normal", positive, negative, latent)["samples"]
    assert with_adapter.dtype == torch.float32 and torch.isfinite(with_adapter).all()
    assert (with_adapter - without).abs().max() > 1e-3          # the adapter really acted, in bf16


def test_an_interrupt_inside_the_unet_at_step_2_exits_130_writes_nothing_and_restores_the_unet(
        tiny_layout, tmp_path, capsys, monkeypatch):
    from diffusers import UNet2DConditionModel

    from ipadapter_nodes.runtime.standard_nodes.checkpoint import load_checkpoint

    _configure(tiny_layout)
    unet = load_checkpoint("tiny-sd15")[0].unet          # the cached UNet the run will use
    processors = {name: type(p) for name, p in unet.attn_processors.items()}
    calls = []
    forward = UNet2DConditionModel.forward

    def interrupted_at_step_2(self, *args, **kwargs):
        calls.append(len(calls))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", interrupted_at_step_2)
    before = _outputs(tiny_layout)
    code, err = _run_cli(tiny_layout, _prompt(steps=4), tmp_path, capsys)
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert len(calls) == 2
    assert _outputs(tiny_layout) == before                # no image, no partial file
    assert {name: type(p) for name, p in unet.attn_processors.items()} == processors


# ============================================================================ images, masks and latents
def test_an_empty_image_batch_is_refused_naming_the_node_and_the_shape(tiny_layout):
    from ipadapter_nodes.core import adapter as adapters
    from ipadapter_nodes.core.encode import load_clip_vision
    from ipadapter_nodes.runtime.standard_nodes.clip_vision import CLIPVisionEncode

    _configure(tiny_layout)
    encoder = load_clip_vision(folders.get_full_path("clip_vision", "tiny-vit-h.safetensors"))
    empty = torch.zeros(0, 64, 64, 3)
    with pytest.raises(ValueError, match=r"IMAGE batch is empty \(shape \(0, 64, 64, 3\)\).*at least one image"):
        CLIPVisionEncode().encode(encoder, empty, "center")
    nodes = registry.node_classes()
    from ipadapter_nodes.runtime.standard_nodes.checkpoint import load_checkpoint

    model = load_checkpoint("tiny-sd15")[0]
    adapter = adapters.load_adapter(tiny_layout["models"] / "ipadapter" / SD15_PLUS)
    apply = nodes["IPAdapterAdvanced"]()
    with pytest.raises(ValueError, match=r"IPAdapterAdvanced: 'image'.*\(0, 64, 64, 3\)"):
        getattr(apply, nodes["IPAdapterAdvanced"].FUNCTION)(
            model=model, ipadapter=adapter, image=empty, clip_vision=encoder, weight=1.0, weight_type="linear",
            combine_embeds="concat", start_at=0.0, end_at=1.0, embeds_scaling="V only")
    assert model.applications == ()                          # the input MODEL is untouched


def test_nan_in_an_input_image_is_an_error_naming_the_image_not_a_black_result(tiny_layout):
    """Decided behaviour: NaN/inf pixels are refused at encoding (they would turn every latent to NaN)."""
    from ipadapter_nodes.core.encode import load_clip_vision
    from ipadapter_nodes.runtime.standard_nodes.clip_vision import CLIPVisionEncode

    _configure(tiny_layout)
    encoder = load_clip_vision(folders.get_full_path("clip_vision", "tiny-vit-h.safetensors"))
    images = torch.rand(3, 32, 32, 3)
    images[1, 4, 5, 0] = float("nan")
    images[1, 0, 0, 2] = float("inf")
    with pytest.raises(ValueError, match=r"image\(s\) \[1\] of the batch hold 2 NaN or infinite value\(s\); "
                                         r"expected pixel values in 0..1"):
        CLIPVisionEncode().encode(encoder, images, "center")
    finite = CLIPVisionEncode().encode(encoder, images.nan_to_num(0.0, 1.0, 0.0), "center")[0]
    assert torch.isfinite(finite.image_embeds).all()


def test_a_mask_count_that_fits_neither_one_nor_the_batch_names_both(tiny_layout):
    from ipadapter_nodes.core import masks

    with pytest.raises(ValueError) as caught:
        masks.layer_mask(torch.ones(3, 16, 16), query_len=64, latent_hw=(8, 8), batch=2, dtype=torch.float32,
                         device="cpu")
    assert "3 masks do not match the batch of 2 latent(s)" in str(caught.value)
    assert "give 1 mask" in str(caught.value)


def test_a_mask_of_another_size_than_the_latent_is_resized_to_every_layer_grid(tiny_layout):
    from ipadapter_nodes.core import masks

    mask = torch.zeros(1, 40, 24)
    mask[:, :, 12:] = 1.0                                     # the right half, at another size and aspect
    out = masks.layer_mask(mask, query_len=64, latent_hw=(8, 8), batch=2, dtype=torch.float32, device="cpu")
    assert out.shape == (2, 64, 1)
    grid = out[0, :, 0].reshape(8, 8)
    assert torch.equal(grid[:, :4], torch.zeros(8, 4)) and torch.equal(grid[:, 4:], torch.ones(8, 4))


# ============================================================================ damaged and unsafe files
def _write_adapter(path: Path) -> None:
    from ipadapter_nodes.runtime.tiny_adapters import make_adapter

    make_adapter("sd15", path, seed=1)


def _write_clip_vision(path: Path, tiny_models_dir: Path) -> None:
    path.write_bytes((tiny_models_dir / "clip_vision" / "tiny-vit-h.safetensors").read_bytes())


def _write_embeds(path: Path) -> None:
    from ipadapter_nodes.core.embeds import Embeds
    from ipadapter_nodes.core.embeds_io import save_embeds

    save_embeds(Embeds(torch.randn(2, 8), torch.zeros(2, 8), "image_embeds"), path)


def _load_adapter(path: Path):
    from ipadapter_nodes.core.adapter import load_adapter

    return load_adapter(path)


def _load_clip_vision(path: Path):
    from ipadapter_nodes.core.encode import load_clip_vision

    return load_clip_vision(path)


def _load_embeds(path: Path):
    from ipadapter_nodes.core.embeds_io import load_embeds

    return load_embeds(path)


def _damage(data: bytes, how: str) -> bytes:
    if how == "truncated":
        return data[: len(data) // 2]
    if how == "cut_header":
        return data[:6]
    return data[:8] + bytes(range(200, 240)) + data[48:]      # corrupt: the JSON header overwritten


DAMAGEABLE = {   # kind -> (what the message calls it, writer, loader)
    "adapter": ("IP-Adapter file", _write_adapter, _load_adapter),
    "clip_vision": ("CLIP vision file", None, _load_clip_vision),
    "embeds": ("embeds file", _write_embeds, _load_embeds),
}


@pytest.mark.parametrize("how", ["truncated", "cut_header", "corrupt"])
@pytest.mark.parametrize("kind", sorted(DAMAGEABLE))
def test_a_damaged_safetensors_file_is_named_with_what_to_do_and_left_as_it_is(tiny_models_dir, tmp_path, kind, how):
    what, write, load = DAMAGEABLE[kind]
    good = tmp_path / f"good-{kind}.safetensors"
    if write is None:
        _write_clip_vision(good, tiny_models_dir)
    else:
        write(good)
    bad = tmp_path / f"{kind}-{how}.safetensors"
    bad.write_bytes(_damage(good.read_bytes(), how))
    content = bad.read_bytes()
    with pytest.raises(ValueError) as caught:
        load(bad)
    message = str(caught.value)
    assert what in message and bad.name in message, message
    assert re.search(r"truncated|cut off|corrupt", message), message
    assert re.search(r"again", message), message                  # what to do: download / save it again
    assert bad.read_bytes() == content                            # nothing lost: the file is as it was


class _Payload:
    """A pickle that would create ``marker`` when unpickled by an unsafe loader."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def _pickles(marker: Path) -> dict[str, bytes]:
    """The legacy (bare pickle) and the zip container (torch.save) forms, each carrying the payload."""
    import io

    buffer = io.BytesIO()
    torch.save({"ip_adapter": {"0.to_k_ip.weight": torch.zeros(2, 2)}, "extra": _Payload(marker)}, buffer)
    return {"legacy": pickle.dumps({"ip_adapter": _Payload(marker)}, protocol=2), "zip": buffer.getvalue()}


@pytest.mark.parametrize("form", ["legacy", "zip"])
@pytest.mark.parametrize("kind, suffix, what, load", [
    ("adapter", ".bin", "IP-Adapter file", _load_adapter),
    ("embeds", ".ipadpt", "embeds file", _load_embeds),
    ("clip_vision", ".bin", "CLIP vision file", _load_clip_vision),
])
def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path, form, kind, suffix, what, load):
    marker = tmp_path / "PAYLOAD_RAN"
    path = tmp_path / f"evil{suffix}"
    path.write_bytes(_pickles(marker)[form])
    with pytest.raises(ValueError) as caught:
        load(path)
    message = str(caught.value)
    assert not marker.exists()
    assert what in message and path.name in message and "exec" in message, message
    assert re.search(r"refus", message) and ".safetensors" in message, message


@pytest.mark.parametrize("form", ["legacy", "zip"])
def test_a_lora_pickle_that_would_run_code_never_runs(tmp_path, form):
    from ipadapter_nodes.runtime.lora import load_lora_file

    marker = tmp_path / "PAYLOAD_RAN"
    path = tmp_path / "evil.pt"
    path.write_bytes(_pickles(marker)[form])
    with pytest.raises(Exception):
        load_lora_file(path)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["pickle", "truncated"])
def test_a_bad_lora_file_is_refused_with_a_message_naming_it(tmp_path, damage):
    from safetensors.torch import save_file

    from ipadapter_nodes.runtime.lora import load_lora_file

    if damage == "pickle":
        path = tmp_path / "evil.pt"
        path.write_bytes(_pickles(tmp_path / "PAYLOAD_RAN")["zip"])
    else:
        path = tmp_path / "cut.safetensors"
        save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 64)}, str(path))
        path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError) as caught:
        load_lora_file(path)
    assert path.name in str(caught.value) and "LoRA" in str(caught.value)


def test_a_truncated_checkpoint_is_named_by_the_loader(tiny_models_dir, tmp_path):
    from ipadapter_nodes.runtime.standard_nodes.checkpoint import load_checkpoint

    data = (tiny_models_dir / "checkpoints" / "tiny-sd15.safetensors").read_bytes()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "cut.safetensors").write_bytes(data[: len(data) // 2])
    configure_folders(models_dir=tmp_path)
    with pytest.raises(ValueError) as caught:
        load_checkpoint("cut.safetensors")
    assert "cut.safetensors" in str(caught.value) and "truncated" in str(caught.value)
