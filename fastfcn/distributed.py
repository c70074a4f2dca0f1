"""Scale-out on Ray Data: many images and videos, one Segmenter per actor, a manifest, resume.

    summary = segment_dataset(["photos/", "s3://bucket/clips/*.mp4"], "seg/", "fcn8s.safetensors",
                              concurrency=4, num_gpus_per_worker=1, overlays=True)

Outputs are named as ``fastfcn segment`` names them (``plan_outputs``: ``OUT/labels/<rel>.png``
and ``OUT/overlays/<rel>.png``, ``<rel>`` mirroring the inputs' subfolders); a video writes
``OUT/labels/<rel>.mkv`` (lossless class ids, ``segment_video(mode="labels")``) and, with a
picture, ``OUT/overlays/<rel>.mp4`` or ``OUT/side-by-side/<rel>.mp4``. A net with several heads
(SIFT Flow) writes each of these once per head, in a folder per head at the top of each tree
(``OUT/labels/semantic/<rel>.png``, ``OUT/overlays/geometric/<rel>.png``, ...), as ``segment`` does.
A net of two inputs (NYUDv2 fusion: nyud-fcn32s-color-d, -color-hha) takes ``depth=DIR`` or
``hha=DIR`` (``fastfcn batch --depth / --hha``): the driver pairs every image with its file there
as ``segment`` does (``pair_second``: the image's path relative to its input folder, any image
suffix; DIR local or a URI), every pair before Ray starts; the pair travels to the actor, which
reads both and runs ``seg.run(image, depth=...)``. Videos have no depth track: refused for these.

How the work is shared and why it survives failures:

- The driver lists the inputs (local folders and globs; any URI pyarrow reads: s3://, gs://,
  hdfs://, file://), plans every output, and drops the inputs that the manifest says are
  complete. Images become a Ray Dataset (``ray.data.from_items``) mapped by an actor pool
  (``map_batches`` with a class: each actor loads the Segmenter once); each actor reads its
  images itself (a batch's files at the same time), through pyarrow's file systems, the ones
  Ray Data's readers use. Why not ``ray.data.read_binary_files``: a file that cannot be read
  there fails its read task and so the whole run, where here it is one failed row; and its
  read tasks start worker processes of their own (the same 7 files through a 2-actor pool:
  15.6 s with the reader, 7.9 s without, 2-core EPYC). Videos go, one per task, through
  ``fastfcn.video.segment_video`` inside an actor, so every frame is written once and in order.
- Every output is written to a temporary name in its folder and renamed (``os.replace``,
  atomic): a worker killed mid-write leaves no partial file under an output name. Ray Data
  restarts a dead actor and re-runs its batch; the re-run rewrites the same files, and the
  batch's rows reach the driver once.
- The manifest (``OUT/manifest.jsonl``, one JSON object per input) is written by the driver
  alone, from the rows the workers return: a row is appended as it arrives (an interrupted run
  keeps what it finished) and the file is compacted to one row per input, atomically, at the
  end. One run at a time writes into a folder (``_exclusive``: a second one is refused, naming
  the first). ``resume`` treats an input as complete when its last row is ``ok``, every output it
  lists exists with the size it recorded and, for a two-input net, its row's ``second`` (the
  paired file) is the one paired now, and a local input (and depth / HHA file) still has the
  size and modification time the row recorded (``stamp``): one edited or replaced in place is
  redone. An input at a URI (and its depth / HHA file) is held to the size and
  modification time that the listing which found it gave (pyarrow's FileInfo: S3's
  LastModified), so an object rewritten under the same URI is redone too, at no request per
  input; a file system that gives no time is held to the size alone. A row also records the
  checkpoint that wrote it (``model``, its SHA-256): a run with another checkpoint redoes it.
- A failing input is tried ``ATTEMPTS`` times in its worker, then recorded as ``failed`` with
  the error; the others go on. An input that kills its actor (a decoder crash, the OOM killer)
  is found by the batch's journal in the output folder (``_Worker._journal``) and recorded
  failed after killing it ``ATTEMPTS`` times on its own; the rest of its batch is done.
  Nothing is dropped: an input without a row after the run is recorded as failed too.

Needs the ``ray`` extra: ``pip install 'fastfcn[ray]'``. On a multi-node cluster the inputs
must be on a shared file system or at a URI every node reads, and ``output`` on a shared file
system; the checkpoint is read once by the driver and shipped to the actors.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import socket
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import InputError
from .imageio import IMAGE_SUFFIXES
from .modalities import second_modality
from .paths import TMP_TAG, StemIndex, local_files
from .paths import atomic_path as _atomic

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".nut")
MODES = ("labels", "overlay", "side-by-side")
MANIFEST = "manifest.jsonl"
# A transient failure (a network file system, an out-of-memory batch) gets a second try; a
# corrupt file fails the same way twice, which costs one extra decode.
ATTEMPTS = 2
READ_THREADS = 8  # files of one batch read at the same time by an actor
_GLOB_CHARS = "*?["


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise InputError(
            "fastfcn.distributed needs Ray Data: pip install 'fastfcn[ray]' (or pip install 'ray[data]')"
        ) from None
    return ray


# ------------------------------------------------------------------------------------- inputs


def _is_uri(s: str) -> bool:
    return "://" in s


def _kind(name: str) -> str | None:
    suffix = PurePosixPath(name).suffix.lower()
    return "image" if suffix in IMAGE_SUFFIXES else "video" if suffix in VIDEO_SUFFIXES else None


def _glob_base(pattern: str) -> str:
    """The folder part of ``pattern`` before its first glob character ("data/cam*/x.png" -> "data")."""
    parts = PurePosixPath(pattern).parts
    fixed = []
    for p in parts:
        if any(c in p for c in _GLOB_CHARS):
            break
        fixed.append(p)
    return str(PurePosixPath(*fixed)) if fixed else "."


def _folders_once(tops, hidden: bool):
    """(folder, its sorted entries) for the folders ``tops`` and every folder under them, each
    entered once by identity (device, inode): the folders reached without links first, under
    their own names, then links to folders not yet entered. glob's ``**`` and pyarrow's
    recursive listing of file:// follow symlinked folders without end: one link to a folder
    above ("in/up -> ..") listed every image again at each depth, 40 deep, and two such links
    never ended (2^40 paths). hidden: whether names starting with "." are listed and entered
    (glob skips them). An unreadable folder is skipped, as both skip it."""
    from collections import deque

    folders, links = deque(tops), deque()
    seen: set[tuple[int, int]] = set()
    while folders or links:
        folder = folders.popleft() if folders else links.popleft()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                entries = sorted((e for e in it if hidden or e.name[:1] != "."), key=lambda e: e.name)
        except OSError:
            continue
        yield folder, entries
        for e in entries:
            if e.is_dir():
                (links if e.is_symlink() else folders).append(e.path)


def _glob(pattern: str) -> list[str]:
    """``glob.glob(pattern, recursive=True)``, except that ``**`` enters each folder once
    (``_folders_once``)."""
    parts = pattern.replace(os.sep, "/").split("/")
    if "**" not in parts:
        return glob.glob(pattern)
    i = parts.index("**")
    head, rest = "/".join(parts[:i]) or ("/" if i else "."), "/".join(parts[i + 1:])
    found: list[str] = []
    tops = sorted(f for f in glob.glob(head) if os.path.isdir(f))
    for folder, entries in _folders_once(tops, hidden=False):
        if rest:
            found.extend(_glob(os.path.join(glob.escape(folder), rest)))
        else:
            found.extend(e.path for e in entries if e.is_file())
    return found


def _inside(p: str, out: Path) -> bool:
    """The local path ``p`` is the folder ``out`` or under it (links resolved)."""
    r, out_r = Path(p).resolve(), out.resolve()
    return r == out_r or out_r in r.parents


def _local(item: str, out: Path) -> list[tuple[str, str]]:
    """[(file, base)] for a local file, folder (recursive) or glob; never anything under ``out``."""

    def inside_out(p: str) -> bool:
        return _inside(p, out)

    if any(c in item for c in _GLOB_CHARS) and not os.path.exists(item):
        base = os.path.abspath(_glob_base(item))
        files = sorted(f for f in _glob(item) if os.path.isfile(f))
        found = [(os.path.abspath(f), base) for f in files if _kind(f) and not inside_out(f)]
        if not found:
            raise InputError(f"{item}: no image or video matches this pattern")
        return found
    if not os.path.exists(item):
        raise InputError(f"{item}: no such file, folder or matching glob")
    if inside_out(item):
        raise InputError(f"the output folder {out} holds the input {item}; choose one outside the inputs")
    if os.path.isdir(item):
        found = []
        for dirpath, dirnames, filenames in os.walk(item):
            dirnames[:] = sorted(d for d in dirnames if not inside_out(os.path.join(dirpath, d)))
            found += [(os.path.abspath(os.path.join(dirpath, f)), os.path.abspath(item))
                      for f in sorted(filenames) if _kind(f)]  # fmt: skip
        if not found:
            raise InputError(f"{item}: no images ({', '.join(IMAGE_SUFFIXES)}) or videos "
                             f"({', '.join(VIDEO_SUFFIXES)}) in this folder or its subfolders")  # fmt: skip
        return found
    if _kind(item) is None:
        raise InputError(f"{item}: not an image ({', '.join(IMAGE_SUFFIXES)}) or video "
                         f"({', '.join(VIDEO_SUFFIXES)}) by its suffix")  # fmt: skip
    return [(os.path.abspath(item), os.path.dirname(os.path.abspath(item)))]


def listed_stamp(info) -> list[int] | None:
    """What a row records of a file at a URI, from the pyarrow ``FileInfo`` that listing it
    gave (no request of its own): ``[size, mtime_ns]``, ``[size]`` where the file system gives
    no modification time (``mtime_ns`` None), None where it gives no size."""
    if info.size is None:
        return None
    return [int(info.size)] if info.mtime_ns is None else [int(info.size), int(info.mtime_ns)]


def _remote(item: str, out: Path) -> list[tuple[str, str, list[int] | None]]:
    """[(uri, base uri, its listed_stamp)] for a file, folder (recursive) or glob at a URI
    pyarrow reads: one request for a file, two for a folder or glob (what it is, its listing).
    A file:// URI is local: never anything under ``out``, as for a local path."""
    import pyarrow.fs as pafs

    scheme = item.split("://", 1)[0]
    pattern = item if any(c in item for c in _GLOB_CHARS) else None
    target = _glob_base(item.split("://", 1)[1]) if pattern else item.split("://", 1)[1]
    try:
        fs, path = pafs.FileSystem.from_uri(f"{scheme}://{target}")
    except (ValueError, OSError) as e:
        raise InputError(f"{item}: cannot open this file system ({e})") from None
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"{item}: no such file or folder")
    local = isinstance(fs, pafs.LocalFileSystem)
    if local and not pattern and _inside(path, out):
        raise InputError(f"the output folder {out} holds the input {item}; choose one outside the inputs")
    # pyarrow's paths drop the scheme: "s3://b/k" -> "b/k", "file:///tmp/x" -> "/tmp/x".
    prefix = f"{scheme}://"

    def uri(p: str) -> str:
        return prefix + p

    if info.type == pafs.FileType.File:
        return [(uri(path), uri(str(PurePosixPath(path).parent)), listed_stamp(info))]
    if local:  # each folder once (``_folders_once``); stamped by pyarrow as its listing stamps
        listing = fs.get_file_info([e.path for _, entries in _folders_once([path], hidden=True)
                                    for e in entries if e.is_file() and _kind(e.name)])  # fmt: skip
    else:
        listing = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    # a listing names each path once: the sort never compares stamps
    files = sorted((i.path, listed_stamp(i)) for i in listing
                   if i.type == pafs.FileType.File and _kind(i.path))  # fmt: skip
    if pattern:
        files = [(f, st) for f, st in files if fnmatch.fnmatchcase(uri(f), pattern)]  # "*" also matches "/"
    if local:  # earlier runs' outputs are not inputs
        files = [(f, st) for f, st in files if not _inside(f, out)]
    if not files:
        raise InputError(f"{item}: no images or videos here")
    return [(uri(f), uri(path), st) for f, st in files]


