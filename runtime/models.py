"""Model, input and output folders for a headless run, in ComfyUI's layout.

``configure_folders`` builds a :class:`core.folders.FolderLayout` (``<models>/<folder>/...``, plus the
folders an ``extra_model_paths.yaml`` adds) and installs it with ``core.folders.configure``.

``extra_model_paths.yaml`` is ComfyUI's format: top-level sections, each a mapping with an optional
``base_path`` (``~`` and ``$VARS`` expanded; relative to the YAML's folder), an optional ``is_default`` and
``<folder_name>: path`` entries, where a path may be a ``|`` block of several lines.  Relative paths are
joined to ``base_path``, or to the YAML's folder when the section has none.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from ..core import folders

EXTRA_MODEL_PATHS_NAME = "extra_model_paths.yaml"
# ComfyUI's legacy folder names.
_FOLDER_ALIASES = {"unet": "diffusion_models", "clip": "text_encoders"}
# Keys of a section that are settings, not folders.
_SECTION_SETTINGS = ("base_path", "is_default")


class ExtraModelPathsError(ValueError):
    """An extra_model_paths.yaml file could not be read or has the wrong shape."""


def read_extra_model_paths_by_priority(path: str | os.PathLike) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Folder name → absolute paths listed in a ComfyUI ``extra_model_paths.yaml``.

    Returns (paths of sections marked ``is_default: true``, paths of the other sections), each folder name →
    absolute paths in file order.  Raises :class:`ExtraModelPathsError` naming the file.
    """
    yaml_path = Path(path).expanduser().resolve()
    try:
        config = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ExtraModelPathsError(f"cannot read extra model paths file '{yaml_path}': {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ExtraModelPathsError(f"'{yaml_path}' is not valid YAML: {exc}") from exc
    if config is None:
        return {}, {}
    if not isinstance(config, dict):
        raise ExtraModelPathsError(
            f"'{yaml_path}': expected sections (a mapping of name → folders), found {type(config).__name__}"
        )
    defaults: dict[str, list[str]] = {}
    others: dict[str, list[str]] = {}
    for section_name, section in config.items():
        if section is None:
            continue  # ComfyUI skips empty sections
        if not isinstance(section, dict):
            raise ExtraModelPathsError(
                f"'{yaml_path}': section '{section_name}' must map folder names to paths, "
                f"found {type(section).__name__}"
            )
        base = _base_path(section, yaml_path, section_name)
        target = defaults if section.get("is_default") else others
        for folder, value in section.items():
            if folder in _SECTION_SETTINGS:
                continue
            name = _FOLDER_ALIASES.get(str(folder), str(folder))
            for entry in _path_lines(value, yaml_path, section_name, folder):
                full = os.path.join(base, entry) if base else os.path.join(yaml_path.parent, entry)
                target.setdefault(name, []).append(os.path.normpath(full))
    return defaults, others


def read_extra_model_paths(path: str | os.PathLike) -> dict[str, list[str]]:
    """Folder name → absolute paths listed in a ComfyUI ``extra_model_paths.yaml``.

    Within a folder, paths of sections marked ``is_default: true`` come first (ComfyUI puts them before
    its own folder); otherwise file order.  Raises :class:`ExtraModelPathsError` naming the file.
    """
    merged: dict[str, list[str]] = {}
    for table in read_extra_model_paths_by_priority(path):
        for name, paths in table.items():
            bucket = merged.setdefault(name, [])
            bucket.extend(p for p in paths if p not in bucket)
    return merged


def _base_path(section: dict[str, Any], yaml_path: Path, section_name: Any) -> str | None:
    base = section.get("base_path")
    if base is None:
        return None
    if not isinstance(base, str):
        raise ExtraModelPathsError(
            f"'{yaml_path}': base_path of section '{section_name}' must be a path, found {base!r}"
        )
    base = os.path.expandvars(os.path.expanduser(base.strip()))
    if not os.path.isabs(base):
        base = os.path.join(yaml_path.parent, base)
    return os.path.normpath(base)


def _path_lines(value: Any, yaml_path: Path, section_name: Any, folder: Any) -> list[str]:
    # A "|" block gives one string with a path per line; a YAML list is accepted too.
    if isinstance(value, str):
        items = value.split("\n")
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = value
    else:
        raise ExtraModelPathsError(
            f"'{yaml_path}': '{folder}' in section '{section_name}' must be a path or a '|' block of paths, "
            f"found {value!r}"
        )
    return [os.path.expandvars(os.path.expanduser(item.strip())) for item in items if item.strip()]


def find_extra_model_paths(models_dir: str | os.PathLike | None = None) -> Path | None:
    """The ``extra_model_paths.yaml`` ComfyUI would use: next to the models folder (in its parent, the
    ComfyUI root), else in the current directory; None when there is none."""
    candidates = []
    if models_dir is not None:
        candidates.append(Path(models_dir).expanduser().resolve().parent / EXTRA_MODEL_PATHS_NAME)
    candidates.append(Path.cwd() / EXTRA_MODEL_PATHS_NAME)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def configure_folders(
    models_dir: str | os.PathLike | None = None,
    input_dir: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    extra_model_paths: str | os.PathLike | None = None,
    temp_dir: str | os.PathLike | None = None,
) -> folders.FolderLayout:
    """Install (and return) the headless folder layout.

    Defaults, relative to the current directory: ``./models``, ``./input``, ``./output``, ``./temp``.
    ``extra_model_paths``: a YAML file to read; when None, one found by :func:`find_extra_model_paths`
    is used if present.
    """
    cwd = Path.cwd()

    def absolute(value: str | os.PathLike | None, default: str) -> str:
        return str((Path(value).expanduser() if value is not None else cwd / default).resolve())

    yaml_path = Path(extra_model_paths) if extra_model_paths is not None else find_extra_model_paths(models_dir)
    preferred, extra = read_extra_model_paths_by_priority(yaml_path) if yaml_path is not None else ({}, {})
    layout = folders.FolderLayout(
        models_dirs=[absolute(models_dir, "models")],
        input_dir=absolute(input_dir, "input"),
        output_dir=absolute(output_dir, "output"),
        temp_dir=absolute(temp_dir, "temp"),
        extra_paths=extra,
        preferred_paths=preferred,
    )
    folders.configure(layout)
    return layout


def hub_hint(what: str) -> str:
    """Why diffusers could not get a single file's configuration: offline, or the Hub did not answer."""
    if any(os.environ.get(v) == "1" for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return "this process is offline (HF_HUB_OFFLINE=1)"
    return f"diffusers could not fetch {what} from the Hugging Face Hub"
