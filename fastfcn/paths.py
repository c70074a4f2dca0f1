"""Output paths: the checks the commands run before any long work, so that a bad ``--out`` fails
in the first second with one line instead of after an hour of training or segmenting (they
create nothing: a run that fails validation leaves the file system as it was), and the one
atomic write every output goes through (``atomic_path``)."""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
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


TMP_TAG = ".fastfcn-tmp-"  # in every temporary name, so leftovers of killed writers can be found


def _new_file_mode() -> int:
    """The mode a plain open() gives a new file: 0666 minus the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | os.PathLike, *, durable: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; renames it over ``path`` when the block succeeds,
    so ``path`` is either the old file or the complete new one, and removes it when the block
    fails (KeyboardInterrupt included; only a SIGKILL or power loss can leave one behind, and it
    never replaces ``path``). The folder is created when missing.

    The temporary is ``.<stem>.fastfcn-tmp-<pid>-<random><suffix>``: unique per call, so
    concurrent writers never share one, and with the same suffix, so writers that pick a format
    by suffix pick the same. durable: also fsync it before the rename and give it the mode of
    the file it replaces (a new file: 0666 minus the umask, as open() gives; writers that use
    mkstemp leave 0600), for files that are kept and shared, such as checkpoints.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}{TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield tmp
        if durable:
            try:
                mode = stat.S_IMODE(os.stat(path).st_mode)
            except FileNotFoundError:
                mode = _new_file_mode()
            os.chmod(tmp, mode)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