def collect_inputs(inputs, output, stamps: dict | None = None) -> list[tuple[str, str]]:
    """``[(file, base)]``: every image and video named, in named folders (recursively) or matching
    a glob, in order, each once; local files as absolute paths, others as URIs. Raises
    InputError for a missing input, an input inside ``output``, and a folder, glob or URI
    without images or videos. stamps: a dict that receives ``{uri: listed_stamp}`` of every
    input at a URI, from the listing that found it (``plan`` carries them into the tasks)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out = Path(output)
    found: list[tuple[str, str]] = []
    for item in inputs:
        item = os.fspath(item)
        if not _is_uri(item):
            found += _local(item, out)
            continue
        for f, base, st in _remote(item, out):
            found.append((f, base))
            if stamps is not None:
                stamps[f] = st
    if not found:
        raise InputError("no inputs given; expected image or video files, folders, globs or URIs")
    seen, unique = set(), []
    for f, base in found:
        if f not in seen:
            seen.add(f)
            unique.append((f, base))
    return unique


# ------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Task:
    """One input: ``src`` (path or URI), its ``kind``, the files it writes (labels first) and,
    for a two-input net (NYUDv2 fusion), ``second``: the path or URI of its depth / HHA file.
    ``stamp`` / ``second_stamp``: the ``listed_stamp`` of an input / second input at a URI, as the
    listing that found it gave it (None for local files: the worker stamps them as it reads)."""

    src: str
    kind: str
    outputs: tuple[str, ...]
    second: str | None = None
    stamp: tuple[int, ...] | None = None
    second_stamp: tuple[int, ...] | None = None


def _stand_in(name: str) -> Path:
    """A local-looking path for a URI, so that ``plan_outputs`` mirrors its folders too."""
    if not _is_uri(name):
        return Path(name)
    return Path("/", name.split("://", 1)[1].lstrip("/"))


def plan(found: list[tuple[str, str]], output, pictures: tuple[str, ...], heads=None,
         seconds: list[str] | None = None, stamps: dict | None = None) -> list[Task]:
    """Tasks with ``fastfcn segment``'s output names (``plan_outputs``); videos get .mkv labels
    and .mp4 pictures at the same relative paths. pictures: a subset of ("overlay", "side-by-side").
    heads: the head names of a net with several heads (SIFT Flow), or None: each head's labels and
    pictures, in that order, head after head (``OUT/labels/<head>/<rel>``, ``paths.head_output``).
    seconds: each input's second-input file (``pair_second``) for a two-input net, else None.
    stamps: ``{uri: listed_stamp}`` of the inputs and second inputs at URIs (``collect_inputs``,
    ``pair_second``), recorded in their tasks."""
    from .paths import head_output, plan_outputs

    out = Path(output)
    jobs = plan_outputs([(_stand_in(f), _stand_in(b)) for f, b in found], out)
    tasks = []
    for i, ((src, _), job) in enumerate(zip(found, jobs)):
        kind = _kind(src) or "image"
        rel = job.labels.relative_to(out / "labels")
        paths = [job.labels]
        for p in pictures:
            paths.append(job.overlay if p == "overlay" else out / "side-by-side" / rel)
        if kind == "video":
            paths = [paths[0].with_suffix(".mkv"), *(p.with_suffix(".mp4") for p in paths[1:])]
        paths = [head_output(p, out, h) for h in (heads or (None,)) for p in paths]
        second = seconds[i] if seconds else None
        listed = [_frozen((stamps or {}).get(p)) for p in (src, second)]
        tasks.append(Task(src, kind, tuple(map(str, paths)), second, *listed))
    return tasks


def _frozen(st) -> tuple[int, ...] | None:
    """A stamp as a Task holds it (a tuple: Tasks are frozen and hashable); None stays None."""
    return None if st is None else tuple(st)


class _Folder:
    """The second-input folder (local or a URI), its subfolders listed once each, when asked; at
    a URI each file's ``listed_stamp`` from that listing is kept (``stamp``)."""

    def __init__(self, folder: str, flag: str):
        self.uri = _is_uri(folder)
        if self.uri:
            import pyarrow.fs as pafs

            self.scheme = folder.split("://", 1)[0]
            try:
                self.fs, self.path = pafs.FileSystem.from_uri(folder)
            except (ValueError, OSError) as e:
                raise InputError(f"{flag} {folder}: cannot open this file system ({e})") from None
            is_dir = self.fs.get_file_info(self.path).type == pafs.FileType.Directory
        else:
            self.path = os.path.abspath(folder)
            is_dir = os.path.isdir(self.path)
        if not is_dir:
            raise InputError(f"{flag} {folder}: not a folder")
        self._index = StemIndex(self._files)
        self._stamps: dict[tuple[str, str], list[int] | None] = {}  # (rel_dir, name) -> listed_stamp

    def where(self, rel_dir: str) -> str:
        """The path or URI of the subfolder ``rel_dir`` ("" for the folder itself)."""
        if not self.uri:
            return os.path.join(self.path, rel_dir) if rel_dir else self.path
        path = f"{self.path.rstrip('/')}/{rel_dir}" if rel_dir else self.path
        return f"{self.scheme}://{path}"

    def names(self, rel_dir: str, stem: str) -> list[str]:
        """The names of the files with ``stem`` in the subfolder ``rel_dir`` (none where it does
        not exist); the subfolder is listed and indexed by stem on first use."""
        return self._index.names(rel_dir, stem)

    def _files(self, rel_dir: str) -> list[str]:
        if not self.uri:
            return local_files(self.where(rel_dir))
        import pyarrow.fs as pafs

        where = f"{self.path.rstrip('/')}/{rel_dir}" if rel_dir else self.path
        infos = [i for i in self.fs.get_file_info(pafs.FileSelector(where, allow_not_found=True))
                 if i.type == pafs.FileType.File]  # fmt: skip
        self._stamps.update(((rel_dir, i.base_name), listed_stamp(i)) for i in infos)
        return [i.base_name for i in infos]

    def stamp(self, rel_dir: str, name: str) -> list[int] | None:
        """The ``listed_stamp`` of the file ``name`` of ``rel_dir`` at a URI (listed by ``names``)."""
        return self._stamps.get((rel_dir, name))


