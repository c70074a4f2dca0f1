"""Paths of the commands' inputs and outputs.

Output-path checks run before any long work, so that a bad ``--out`` fails in the first
second with one line instead of after an hour of training or segmenting; they create
nothing: a run that fails validation leaves the file system as it was. ``collect_images``
finds the image files named on a command line; ``plan_outputs`` names the files
``fastfcn segment`` and ``fastfcn batch`` write for them; ``atomic_path`` is the one atomic
write every output goes through."""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .imageio import IMAGE_SUFFIXES, check_regular_file


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


@dataclass(frozen=True)
class Job:
    """One image to segment: ``src`` as found, ``labels`` and ``overlay`` the files to write."""

    src: Path
    labels: Path
    overlay: Path


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _walk(root: Path, recursive: bool, exclude: Path | None):
    """Image files (by suffix) under ``root``, sorted; subfolders only when ``recursive``; never
    the folder ``exclude`` (the output folder) or anything under it. Entries are not opened or
    filtered by type here: read_image refuses FIFOs and devices from stat."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if exclude is not None:
            dirnames[:] = [d for d in dirnames if not _within(Path(dirpath, d).resolve(), exclude)]
        for name in sorted(filenames):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(dirpath, name)
        if not recursive:
            return


def collect_images(inputs: list[str], out: str | os.PathLike | None = None,
                   recursive: bool = False) -> list[tuple[Path, Path]]:
    """``[(file, base)]``: the image files named directly (base: their folder) and the image
    files by suffix in named folders (base: that folder; subfolders with ``recursive``), in
    order, each file once. Raises InputError for a missing input, a named FIFO/device, a folder
    without images, and for an output folder ``out`` that holds an input (it would be
    overwritten or read back); ``out`` inside an input folder is skipped while walking."""
    out_r = Path(out).resolve() if out is not None else None
    found: list[tuple[Path, Path]] = []
    for item in inputs:
        p = Path(item)
        if not os.path.lexists(p):
            raise InputError(f"{p}: no such file or directory")
        pr = p.resolve()
        if out_r is not None and _within(pr, out_r):
            raise InputError(f"--out {out} holds the input {p}; choose an output folder outside the inputs")
        if p.is_dir():
            files = list(_walk(p, recursive, out_r))
            if not files:
                where = "or its subfolders " if recursive else ""
                raise InputError(
                    f"{p}: no images in this folder {where}(looked for {', '.join(IMAGE_SUFFIXES)})"
                )
            found += [(f, p) for f in files]
        else:
            check_regular_file(p)  # a FIFO or device named on the command line is refused unopened
            found.append((p, p.parent))
    seen: set[Path] = set()
    unique = []
    for f, base in found:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((f, base))
    return unique


def plan_outputs(found: list[tuple[Path, Path]], out: str | os.PathLike) -> list[Job]:
    """Output paths that mirror the inputs' folders: ``OUT/labels/<rel>.png`` and
    ``OUT/overlays/<rel>.png``, where ``<rel>`` is the file's path relative to the common
    folder of all inputs (so ``cam1/a.png`` and ``cam2/a.png`` stay apart) with its suffix
    replaced by .png, or kept (``a.jpg.png``) where two inputs of one folder share a stem.
    Labels and overlays live in separate trees, so no input name can make them collide.
    Raises InputError naming both inputs if two would still write the same file."""
    out = Path(out)
    bases = [os.path.abspath(b) for _, b in found]
    try:
        root = os.path.commonpath(bases) if bases else ""
    except ValueError:  # Windows: no common folder across drives
        raise InputError("the inputs are on different drives; segment each drive's in its own run") from None
    rels = [Path(os.path.relpath(os.path.abspath(f), root)) for f, _ in found]
    stems: dict[tuple[Path, str], int] = {}
    for r in rels:
        key = (r.parent, r.stem.lower())
        stems[key] = stems.get(key, 0) + 1
    jobs, owner = [], {}
    for (f, _), r in zip(found, rels):
        name = f"{r.stem}.png" if stems[(r.parent, r.stem.lower())] == 1 else f"{r.name}.png"
        rel = r.parent / name
        key = str(rel).lower()  # case-insensitive file systems (macOS, Windows) collide too
        if key in owner:
            raise InputError(f"{owner[key]} and {f} would both write {rel} under --out; rename one of them")
        owner[key] = f
        jobs.append(Job(f, out / "labels" / rel, out / "overlays" / rel))
    return jobs


def second_file_name(image, where: str, stem: str, names, modality: str) -> str:
    """The one name of ``names`` (the files of the folder ``where``) that holds ``image``'s second
    modality: ``stem`` with an image suffix. InputError when there is none or several."""
    found = sorted(n for n in names if os.path.splitext(n)[0] == stem
                   and os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES)  # fmt: skip
    if len(found) != 1:
        what = f"several ({', '.join(found)})" if found else "none"
        raise InputError(
            f"{image}: its {modality} file must be {where}/{stem}.<png|tif|...>, one file named as the "
            f"image; found {what}"
        )
    return found[0]


def local_files(where) -> list[str]:
    """The names of the files in the local folder ``where`` (none when it is no folder)."""
    if not os.path.isdir(where):
        return []
    with os.scandir(where) as entries:
        return [e.name for e in entries if e.is_file()]


class StemIndex:
    """The files of folders by stem, each folder listed once, for pairing many images:
    ``match_file`` listing the folder again for every image took 11.9 s for 3,000 images in one
    folder (2-core AMD EPYC Zen 4), quadratic in their number; one index pairs them in 68 ms.
    list_files(folder) -> file names: local folders (``os.scandir``) unless given (the Ray job
    lists folders at URIs through pyarrow)."""

    def __init__(self, list_files=None) -> None:
        self._list = list_files or local_files
        self._folders: dict = {}

    def names(self, where, stem: str) -> list[str]:
        """The names of the files of ``where`` whose stem is ``stem``."""
        by_stem = self._folders.get(where)
        if by_stem is None:
            by_stem = self._folders[where] = {}
            for name in self._list(where):
                by_stem.setdefault(os.path.splitext(name)[0], []).append(name)
        return by_stem.get(stem, [])


def match_file(image: Path, base: Path, folder: Path, modality: str, index: StemIndex | None = None) -> Path:
    """The file of ``folder`` that holds ``image``'s second modality: the same path relative to
    the image's input folder ``base``, with any image suffix (NYUDv2: images/img_5001.png ->
    depth/img_5001.png, hha/img_5001.png). InputError when there is none or several. Pass one
    ``index`` for all the images of a run, so each folder is listed once."""
    rel = Path(os.path.relpath(image, base))
    where = folder / rel.parent
    names = (index or StemIndex()).names(where, rel.stem)
    return where / second_file_name(image, str(where), rel.stem, names, modality)


def head_output(path: Path, out: Path, head: str | None) -> Path:
    """Where a net with several heads writes ``head``'s version of the output ``path`` planned
    under ``out``: a folder per head at the top of its tree (``OUT/labels/<rel>`` ->
    ``OUT/labels/<head>/<rel>``, ``OUT/overlays/<rel>`` -> ``OUT/overlays/<head>/<rel>``);
    ``path`` itself for ``head`` None (one head)."""
    if head is None:
        return path
    tree, *rest = path.relative_to(out).parts
    return out.joinpath(tree, head, *rest)


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
