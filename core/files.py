"""Writing output files safely: numbered names inside an output folder, never overwriting, never partial.

Every writer of the pack (SaveImage and the animated savers, the embeds saver) goes through here, so the rules
live in one place: a ``filename_prefix`` may name sub-folders but never leave its root; counters continue the
highest one already present (``<base>_00001_``, ``<base>_00002_``, ... as ComfyUI numbers them); bytes go to a
hidden temporary file in the same folder that is hard-linked to the final name only if that name is still free
(where hard links are not supported the name is reserved with an exclusive create, then replaced), and the
temporary file is removed on any exception, KeyboardInterrupt included.
"""
from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Any, Callable

from . import folders


def numbered_target(root: str | os.PathLike, prefix: str, outside: Callable[[str], str],
                    what: str = "filename_prefix") -> tuple[Path, str, str, int]:
    """(folder, subfolder relative to ``root``, file name base, next counter) for ``prefix`` inside ``root``.

    The folder is created. A prefix that is absolute or leaves ``root`` raises ``PathOutsideFolderError`` with
    the message ``outside(prefix)``; one without a file name part raises ValueError.
    """
    prefix = prefix.replace("\\", "/")
    subfolder, _, base = prefix.rpartition("/")
    if not base:
        raise ValueError(f"{what} '{prefix}' has no file name part; give e.g. 'my_folder/name'")
    if os.path.isabs(prefix):
        raise folders.PathOutsideFolderError(outside(prefix))
    try:
        folder = folders.resolve_inside(root, subfolder or ".", what=what)
    except folders.PathOutsideFolderError:
        raise folders.PathOutsideFolderError(outside(prefix)) from None
    folder.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(re.escape(base) + r"_(\d+)")
    counters = [int(m.group(1)) for entry in os.scandir(folder) if (m := pattern.match(entry.name))]
    relative = os.path.relpath(folder, Path(root).resolve()).replace(os.sep, "/")
    return folder, "" if relative == "." else relative, base, max(counters, default=0) + 1


def write_new_file(folder: Path, name_for: Callable[[int], str], counter: int,
                   write: Callable[[Any], None]) -> tuple[str, int]:
    """Write ``write(file)`` to a new file ``folder / name_for(counter)``, raising the counter past names that
    exist (also ones taken by a concurrent writer). Returns (file name, counter used)."""
    temp = _write_temp(folder, name_for(counter), write)
    try:
        while True:
            final = folder / name_for(counter)
            if _publish(temp, final):
                return final.name, counter
            counter += 1
    finally:
        temp.unlink(missing_ok=True)


def write_new(path: Path, write: Callable[[Any], None]) -> None:
    """Write ``write(file)`` to exactly ``path``; FileExistsError if that name exists (nothing is overwritten)."""
    temp = _write_temp(path.parent, path.name, write)
    try:
        if not _publish(temp, path):
            raise FileExistsError(f"'{path}' already exists and is never overwritten")
    finally:
        temp.unlink(missing_ok=True)


def _write_temp(folder: Path, name: str, write: Callable[[Any], None]) -> Path:
    temp = folder / f".{name}.{secrets.token_hex(6)}.part"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


def _publish(temp: Path, final: Path) -> bool:
    """Give ``temp`` the name ``final`` if that name is free; False if it is taken."""
    try:
        os.link(temp, final)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links on this file system: reserve the name exclusively, then replace it
        try:
            os.close(os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            return False
        try:
            os.replace(temp, final)
        except BaseException:
            final.unlink(missing_ok=True)
            raise
        return True