def pair_second(found: list[tuple[str, str]], folder: str, modality: str,
                stamps: dict | None = None) -> list[str]:
    """Each input's second-input file (NYUDv2 fusion: its depth map or HHA image), as ``segment
    --depth / --hha`` pairs them (``paths.match_file``): the file of ``folder`` (a local folder
    or a URI) at the image's path relative to its input folder, with the same stem and any image
    suffix. Every pair is looked for here, before Ray starts: the InputError for missing or
    ambiguous files names the first and counts the others. Each subfolder of ``folder`` is listed
    once and indexed by stem: 3,000 images in one folder pair in 55 ms (94 ms at file://
    URIs), where listing the folder again for each image took 11.9 s (2-core EPYC); local runs of
    segment and eval share ``paths.StemIndex`` to the same end. stamps: a dict that receives
    ``{uri: listed_stamp}`` of each paired file at a URI, from those listings."""
    from .paths import second_file_name

    root = _Folder(folder, f"--{modality}")
    pairs, errors = [], []
    for src, base in found:
        rel = PurePosixPath(os.path.relpath(_stand_in(src), _stand_in(base)))
        rel_dir = "" if str(rel.parent) == "." else str(rel.parent)
        where = root.where(rel_dir)
        try:
            name = second_file_name(src, where, rel.stem, root.names(rel_dir, rel.stem), modality)
        except InputError as e:
            errors.append(str(e))
            continue
        if not root.uri:
            pairs.append(os.path.join(where, name))
            continue
        pairs.append(f"{where.rstrip('/')}/{name}")
        if stamps is not None:
            stamps[pairs[-1]] = root.stamp(rel_dir, name)
    if errors:
        more = f"; {len(errors) - 1} more of the {len(found)} images lack theirs too" if errors[1:] else ""
        raise InputError(errors[0] + more)
    return pairs


# ----------------------------------------------------------------------------------- manifest


