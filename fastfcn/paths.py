"""Output-path checks the commands run before any long work, so that a bad ``--out`` fails in
the first second with one line instead of after an hour of training or segmenting. They
create nothing: a run that fails validation leaves the file system as it was."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError


def _nearest_existing(path: Path) -> Path:
    """The path itself or its closest ancestor that exists (``.`` for a relative path)."""
    for p in (path, *path.parents):
        if os.path.lexists(p):
            return p
    return Path(".")


def _check_parent_chain(folder: Path, path: Path, what: str) -> None:
    """``folder`` (where ``path`` goes) exists as a writable folder or can be created."""
    anc = _nearest_existing(folder)
    if not anc.is_dir():
        raise InputError(f"{what} {path}: {anc} is a file, not a folder; expected a path under a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise InputError(f"{what} {path}: the folder {anc} is not writable")


def check_output_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """``path`` can be a folder to write into: it is one, or it can be created (every existing
    part of it is a writable folder). Returns it as a Path; raises InputError naming it."""
    path = Path(path)
    if str(path) == "":
        raise InputError(f"{what} is empty; expected a folder path")
    if os.path.lexists(path) and not path.is_dir():
        raise InputError(f"{what} {path}: this is a file, not a folder")
    _check_parent_chain(path, path, what)
    return path


def check_output_file(path: str | os.PathLike, what: str = "the output") -> Path:
    """``path`` can be written as a file: not a folder, and its folder exists or can be created."""
    path = Path(path)
    if str(path) == "" or path.name in ("", ".", ".."):
        raise InputError(f"{what} {str(path)!r} is not a file name")
    if path.is_dir():
        raise InputError(f"{what} {path}: this is a folder; expected a file path")
    _check_parent_chain(path.parent, path, what)
    return path
