"""The ``ipadapter`` command: run, validate and inspect ComfyUI workflows without ComfyUI.

Exit codes: 0 done; 2 invalid workflow or bad input (messages only); 1 a node failed while running;
130 interrupted.  Results go to stdout, errors to stderr.  What the listing commands (``nodes``, ``models``,
``workflows``) print is made in ``runtime.cli_listing``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from .cli_listing import print_ipadapter_files, print_nodes, print_workflows

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130
MODEL_MAPS = ("tiny",)  # runtime.model_map.MODEL_MAPS, repeated so that `--help` imports nothing heavy


class UsageError(Exception):
    """Bad input to a command (missing file, unreadable workflow, bad --set): exit 2 with the message."""


# --- arguments ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``ipadapter`` command (one sub-command per action)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="print tracebacks of failures")

    folders = argparse.ArgumentParser(add_help=False)
    folders.add_argument("--models-dir", help="ComfyUI-layout models folder (default ./models)")
    folders.add_argument("--input-dir", help="folder LoadImage reads from (default ./input)")
    folders.add_argument("--output-dir", help="folder SaveImage writes to (default ./output)")
    folders.add_argument("--extra-model-paths", metavar="YAML",
                         help="a ComfyUI extra_model_paths.yaml (default: one next to the models folder or in .)")

    workflow = argparse.ArgumentParser(add_help=False)
    workflow.add_argument("workflow", help="workflow file: API or UI format JSON, or a PNG saved by ComfyUI")
    workflow.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE_ID.INPUT=VALUE",
                          help="change an input before running (repeatable), e.g. --set 3.seed=42")
    workflow.add_argument("--model-map", choices=MODEL_MAPS, default=None,
                          help="run on stand-in models: 'tiny' maps the workflow's real model file names onto the tiny "
                               "set (built once into --models-dir, default $IPADAPTER_TINY_CACHE or "
                               "~/.cache/ipadapter_nodes/tiny-models), shrinks latents to 64 px and steps to 2, and "
                               "generates missing input images")

    parser = argparse.ArgumentParser(prog="ipadapter", description="Run ComfyUI IP-Adapter workflows headless.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("run", parents=[common, folders, workflow], help="validate and run a workflow")
    sub.add_parser("validate", parents=[common, folders, workflow], help="check a workflow, run nothing")
    nodes = sub.add_parser("nodes", parents=[common, folders], help="list every node class with its inputs")
    nodes.add_argument("--json", action="store_true", help="print /object_info-like JSON")
    demo = sub.add_parser("demo", parents=[common], help="build tiny models and run the shipped demo workflow")
    demo.add_argument("--models-dir", help="where the tiny models go (default $IPADAPTER_TINY_CACHE or "
                                           "~/.cache/ipadapter_nodes/tiny-models)")
    demo.add_argument("--output-dir", help="where the image is written (default ./output)")
    models = sub.add_parser("models", parents=[common], help="describe each file in the ipadapter folder")
    models.add_argument("--models-dir", help="ComfyUI-layout models folder (default ./models)")
    models.add_argument("--extra-model-paths", metavar="YAML", help="a ComfyUI extra_model_paths.yaml")
    convert = sub.add_parser("convert", parents=[common, folders], help="print the API form of a UI workflow")
    convert.add_argument("workflow", help="UI-format workflow JSON (or a PNG saved by ComfyUI)")
    sub.add_parser("workflows", parents=[common], help="list the shipped workflows and what each shows")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ipadapter`` command; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage/help
        return EXIT_OK if exc.code in (0, None) else EXIT_INVALID
    if not getattr(args, "debug", False):
        _quiet_libraries()
    command = {"run": _cmd_run, "validate": _cmd_validate, "nodes": _cmd_nodes, "demo": _cmd_demo,
               "models": _cmd_models, "convert": _cmd_convert, "workflows": _cmd_workflows}[args.command]
    try:
        return command(args)
    except UsageError as exc:
        _error(str(exc))
        return EXIT_INVALID
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # stdout was closed early (e.g. `ipadapter nodes | head`): stop quietly; point stdout at devnull
        # so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


def _quiet_libraries() -> None:
    """Keep the libraries' weight-loading bars and advice out of the command's output (``--debug`` keeps them)."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("transformers", "diffusers", "huggingface_hub", "insightface"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _load_valid(args: argparse.Namespace) -> tuple | None:
    """Folders set up, the workflow loaded (and model-mapped) and strictly validated:
    (node classes, loaded workflow, coerced prompt, output ids), or None after printing the errors."""
    _configure(args)
    node_classes = _node_classes()
    loaded, prompt = _load_mapped(args, node_classes)
    prompt, outputs = _validated(prompt, node_classes, loaded.ui_titles, strict=True)
    if prompt is None:
        return None
    return node_classes, loaded, prompt, outputs