def read_manifest(path) -> dict[str, dict]:
    """``{input: its last row}`` of a manifest; a line that is no row (cut short by an
    interrupted run, or damaged: bytes that are not UTF-8, an ``input`` that is not a string)
    is ignored, so its input is done again."""
    rows: dict[str, dict] = {}
    try:
        # Rows are ASCII (json.dumps): a byte that is not UTF-8 is damage, and spoils its line only.
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("input"), str):
                    rows[row["input"]] = row
    except FileNotFoundError:
        pass
    return rows


def stamp(path: str | None) -> list[int] | None:
    """``[size, mtime_ns]`` of a local file, what a row records of the inputs it was made from;
    None for a file that cannot be read, and for a URI: one is stamped by the listing that found
    it (``listed_stamp``, carried in its Task), never by a request of its own."""
    if path is None or _is_uri(path):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def task_stamps(task: Task) -> tuple[list[int] | None, list[int] | None]:
    """(input's stamp, second input's) as they are now: a local file's from ``stamp`` (one stat),
    a URI's as the listing that found it gave it (``task.stamp`` / ``task.second_stamp``)."""

    def now(path, listed):
        if path is not None and _is_uri(path):
            return list(listed) if listed is not None else None
        return stamp(path)

    return now(task.src, task.stamp), now(task.second, task.second_stamp)


def model_key(data: bytes) -> str:
    """What a row records of the checkpoint that wrote its outputs: ``sha256:<hex>`` of its
    bytes (which the driver reads anyway), so that a run with another checkpoint into the same
    folder redoes every input instead of keeping the other model's labels. A 540 MB FCN-8s
    costs 0.36 s (hashlib.sha256 at 1.5 GB/s on a 2-core EPYC, 64 MB timed)."""
    import hashlib

    return "sha256:" + hashlib.sha256(data).hexdigest()


def _row_outputs(row: dict) -> tuple[str, ...] | None:
    """A row's outputs as absolute paths (rows of runs before outputs were absolute hold them
    relative to the driver's folder, this one's for a run again from there); None when the
    row's ``outputs`` is not a list of paths."""
    outputs = row.get("outputs")
    if not isinstance(outputs, list) or not all(isinstance(p, str) for p in outputs):
        return None
    return tuple(map(os.path.abspath, outputs))


def is_complete(row: dict | None, task: Task, model: str | None = None) -> bool:
    """The row says ``ok`` for exactly the outputs ``task`` plans, from the same second input (a
    two-input net), and each exists with its size; its input (and second input) must still have
    the size and modification time the row recorded (``task_stamps``: a local file's now, a
    URI's from this run's listing), so one edited, replaced or rewritten in place is redone.
    model: this run's ``model_key``; a row written by another checkpoint is due again.
    Rows written before stamps (or models) were recorded have none, and rows written when URIs
    were known by URI alone have None for a URI: neither is checked."""
    if not row or row.get("status") != "ok" or _row_outputs(row) != tuple(map(os.path.abspath, task.outputs)):
        return False
    if model is not None and row.get("model", model) != model:
        return False
    if row.get("second") != task.second:
        return False
    for key, path, now in zip(("stamp", "second_stamp"), (task.src, task.second), task_stamps(task)):
        if key not in row or (row[key] is None and path is not None and _is_uri(path)):
            continue
        if row[key] != now:
            return False
    sizes = row.get("sizes")
    if not isinstance(sizes, list) or len(sizes) != len(task.outputs):
        return False
    for p, size in zip(task.outputs, sizes):
        try:
            if os.stat(p).st_size != size:
                return False
        except OSError:
            return False
    return True


def _check_not_claimed(todo: list[Task], tasks: list[Task], previous: dict[str, dict], manifest) -> None:
    """InputError when a task would overwrite an existing output that the manifest records for
    an input this run does not name: two runs into one folder whose inputs share relative paths
    (cam1/ then cam2/, both holding f.png: both write labels/f.png) would otherwise replace the
    first run's labels without a word, and each resume would redo the other's. An input that is
    gone (a local file renamed or deleted since) no longer holds its outputs."""
    named = {t.src for t in tasks}
    owner = {p: src for src, row in previous.items() if src not in named and row.get("status") == "ok"
             and (_is_uri(src) or os.path.exists(src)) for p in _row_outputs(row) or ()}  # fmt: skip
    clashes = [(t.src, p, owner[p]) for t in todo for p in t.outputs if p in owner and os.path.exists(p)]
    if clashes:
        src, p, other = clashes[0]
        more = f" (and {len(clashes) - 1} more outputs)" if clashes[1:] else ""
        raise InputError(f"{src} would overwrite {p}{more}, the output of {other} recorded in {manifest}; "
                         "segment both in one run (their outputs then mirror their folders) or choose "
                         "another output folder")  # fmt: skip


class Manifest:
    """The driver's record: rows appended as they arrive, compacted to one per input by close()."""

    def __init__(self, path: Path, previous: dict[str, dict]):
        self.path, self.rows = path, dict(previous)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a+b")
        # A run killed mid-line left no newline: the next row must not be glued onto it.
        if self._f.tell() > 0:
            self._f.seek(-1, os.SEEK_END)
            if self._f.read(1) != b"\n":
                self._f.write(b"\n")

    def add(self, row: dict) -> None:
        self.rows[row["input"]] = row
        self._f.write(json.dumps(row).encode() + b"\n")
        self._f.flush()

    def close(self, order: list[str]) -> None:
        """Rewrite the file (temp + rename) with one row per input: ``order`` first, then rows
        of inputs this run did not name, as they were."""
        self._f.close()
        named = set(order)
        keys = [k for k in order if k in self.rows] + [k for k in self.rows if k not in named]
        with _atomic(self.path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for k in keys:
                f.write(json.dumps(self.rows[k]) + "\n")


# ------------------------------------------------------------------------------------ writing


LOCK = ".fastfcn-batch.lock"


@contextmanager
def _exclusive(out: Path):
    """Holds ``OUT/.fastfcn-batch.lock`` (an exclusive ``flock``, released by the kernel when the
    process dies, however it dies) while a run writes into ``out``: a second run into the same
    folder is an InputError naming the first, instead of deleting its temporaries as stale and
    compacting the manifest without its rows. The file is removed on the way out."""
    path = out / LOCK
    out.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            _lock(fd)
        except OSError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown process"
            os.close(fd)
            raise InputError(f"{out}: another fastfcn batch run ({holder}) is writing into this folder; "
                             "wait for it to end or choose another output folder") from None  # fmt: skip
        try:  # the file locked is still the one at `path` (not one a finishing run just removed)
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, _worker_name().encode())
        yield
    finally:
        try:
            os.unlink(path)  # while still locked: a run that opened it retries on the new file
        except OSError:
            pass
        os.close(fd)


