"""Where model files, inputs and outputs live.

Nodes ask this module for file lists and paths; they never know whether they run inside ComfyUI or
headless.  Inside ComfyUI the answers come from ComfyUI's own ``folder_paths`` module; headless, the
runtime installs a :class:`FolderLayout` with :func:`configure`.

Folder names follow ComfyUI: ``checkpoints``, ``clip_vision``, ``ipadapter``, ``loras``, ``controlnet``,
``insightface``, ... Sub-folders are allowed; names are relative paths with forward slashes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

MODEL_EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".sft")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class PathOutsideFolderError(ValueError):
    """A file name input tried to leave the folder it must stay in."""


class FolderProvider(Protocol):
    def get_folder_paths(self, folder: str) -> list[str]: ...
    def get_filename_list(self, folder: str) -> list[str]: ...
    def get_full_path(self, folder: str, name: str) -> str | None: ...
    def get_input_directory(self) -> str: ...
    def get_output_directory(self) -> str: ...
    def get_temp_directory(self) -> str: ...


def resolve_inside(root: str | os.PathLike, name: str, what: str = "file") -> Path:
    """Join ``name`` onto ``root`` and refuse any result outside ``root`` (``..``, absolute paths, links).

    Raises :class:`PathOutsideFolderError` naming the input and the folder.
    """
    root_path = Path(root).resolve()
    candidate = (root_path / name).resolve()
    if os.path.isabs(name) or (candidate != root_path and root_path not in candidate.parents):
        raise PathOutsideFolderError(
            f"{what} '{name}' points outside its folder '{root_path}'; use a name relative to that folder "
            f"without '..' or an absolute path"
        )
    return candidate


@dataclass
class FolderLayout:
    """Headless folder layout in ComfyUI's shape: ``<models_dir>/<folder>/...`` plus extra paths."""

    models_dirs: list[str] = field(default_factory=lambda: [os.path.join(os.getcwd(), "models")])
    input_dir: str = field(default_factory=lambda: os.path.join(os.getcwd(), "input"))
    output_dir: str = field(default_factory=lambda: os.path.join(os.getcwd(), "output"))
    temp_dir: str = field(default_factory=lambda: os.path.join(os.getcwd(), "temp"))
    # extra paths per folder name, e.g. from extra_model_paths.yaml: ``preferred_paths`` (sections marked
    # is_default) are searched before models_dirs, ``extra_paths`` after them, as ComfyUI orders them.
    extra_paths: dict[str, list[str]] = field(default_factory=dict)
    preferred_paths: dict[str, list[str]] = field(default_factory=dict)

    def get_folder_paths(self, folder: str) -> list[str]:
        aliases = {"unet": "diffusion_models", "clip": "text_encoders"}
        folder = aliases.get(folder, folder)
        paths = list(self.preferred_paths.get(folder, []))
        paths += [os.path.join(d, folder) for d in self.models_dirs]
        paths += self.extra_paths.get(folder, [])
        return list(dict.fromkeys(paths))

    def get_filename_list(self, folder: str) -> list[str]:
        names: set[str] = set()
        for base in self.get_folder_paths(folder):
            if not os.path.isdir(base):
                continue
            for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                rel_dir = os.path.relpath(dirpath, base)
                for f in filenames:
                    rel = f if rel_dir == "." else os.path.join(rel_dir, f)
                    names.add(rel.replace(os.sep, "/"))
        return sorted(names)

    def get_full_path(self, folder: str, name: str) -> str | None:
        for base in self.get_folder_paths(folder):
            try:
                path = resolve_inside(base, name, what=f"{folder} file")
            except PathOutsideFolderError:
                raise
            if path.exists():
                return str(path)
        return None

    def get_input_directory(self) -> str:
        return self.input_dir

    def get_output_directory(self) -> str:
        return self.output_dir

    def get_temp_directory(self) -> str:
        return self.temp_dir


class _ComfyFolders:
    """Adapter over ComfyUI's ``folder_paths`` (only constructed when that module imports)."""

    def __init__(self, folder_paths_module) -> None:
        self.fp = folder_paths_module
        # ComfyUI does not know 'ipadapter' or 'insightface'; register them without dropping paths that
        # extra_model_paths.yaml may already have added.
        for name in ("ipadapter", "insightface"):
            existing = self.fp.folder_names_and_paths.get(name, ([], set()))[0]
            default = os.path.join(self.fp.models_dir, name)
            paths = list(existing) if existing else [default]
            self.fp.folder_names_and_paths[name] = (paths, set(self.fp.supported_pt_extensions))

    def get_folder_paths(self, folder):
        return list(self.fp.get_folder_paths(folder))

    def get_filename_list(self, folder):
        return list(self.fp.get_filename_list(folder))

    def get_full_path(self, folder, name):
        return self.fp.get_full_path(folder, name)

    def get_input_directory(self):
        return self.fp.get_input_directory()

    def get_output_directory(self):
        return self.fp.get_output_directory()

    def get_temp_directory(self):
        return self.fp.get_temp_directory()


_provider: FolderProvider | None = None


def configure(provider: FolderProvider) -> None:
    """Install the folder provider (the headless runtime calls this with a :class:`FolderLayout`)."""
    global _provider
    _provider = provider


def provider() -> FolderProvider:
    """The active provider: the configured one, else ComfyUI's ``folder_paths`` if present, else defaults."""
    global _provider
    if _provider is None:
        try:
            import folder_paths  # type: ignore  # only exists inside ComfyUI

            _provider = _ComfyFolders(folder_paths)
        except ImportError:
            _provider = FolderLayout()
    return _provider


def get_filename_list(folder: str) -> list[str]:
    return provider().get_filename_list(folder)


def get_folder_paths(folder: str) -> list[str]:
    return provider().get_folder_paths(folder)


def get_full_path(folder: str, name: str) -> str | None:
    return provider().get_full_path(folder, name)


def get_full_path_or_raise(folder: str, name: str, node: str | None = None) -> str:
    """Like :func:`get_full_path` but raises ``FileNotFoundError`` naming the folders searched."""
    path = get_full_path(folder, name)
    if path is None:
        where = ", ".join(get_folder_paths(folder)) or "(no folders configured)"
        prefix = f"{node}: " if node else ""
        raise FileNotFoundError(f"{prefix}'{name}' was not found in the '{folder}' folders: {where}")
    return path


def list_models(folder: str, is_model_folder: Callable[[Path, list[str]], bool],
                extensions: Iterable[str]) -> list[str]:
    """Names for a model combo: model folders (by their relative path, not their contents) and single files.

    ``is_model_folder(path, file_names)`` says whether a sub-folder is itself a model (a diffusers pipeline,
    a ControlNet, a motion adapter); its files are then its parts, not separate choices.  Other files count
    when their name ends with one of ``extensions``.  Hidden folders are skipped.
    """
    exts = tuple(e.lower() for e in extensions)
    names: set[str] = set()
    for base in get_folder_paths(folder):
        if not os.path.isdir(base):
            continue
        for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
            rel_dir = os.path.relpath(dirpath, base).replace(os.sep, "/")
            if rel_dir != "." and is_model_folder(Path(dirpath), filenames):
                names.add(rel_dir)
                dirnames[:] = []
                continue
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            names.update(f if rel_dir == "." else f"{rel_dir}/{f}" for f in filenames if f.lower().endswith(exts))
    return sorted(names)


def filter_extensions(names: Iterable[str], extensions: Iterable[str]) -> list[str]:
    exts = tuple(e.lower() for e in extensions)
    return [n for n in names if n.lower().endswith(exts)]