# --- commands -----------------------------------------------------------------------------------------
def _cmd_run(args: argparse.Namespace) -> int:
    from .executor import ExecutionInterrupted, Executor, NodeExecutionError, PromptError

    valid = _load_valid(args)
    if valid is None:
        return EXIT_INVALID
    node_classes, loaded, prompt, outputs = valid
    extra_pnginfo = loaded.extra_pnginfo or None
    executor = Executor(node_classes)
    try:
        result = executor.execute(prompt, extra_pnginfo=extra_pnginfo, outputs=outputs, ui_titles=loaded.ui_titles)
    except (KeyboardInterrupt, ExecutionInterrupted):
        _error("interrupted")
        return EXIT_INTERRUPTED
    except PromptError as exc:
        _error(f"invalid workflow: {exc}")
        return EXIT_INVALID
    except NodeExecutionError as exc:
        if args.debug:
            traceback.print_exception(exc.__cause__ or exc, file=sys.stderr)
        _error(f"{exc}" + ("" if args.debug else "  (run with --debug for the traceback)"))
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - a runner bug still gets a message, not a bare traceback
        if args.debug:
            traceback.print_exception(exc, file=sys.stderr)
        _error(f"execution failed: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    written = written_files(result.ui)
    for path in written:
        print(path)
    summary = f"done: {len(result.executed)} node(s) executed, {len(result.cached)} cached"
    print(summary if written else summary + "; no files written", file=sys.stderr)
    return EXIT_OK


def _cmd_validate(args: argparse.Namespace) -> int:
    valid = _load_valid(args)
    if valid is None:
        return EXIT_INVALID
    _, _, prompt, outputs = valid
    print(f"valid: {len(prompt)} node(s), output node(s) {', '.join(map(str, outputs or [])) or 'none'}")
    return EXIT_OK


def _cmd_nodes(args: argparse.Namespace) -> int:
    from .registry import display_names

    _configure(args)
    print_nodes(_node_classes(), display_names(), as_json=args.json)
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    models_dir = Path(args.models_dir).expanduser() if args.models_dir else demo.default_cache_dir()
    # The reference image lives beside the tiny models, so the demo leaves nothing in the current folder
    # except its output image.
    input_dir = models_dir.resolve().parent / "demo-input"
    print(f"preparing tiny models in {models_dir} ...", file=sys.stderr)
    demo.prepare_demo(models_dir, input_dir)
    run_args = argparse.Namespace(
        workflow=str(demo.DEMO_WORKFLOW), overrides=[], models_dir=str(models_dir), input_dir=str(input_dir),
        output_dir=args.output_dir, extra_model_paths=None, debug=args.debug, model_map=None,
    )
    return _cmd_run(run_args)


def _cmd_models(args: argparse.Namespace) -> int:
    _configure(args)
    print_ipadapter_files()
    return EXIT_OK


def _cmd_workflows(args: argparse.Namespace) -> int:
    print_workflows()
    return EXIT_OK


def _cmd_convert(args: argparse.Namespace) -> int:
    _configure(args)
    args.overrides = []
    _loaded, prompt = _load(args, _node_classes())
    print(json.dumps(prompt, indent=2))
    return EXIT_OK


# --- shared steps ----------------------------------------------------------------------------------
def _configure(args: argparse.Namespace) -> None:
    from .models import ExtraModelPathsError, configure_folders

    try:
        configure_folders(
            models_dir=getattr(args, "models_dir", None),
            input_dir=getattr(args, "input_dir", None),
            output_dir=getattr(args, "output_dir", None),
            extra_model_paths=getattr(args, "extra_model_paths", None),
        )
    except ExtraModelPathsError as exc:
        raise UsageError(str(exc)) from exc


def _node_classes() -> dict[str, type]:
    from .registry import node_classes

    return node_classes()


def _load_mapped(args: argparse.Namespace, node_classes: dict[str, type]) -> tuple[Any, dict[str, Any]]:
    """:func:`_load`, through ``--model-map`` when one is chosen: the tiny set is built, the folders point at it
    (and at stand-in inputs when the input folder lacks some), and the prompt names the tiny files."""
    if not getattr(args, "model_map", None):
        return _load(args, node_classes)
    from . import model_map
    from .demo import default_cache_dir

    models_dir = Path(args.models_dir).expanduser() if args.models_dir else default_cache_dir()
    if not model_map.tiny_assets.is_current(models_dir):
        print(f"preparing tiny models in {models_dir} ...", file=sys.stderr)
    models_dir = model_map.prepare_models(models_dir)
    loaded, prompt = _load(args, node_classes, before_overrides=model_map.shrink)
    try:
        prompt = model_map.rename(prompt, models_dir)
    except model_map.ModelMapError as exc:
        raise UsageError(str(exc)) from exc
    user_input = Path(args.input_dir).expanduser() if args.input_dir else Path.cwd() / "input"
    plan = model_map.provide_inputs(model_map.input_names(prompt), user_input, models_dir)
    for note in plan.notes:
        _error(note)
    _configure(argparse.Namespace(models_dir=str(models_dir), input_dir=str(plan.input_dir),
                                  output_dir=args.output_dir, extra_model_paths=args.extra_model_paths))
    return loaded, prompt


def _load(args: argparse.Namespace, node_classes: dict[str, type],
          before_overrides: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> tuple[Any, dict[str, Any]]:
    """Read the workflow and apply --set; bad input becomes a :class:`UsageError`.

    ``before_overrides`` rewrites the loaded prompt before --set (so an explicit --set wins over it).
    """
    from .registry import display_names
    from .workflow import WorkflowFormatError, apply_overrides, load_workflow

    try:
        loaded = load_workflow(Path(args.workflow), node_classes, display_names())
        prompt = before_overrides(loaded.prompt) if before_overrides else loaded.prompt
        prompt = apply_overrides(prompt, list(args.overrides)) if args.overrides else prompt
    except (WorkflowFormatError, ValueError, OSError) as exc:
        # Workflow errors already name the file.
        raise UsageError(str(exc) if isinstance(exc, WorkflowFormatError) else f"{args.workflow}: {exc}") from exc
    _check_override_names(prompt, args.overrides, node_classes)
    return loaded, prompt


def _check_override_names(prompt: dict[str, Any], overrides: Sequence[str], node_classes: dict[str, type]) -> None:
    """Refuse ``--set`` of an input the node's class does not have (a typo would otherwise be ignored)."""
    for item in overrides:
        node_id, _, name = item.partition("=")[0].strip().partition(".")
        cls = node_classes.get(prompt.get(node_id, {}).get("class_type"))
        if cls is None:
            continue  # unknown classes are reported by validation
        spec = cls.INPUT_TYPES()
        known = [*(spec.get("required") or {}), *(spec.get("optional") or {})]
        if name not in known:
            raise UsageError(
                f"--set {item!r}: node {node_id} ({prompt[node_id]['class_type']}) has no input '{name}'; "
                f"its inputs are: {', '.join(known) or '(none)'}"
            )


def _validated(prompt: dict[str, Any], node_classes: dict[str, type], ui_titles: dict[str, Any] | None,
               strict: bool = False):
    """(prompt to run, output ids), or (None, None) after printing every validation error.

    Like ComfyUI, a workflow where some outputs are valid runs those (the others' errors are printed);
    ``strict`` (``validate``) treats any error as invalid.
    """
    from .validate import validate_prompt
    from .validation_report import format_errors

    result = validate_prompt(prompt, node_classes, ui_titles=ui_titles)
    if not result.ok:
        _error(format_errors(result, ui_titles=ui_titles))
        return None, None
    if strict and result.node_errors:
        valid = ", ".join(result.outputs)
        _error(f"Workflow has errors (only output(s) {valid} could run):")
        _error(format_errors(dataclasses.replace(result, ok=False), ui_titles=ui_titles))
        return None, None
    if result.node_errors:
        _error(format_errors(result, ui_titles=ui_titles))
    coerced = result.coerced
    if isinstance(coerced, dict) and coerced and all(isinstance(n, dict) and "class_type" in n for n in coerced.values()):
        prompt = coerced
    return prompt, list(result.outputs) if result.outputs else None


def written_files(ui: dict[str, dict[str, Any]]) -> list[str]:
    """Paths of the files the output nodes reported (``{"images": [{"filename", "subfolder", "type"}]}``)."""
    from ..core import folders

    provider = folders.provider()
    roots = {"output": provider.get_output_directory(), "temp": provider.get_temp_directory(),
             "input": provider.get_input_directory()}
    paths = []
    for node_ui in ui.values():
        for items in (node_ui or {}).values():
            for item in items if isinstance(items, list) else []:
                if isinstance(item, dict) and "filename" in item:
                    root = roots.get(item.get("type", "output"), roots["output"])
                    paths.append(os.path.join(root, item.get("subfolder") or "", item["filename"]))
    return paths


def _error(message: str) -> None:
    print(message, file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