def _lock(fd: int) -> None:
    """An exclusive lock on the open file ``fd``, or OSError when another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def remove_stale_temporaries(output) -> int:
    """Delete temporaries that killed workers left under ``output``, the manifest's that a
    driver killed while compacting it left beside it, and batch journals; returns how many."""
    n = 0
    for pattern in (f".{Path(MANIFEST).stem}{TMP_TAG}*", f".batch{TMP_TAG}*"):  # and batch journals
        for old in Path(output).glob(pattern):
            old.unlink()
            n += 1
    for sub in ("labels", "overlays", "side-by-side"):
        for dirpath, _, filenames in os.walk(Path(output, sub)):
            for f in filenames:
                if f.startswith(".") and TMP_TAG in f:
                    os.unlink(os.path.join(dirpath, f))
                    n += 1
    return n


def _read_bytes(src: str) -> bytes:
    if not _is_uri(src):
        with open(src, "rb") as f:
            return f.read()
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(src)
    with fs.open_input_stream(path) as f:
        return f.read()


# ------------------------------------------------------------------------------------- workers


@contextmanager
def _checkpoint_file(data: bytes, name: str):
    """A temporary file holding a checkpoint's bytes, with the suffix of ``name`` (its path or
    URI: the suffix picks the format); errors raised in the block name ``name``, not it."""
    from .errors import FastFCNError

    fd, path = tempfile.mkstemp(suffix=PurePosixPath(name).suffix, prefix="fastfcn-ckpt-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield path
    except FastFCNError as e:
        raise type(e)(str(e).replace(path, name)) from None
    finally:
        os.unlink(path)


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _Worker:
    """One actor: a Segmenter loaded from the checkpoint's bytes (shipped by the driver)."""

    def __init__(self, checkpoint, name: str, options: dict, pictures: tuple[str, ...] = (),
                 alpha: float = 0.5, second: str | None = None, journal: str | None = None):
        """checkpoint: the file's bytes, or a Ray object reference to them (put once by the
        driver: an FCN-8s is 540 MB, not to be copied into every actor's arguments); name:
        the checkpoint's path or URI (its suffix picks the format; errors name it); second:
        the modality of a two-input net's second input ("depth" or "hha"), read from each
        task's ``second`` file and passed to ``run`` by that name, or None. journal: the
        output folder, where each batch keeps its journal while it runs (``_journal``), or
        None (no journal: a batch that kills its actor is run again without end)."""
        from .runtime import Segmenter

        if not isinstance(checkpoint, bytes):
            checkpoint = _ray().get(checkpoint)
        with _checkpoint_file(checkpoint, name) as path:
            self.seg = Segmenter(path, **options)
        self.pictures, self.alpha, self.second = tuple(pictures), alpha, second
        self.journal = journal
        self._stamps: dict[str, tuple] = {}  # src -> (its stamp, its second input's) when read
        self.palettes = self.seg.head_palettes()  # {head: palette}; {None: palette} for one head

    def __call__(self, batch: dict) -> dict:
        # the columns of work_items; "stamps": each task's [input, second input] listed_stamp
        columns = zip(batch["src"], batch["kind"], batch["outputs"], batch["second"], batch["stamps"])
        tasks = [Task(json.loads(s), str(k), tuple(json.loads(o)), json.loads(d),
                      *map(_frozen, json.loads(ls))) for s, k, o, d, ls in columns]  # fmt: skip
        log = self._journal(tasks)
        if log is not None and os.path.exists(log):  # this batch's actor died: one input at a time
            rows = self._one_by_one(tasks, log)
        else:
            if log is not None:
                _note(log, "batch")
            t0 = time.perf_counter()
            ready = self._segment_batch([t for t in tasks if t.kind == "image"])
            share = (time.perf_counter() - t0) / max(len(ready), 1)
            rows = [self._attempt(t, ready.get(t.src), share if t.src in ready else 0.0) for t in tasks]
        if log is not None:
            os.unlink(log)
        return {"row": [json.dumps(r) for r in rows]}

    def _journal(self, tasks: list[Task]) -> str | None:
        """The journal of this batch: ``OUT/.batch.fastfcn-tmp-<hash of its inputs>.jsonl``, or None.
        Ray Data restarts an actor that dies (a decoder crash, the OOM killer) and runs its batch
        again, without limit: an input that kills its actor every time ran forever. The journal,
        which outlives the actor, says that the batch ran before (the next run goes one input at
        a time) and which input was being segmented when it died; one that killed it ATTEMPTS
        times is recorded failed. Removed when the batch returns; the driver removes leftovers.
        Cost: 0.5 ms a batch (one fsync'd line and an unlink, 200 timed on this 2-core EPYC's
        local disk), against 176 ms for a batch of 8 images at the 45.5 images/s of one actor
        that README.md's Ray run measured."""
        if self.journal is None:
            return None
        import hashlib

        names = "\n".join(t.src for t in tasks).encode("utf-8", "surrogateescape")  # as the OS gave them
        key = hashlib.sha1(names).hexdigest()[:20]
        return os.path.join(self.journal, f".batch{TMP_TAG}{key}.jsonl")

    def _one_by_one(self, tasks: list[Task], log: str) -> list[dict]:
        """The rows of a batch whose actor died: each input on its own, noted in the journal
        before and after, so that the next run knows which input was in flight; an input in
        flight at ATTEMPTS deaths is recorded failed without another try."""
        from collections import Counter

        with open(log, encoding="utf-8") as f:
            notes = [json.loads(line) for line in f if line.endswith("\n")]  # a cut last line: no note
        deaths = Counter(src for what, src in notes if what == "start")
        deaths.subtract(src for what, src in notes if what == "end")
        rows = []
        for t in tasks:
            if deaths[t.src] >= ATTEMPTS:
                rows.append(self._attempt(t, died=deaths[t.src]))
                continue
            _note(log, "start", t.src)
            rows.append(self._attempt(t))
            _note(log, "end", t.src)
        return rows

    def _read(self, src: str):
        from .imageio import decode_image, read_image

        if _is_uri(src):
            return decode_image(_read_bytes(src), src, self.seg.max_pixels)
        return read_image(src, self.seg.max_pixels)

    def _inputs(self, task: Task) -> tuple:
        """(image, ``run``'s keyword arguments): ``{}``, or the second input read as the image is."""
        from .imageio import decode_second, read_second

        image = self._read(task.src)
        if self.second is None:
            return image, {}
        if task.second is None:
            raise InputError(f"{task.src}: the model takes a second input ({self.second}) but none was "
                             "paired with this image")  # fmt: skip
        limit = self.seg.max_pixels
        if _is_uri(task.second):
            data = decode_second(_read_bytes(task.second), task.second, self.second, limit)
        else:
            data = read_second(task.second, self.second, limit)
        return image, {self.second: data}

    def _segment_batch(self, tasks: list[Task]) -> dict:
        """``{src: (image, labels)}`` for the images of one batch, segmented by one ``run`` call
        (one forward per image size). Best effort: an image that fails to read is left out,
        and all of them are when the call fails; ``_attempt`` then does each on its own and
        reports its error."""
        from concurrent.futures import ThreadPoolExecutor

        def read(task: Task):
            self._stamps[task.src] = task_stamps(task)  # before the read
            try:
                return self._inputs(task)
            except Exception:  # noqa: BLE001 - reported by the input's own attempts
                return None

        # Reads overlap (an object store answers in tens of ms per file; Pillow's decoders
        # release the GIL): a batch costs one round trip, not batch_size of them.
        with ThreadPoolExecutor(max_workers=min(len(tasks), READ_THREADS) or 1) as pool:
            got = list(pool.map(read, tasks))
        pairs = {t.src: g for t, g in zip(tasks, got) if g is not None}
        if not pairs:
            return {}
        # A two-input net: the second inputs as a list beside the images (run(images, depth=[...])).
        extra = {self.second: [kw[self.second] for _, kw in pairs.values()]} if self.second else {}
        try:
            labels = self.seg.run([im for im, _ in pairs.values()], **extra)
        except Exception:  # noqa: BLE001 - the inputs are retried one by one
            return {}
        from .models.multihead import host_results

        return {src: (im, host_results(lab)) for (src, (im, _)), lab in zip(pairs.items(), labels)}

    def _per_head(self, task: Task) -> dict[str | None, tuple[str, ...]]:
        """{head: (its labels, its pictures...)} of ``task``'s outputs, laid out by ``plan``."""
        k, names = 1 + len(self.pictures), list(self.palettes)
        if len(task.outputs) != k * len(names):
            raise InputError(f"{task.src}: {len(task.outputs)} outputs planned; the model's {len(names)} "
                             f"head(s) with {k - 1} picture(s) write {k * len(names)}")  # fmt: skip
        return {name: task.outputs[i * k:(i + 1) * k] for i, name in enumerate(names)}

    def _attempt(self, task: Task, ready=None, spent: float = 0.0, died: int = 0) -> dict:
        """Write ``task``'s outputs, up to ATTEMPTS times; its manifest row. ready: (image,
        labels) already computed for the first attempt; spent: seconds already spent on it;
        died: the times the actor died segmenting it (``_one_by_one``): not tried again, failed."""
        row = {"input": task.src, "kind": task.kind, "worker": _worker_name(), "outputs": list(task.outputs)}
        # what the outputs are made from, stamped before it was read (by _segment_batch for `ready`)
        stamps = self._stamps.pop(task.src, None)
        if ready is None or stamps is None:
            stamps = task_stamps(task)
        row["stamp"] = stamps[0]
        if task.second is not None:
            row["second"] = task.second
            row["second_stamp"] = stamps[1]
        if died:
            error = f"its worker died {died} times segmenting it (a crash, or out of memory)"
            row.update(status="failed", frames=0, sizes=[], attempts=died, seconds=0.0, error=error)
            return row
        t0 = time.perf_counter()
        attempt = 0
        while attempt < ATTEMPTS:
            attempt += 1
            try:
                frames = self.process(task, ready if attempt == 1 else None)
            except Exception as e:  # noqa: BLE001 - recorded in the manifest, the run goes on
                error = " ".join(f"{type(e).__name__}: {e}".split())
                continue
            sizes = [os.stat(p).st_size for p in task.outputs]
            row.update(status="ok", frames=frames, sizes=sizes, error=None)
            break
        else:
            row.update(status="failed", frames=0, sizes=[], error=error)
        row.update(attempts=attempt, seconds=round(spent + time.perf_counter() - t0, 4))
        return row

    def process(self, task: Task, ready=None) -> int:
        """Write ``task``'s outputs; returns the frames segmented (1 for an image)."""
        return self._image(task, ready) if task.kind == "image" else self._video(task)

    def _image(self, task: Task, ready=None) -> int:
        from PIL import Image

        from .models.multihead import host_results
        from .viz import overlay, save_labels, side_by_side

        if ready is None:
            image, extra = self._inputs(task)
            by_head = host_results(self.seg.run(image, **extra))
        else:
            image, by_head = ready
        for name, paths in self._per_head(task).items():
            labels, palette = by_head[name], self.palettes[name]
            with _atomic(paths[0]) as tmp:
                save_labels(labels, palette, tmp)
            for picture, path in zip(self.pictures, paths[1:]):
                if picture == "overlay":
                    pic = overlay(image, labels, palette, self.alpha)
                else:
                    pic = side_by_side(image, labels, palette)
                with _atomic(path) as tmp:
                    Image.fromarray(pic).save(tmp, format="PNG")
        return 1

    def _video(self, task: Task) -> int:
        from .video import segment_video

        if self.second is not None:  # segment_dataset refuses these before Ray; a direct call too
            raise InputError(f"{task.src}: a video has no {self.second} track; this model takes images "
                             f"with a {self.second} file each")  # fmt: skip
        per_head = self._per_head(task)

        def temporaries(stack: ExitStack, i: int):
            """Output ``i`` of every head as a temporary: one path, or {head: path} for several."""
            tmp = {name: stack.enter_context(_atomic(paths[i])) for name, paths in per_head.items()}
            return tmp[None] if None in tmp else tmp

        with _local_copy(task.src) as src, ExitStack() as labels_stack:
            lab_tmp = temporaries(labels_stack, 0)
            frames = 0
            if not self.pictures:
                s = segment_video(src, lab_tmp, self.seg, mode="labels", progress=False)
                frames = s["frames_out"]
            for i, picture in enumerate(self.pictures):
                with ExitStack() as stack:
                    # The first picture's pass writes the labels too: one decode for both.
                    dst = temporaries(stack, 1 + i)
                    s = segment_video(src, dst, self.seg, mode=picture, alpha=self.alpha,
                                      labels_out=lab_tmp if i == 0 else None, progress=False)  # fmt: skip
                frames = s["frames_out"]
        return frames


def _note(log: str, what: str, src: str = "") -> None:
    """One line of a batch's journal (``_Worker._journal``), on disk before the work it notes."""
    with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps([what, src]) + "\n")
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def _local_copy(src: str):
    """A local path to ``src``: itself, or a temporary copy of a remote file (PyAV opens files)."""
    if not _is_uri(src):
        yield src
        return
    import shutil

    import pyarrow.fs as pafs

    fs, remote = pafs.FileSystem.from_uri(src)
    fd, path = tempfile.mkstemp(suffix=PurePosixPath(src).suffix, prefix="fastfcn-video-")
    try:
        # Copied in pieces: a video may be larger than the actor's memory.
        with os.fdopen(fd, "wb") as f, fs.open_input_stream(remote) as r:
            shutil.copyfileobj(r, f, 8 << 20)
        yield path
    finally:
        os.unlink(path)


# -------------------------------------------------------------------------------------- driver


def _check_options(batch_size, concurrency, num_gpus_per_worker, mode) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an int >= 1; got {batch_size!r}")
    if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, int)
                                    or concurrency < 1):
        raise InputError(f"concurrency must be None (one worker per CPU or GPU) or an int >= 1; "
                         f"got {concurrency!r}")  # fmt: skip
    if isinstance(num_gpus_per_worker, bool) or not isinstance(num_gpus_per_worker, (int, float)) \
            or not num_gpus_per_worker >= 0 or num_gpus_per_worker == float("inf"):  # NaN fails >= 0
        raise InputError(f"num_gpus_per_worker must be a finite number >= 0; got {num_gpus_per_worker!r}")
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}; got {mode!r}")


def _check_model(ckpt: str, backend: str, precision: str) -> dict | None:
    """Before a cluster is asked for anything: the names are known, and a local checkpoint
    loads (``describe_checkpoint``, on the CPU), so that a bad file is one line here rather
    than an actor that dies at start on every node. Returns its description (None for a URI:
    ``_model_heads`` describes the bytes read)."""
    from .describe import describe_checkpoint
    from .runtime.backends import available_backends, check_precision_name

    if backend != "auto" and backend not in available_backends():
        raise InputError(f"unknown backend {backend!r}; expected 'auto' or one of {available_backends()}")
    check_precision_name(precision, InputError)
    if not _is_uri(ckpt):
        if not os.path.exists(ckpt):
            raise FileNotFoundError(f"{ckpt}: no such checkpoint")
        return describe_checkpoint(ckpt)
    return None


def _describe(ckpt: str, data: bytes, info: dict | None) -> dict:
    """The checkpoint's description: ``_check_model``'s, or for a URI (None) described from
    ``data``, its bytes."""
    if info is None:
        from .describe import describe_checkpoint

        with _checkpoint_file(data, ckpt) as path:
            info = describe_checkpoint(path)
    return info


def _model_heads(ckpt: str, data: bytes, info: dict | None) -> tuple[str, ...] | None:
    """The names of the model's heads (SIFT Flow: semantic, geometric), None for one head: they
    decide the output names. info: ``_check_model``'s description, or None (a URI: described
    from ``data``, its bytes)."""
    info = _describe(ckpt, data, info)
    return tuple(name for name, _ in info["heads"]) if info.get("heads") else None


def _second_input(ckpt: str, info: dict, found: list[tuple[str, str]], depth, hha) -> tuple[str, str] | None:
    """(modality, folder) of a two-input net (NYUDv2 fusion), checked against the model's inputs
    as ``segment`` checks --depth / --hha; None for a one-input net. A video is refused for a
    two-input net: it has no depth or HHA track (``fastfcn video --depth / --hha`` pairs a video
    with a second video)."""
    modalities = info.get("modalities") or ["color"]
    given = {k: os.fspath(v) for k, v in (("depth", depth), ("hha", hha)) if v is not None}
    arch = info.get("arch") or ckpt
    want = second_modality(arch, modalities, given, "{m}=", "DIR")
    if want is None:
        return None
    videos = [f for f, _ in found if _kind(f) == "video"]
    if videos:
        more = f" and {len(videos) - 1} more" if len(videos) > 1 else ""
        raise InputError(f"{videos[0]}{more}: a video has no {want} track; {arch} takes images, each with a "
                         f"{want} file: pass images only (`fastfcn video CKPT IN OUT --{want} VIDEO` "
                         f"segments a video with its {want} video)")  # fmt: skip
    return want, given[want]


@contextmanager
def _connected(address):
    """Ray, connected: the running one (ray.init done by the caller), the cluster at ``address``
    ("auto", "ray://host:10001", ...), or a local Ray started here and stopped on the way out."""
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    if address is None:
        # 256 MB of object store is plenty: only paths and result rows travel through it.
        ray.init(include_dashboard=False, object_store_memory=256 * 1024**2, log_to_driver=True)
    else:
        ray.init(address=address, log_to_driver=True)
    try:
        yield ray
    finally:
        ray.shutdown()


def _check_gpus(resources: dict, num_gpus_per_worker) -> None:
    if num_gpus_per_worker and resources.get("GPU", 0) < num_gpus_per_worker:
        have = resources.get("GPU", 0)
        raise InputError(f"num_gpus_per_worker={num_gpus_per_worker} but the Ray cluster has {have:g} GPUs; "
                         "start the nodes with GPUs or use 0 (CPU)")  # fmt: skip


def _pool(ray, concurrency, num_gpus_per_worker, work: int) -> tuple[int, float]:
    """(actors, CPUs per actor). By default one actor per GPU share, or per CPU without GPUs;
    on CPU the actors split the cluster's CPUs (2 cores: 1 actor x 2 threads or 2 x 1)."""
    res = ray.cluster_resources()
    cpus = max(int(res.get("CPU", 1)), 1)
    _check_gpus(res, num_gpus_per_worker)
    if concurrency is None:
        concurrency = int(res["GPU"] // num_gpus_per_worker) if num_gpus_per_worker else cpus
    n = max(min(concurrency, work), 1)
    per = 1.0 if num_gpus_per_worker else max(cpus // n, 1)
    return n, float(per)


def work_items(tasks: list[Task]) -> list[dict]:
    """The tasks as the rows of the Ray Dataset that ``_Worker`` reads: columns of JSON text.
    Paths travel as JSON (ASCII): a file name that is not UTF-8 (Linux hands it to Python with
    surrogates, "caf\\udce9.png") cannot become an Arrow string, and as a plain column it
    stopped the whole run with a UnicodeEncodeError naming no file."""
    return [{"src": json.dumps(t.src), "kind": t.kind, "outputs": json.dumps(list(t.outputs)),
             "second": json.dumps(t.second), "stamps": json.dumps([t.stamp, t.second_stamp])}
            for t in tasks]  # fmt: skip


def _map(ray, tasks: list[Task], worker_args: dict, *, batch_size: int, actors: int, cpus: float,
         gpus: float):  # fmt: skip
    """The workers' result rows, as they arrive."""
    ds = ray.data.from_items(work_items(tasks))
    ds = ds.map_batches(_Worker, fn_constructor_kwargs=worker_args, batch_size=batch_size,
                        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus,
                        num_gpus=gpus or None)  # fmt: skip
    # A dead actor is restarted and its batches run again: Ray Data's own defaults for actor pools
    # (max_restarts=-1, max_task_retries=-1 in ray 2.60; passing them is deprecated there, to be
    # removed in 2.64). test_killed_worker_leaves_each_input_processed_once holds them.
    for row in ds.iter_rows():
        yield json.loads(row["row"])


def _summary(rows: list[dict], skipped: int, seconds: float, manifest: Path) -> dict:
    ok = [r for r in rows if r["status"] == "ok"]
    images = sum(1 for r in ok if r["kind"] == "image")
    frames = sum(r["frames"] for r in ok if r["kind"] == "video")
    return {
        "done": len(ok), "skipped": skipped, "failed": len(rows) - len(ok), "images": images,
        "frames": frames, "seconds": seconds,
        "images_per_s": images / seconds if seconds > 0 else 0.0,
        "frames_per_s": frames / seconds if seconds > 0 else 0.0,
        "failed_inputs": [(r["input"], r["error"]) for r in rows if r["status"] != "ok"],
        "manifest": str(manifest),
    }  # fmt: skip


def format_summary(s: dict) -> str:
    return (f"{s['done']} done, {s['skipped']} skipped (complete before), {s['failed']} failed in "
            f"{s['seconds']:.1f} s: {s['images_per_s']:.1f} images/s, {s['frames_per_s']:.1f} frames/s "
            f"-> {s['manifest']}")  # fmt: skip


def segment_dataset(
    inputs,
    output,
    checkpoint,
    *,
    backend: str = "auto",
    precision: str = "auto",
    batch_size: int = 8,
    concurrency: int | None = None,
    num_gpus_per_worker: float = 0,
    mode: str = "labels",
    overlays: bool = False,
    resume: bool = True,
    address: str | None = None,
    depth=None,
    hha=None,
) -> dict:
    """Segment every image and video in ``inputs`` into ``output`` on Ray Data; returns a summary.

    inputs: a path, folder, glob or URI, or a list of them (folders are walked recursively).
    output: a local or shared folder; gets labels/, overlays/, side-by-side/ and manifest.jsonl.
    checkpoint: what fastfcn.Segmenter loads (a path, a URI or a built-in name such as "demo";
    read once by the driver, shipped to the actors).
    batch_size: images per actor call. concurrency: actors (default: one per CPU, or per
    ``num_gpus_per_worker`` GPUs). mode: the picture written beside the labels: "labels" (none),
    "overlay" or "side-by-side"; ``overlays=True`` adds the overlay. resume: skip inputs the
    manifest records as complete. address: a Ray cluster ("auto", "ray://head:10001"); None
    uses the running Ray or starts a local one. depth / hha: for a two-input net (NYUDv2 fusion:
    nyud-fcn32s-color-d / -color-hha), the folder (local or a URI) of each image's second input,
    paired by name as ``segment --depth / --hha`` pairs it (``pair_second``); images only.
    Returns {"done", "skipped", "failed", "images", "frames", "seconds", "images_per_s",
    "frames_per_s", "failed_inputs": [(input, error)], "manifest"}.
    """
    from .paths import check_output_dir

    _check_options(batch_size, concurrency, num_gpus_per_worker, mode)
    if _is_uri(os.fspath(output)):
        raise InputError(f"output {output}: expected a folder path (local, or a shared file system mounted "
                         "on every node); URIs are for inputs")  # fmt: skip
    # Absolute: the actors keep the working folder Ray started them in, not the driver's (on a
    # cluster, where `ray start` ran), so a relative folder wrote the outputs somewhere else.
    out = Path(os.path.abspath(check_output_dir(output, "output")))
    pictures = tuple(p for p in ("overlay", "side-by-side") if p == mode or (p == "overlay" and overlays))
    listed: dict = {}  # {uri: listed_stamp} of the inputs (and second inputs) at URIs
    found = collect_inputs(inputs, out, listed)
    from .zoo import resolve

    ckpt = os.fspath(resolve(checkpoint))  # "demo": the built-in model's file
    info = _check_model(ckpt, backend, precision)
    ckpt_bytes = _read_bytes(ckpt)
    info = _describe(ckpt, ckpt_bytes, info)
    heads = _model_heads(ckpt, ckpt_bytes, info)
    second = _second_input(ckpt, info, found, depth, hha)
    seconds = pair_second(found, second[1], second[0], listed) if second else None
    tasks = plan(found, out, pictures, heads, seconds, listed)
    manifest_path = out / MANIFEST
    previous = read_manifest(manifest_path)  # kept for inputs this run does not name
    model = model_key(ckpt_bytes)  # recorded in every row: another checkpoint redoes the inputs

    def due(previous: dict) -> list[Task]:
        todo = [t for t in tasks if not (resume and is_complete(previous.get(t.src), t, model))]
        _check_not_claimed(todo, tasks, previous, manifest_path)
        return todo

    todo = due(previous)
    skipped = len(tasks) - len(todo)
    t0 = time.perf_counter()
    rows: list[dict] = []
    if todo:
        device = "cuda" if num_gpus_per_worker else "cpu"
        with _connected(address) as ray, ExitStack() as held:
            _check_gpus(ray.cluster_resources(), num_gpus_per_worker)  # before anything is written
            held.enter_context(_exclusive(out))
            # Read again under the lock: a run into this folder that ended meanwhile added rows,
            # which this run's compaction would otherwise drop.
            previous = read_manifest(manifest_path)
            todo = due(previous)
            skipped = len(tasks) - len(todo)
            remove_stale_temporaries(out)  # no other batch run writes here while the lock is held
            ckpt_ref = ray.put(ckpt_bytes)
            manifest = Manifest(manifest_path, previous)
            try:
                for kind, size in (("image", batch_size), ("video", 1)):
                    part = [t for t in todo if t.kind == kind]
                    if not part:
                        continue
                    actors, cpus = _pool(ray, concurrency, num_gpus_per_worker, len(part) if kind == "video"
                                         else -(-len(part) // size))  # fmt: skip
                    args = {"checkpoint": ckpt_ref, "name": ckpt,
                            "options": {"backend": backend, "precision": precision, "device": device,
                                        "num_threads": None if num_gpus_per_worker else int(cpus)},
                            "pictures": pictures, "second": second[0] if second else None,
                            "journal": str(out)}  # fmt: skip
                    for row in _map(ray, part, args, batch_size=size, actors=actors, cpus=cpus,
                                    gpus=num_gpus_per_worker):  # fmt: skip
                        row["model"] = model
                        rows.append(row)
                        manifest.add(row)
                seen = {r["input"] for r in rows}
                for t in todo:  # never silently dropped
                    if t.src not in seen:
                        row = {"input": t.src, "kind": t.kind, "status": "failed", "outputs": list(t.outputs),
                               "sizes": [], "frames": 0, "seconds": 0.0, "worker": None, "attempts": 0,
                               "error": "no result came back from the workers", "model": model}  # fmt: skip
                        if t.second is not None:
                            row["second"] = t.second
                        rows.append(row)
                        manifest.add(row)
            finally:
                manifest.close([t.src for t in tasks])
                remove_stale_temporaries(out)
    summary = _summary(rows, skipped, time.perf_counter() - t0, manifest_path)
    print(format_summary(summary), file=sys.stderr)
    return summary
