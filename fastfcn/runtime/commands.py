"""``fastfcn info``, ``fastfcn export`` and ``fastfcn segment``.

    fastfcn info fcn8s.safetensors                  (or a built-in model by name: fastfcn info demo)
    fastfcn export fcn8s.safetensors fcn8s.onnx [--static --size 500 500] [--opset 18] [--precision fp16]
    fastfcn segment fcn8s.safetensors photos/ street.jpg --out seg/ [--recursive] [--on-error stop]
        [--batch-size 8] [--tile 1024 1024 --overlap 128]

segment writes, per image, ``OUT/labels/<path>.png`` (the class ids as a palette PNG in the
checkpoint's colours: pixel values are class ids) and ``OUT/overlays/<path>.png`` (the image
blended with the class colours), ``<path>`` mirroring the input's subfolders (see
``plan_outputs``). It refuses an output folder that holds an input, never reads its own
outputs, reports and skips unreadable images (exit status 1 when any was skipped) and
creates nothing before the first result is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, FastFCNError, InputError
from ..imageio import IMAGE_SUFFIXES, check_regular_file, read_image
from ..names import ARCHS, BACKENDS, DEFAULT_MAX_PIXELS, PRECISIONS, device_arg
from ..paths import check_output_dir, check_output_file
from ..progress import Progress
from ..viz import overlay, palette_bytes, save_labels  # noqa: F401  (re-exported: the old import path)
from ..zoo import BUILTIN, resolve

# Torch is imported by the commands when they run, never here: `fastfcn segment --help` stays fast.

# ------------------------------------------------------------------------------------ arguments


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    builtin = f"or a built-in model by name ({', '.join(BUILTIN)})"
    if command == "info":
        parser.add_argument("checkpoint",
                            help=f".safetensors, .pt/.pth, .caffemodel (with --arch), .onnx {builtin}")
        parser.add_argument("--arch", choices=ARCHS, help="for files that do not record it")
        parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    elif command == "export":
        parser.add_argument("checkpoint",
                            help=f".safetensors, .pt/.pth or .caffemodel (with --arch) {builtin}")
        parser.add_argument("out", help="the .onnx file to write")
        parser.add_argument("--arch", choices=ARCHS, help="for files that do not record it")
        parser.add_argument("--static", action="store_true",
                            help="fix batch, height and width (to --batch x --size) instead of dynamic")
        parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(500, 500),
                            help="input size of a --static graph (default 500 500)")
        parser.add_argument("--batch", type=int, default=1, help="batch size of a --static graph (default 1)")
        parser.add_argument("--opset", type=int, default=None,
                            help="ONNX opset, >= 18 (default: the exporter's)")
        parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                            help="fp16: weights and compute in float16, input/output still float32")
    elif command == "segment":
        parser.add_argument("checkpoint",
                            help=f"a checkpoint fastfcn.load reads, an exported .onnx {builtin}")
        parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders")
        parser.add_argument("--out", required=True,
                            help="output folder (created when the first result is written); it must not "
                                 "hold any input. Writes OUT/labels/<path>.png and OUT/overlays/<path>.png, "
                                 "<path> mirroring the inputs' subfolders")
        parser.add_argument("--recursive", action="store_true", help="also segment images in subfolders")
        parser.add_argument("--on-error", choices=("skip", "stop"), default="skip",
                            help="an unreadable image: report it and go on (skip, the default; the exit "
                                 "status is then 1) or end the run (stop)")
        parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                            help=f"refuse images over this many pixels, from their header, before "
                                 f"decoding (default {DEFAULT_MAX_PIXELS})")
        parser.add_argument("--arch", choices=ARCHS, help="for files that do not record it")
        parser.add_argument("--backend", default="auto", choices=("auto", *BACKENDS),
                            help="Segmenter backend")
        parser.add_argument("--precision", default="auto", choices=("auto", *PRECISIONS),
                            help="compute precision")
        parser.add_argument("--device", default="auto", type=device_arg, help="auto | cpu | cuda | cuda:N")
        parser.add_argument("--batch-size", type=int, default=1,
                            help="images per Segmenter.run call (images of one size run as one batch)")
        parser.add_argument("--tile", type=int, nargs=2, metavar=("H", "W"), default=None,
                            help="segment each image in tiles of H x W pixels (for images over --max-pixels, "
                                 "or to bound memory); --max-pixels then applies per tile")
        parser.add_argument("--overlap", type=int, default=None,
                            help="pixels shared by neighbouring tiles, with --tile; each pixel's label comes "
                                 "from the tile where it lies farthest from the edge (default: 64, at most "
                                 "half the tile's smaller side)")
        parser.add_argument("--depth", metavar="DIR", default=None,
                            help="the depth maps (16-bit PNGs in millimetres) of a colour + depth net "
                                 "(nyud-fcn32s-color-d): DIR/<path> named as each image, <path> relative "
                                 "to the image's input folder, any image suffix")
        parser.add_argument("--hha", metavar="DIR", default=None,
                            help="the HHA images of a colour + HHA net (nyud-fcn32s-color-hha), matched "
                                 "by name as --depth")
        parser.add_argument("--alpha", type=float, default=0.5,
                            help="overlay opacity of the class colours, 0..1 (default 0.5)")
        parser.add_argument("--quiet", action="store_true", help="no progress bar")
    else:
        raise ValueError(f"fastfcn.runtime.commands serves info, export and segment; got {command!r}")


def main(args: argparse.Namespace) -> int:
    return {"info": _info, "export": _export, "segment": _segment}[args.command](args)


# ----------------------------------------------------------------------------------------- info


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _format_name(path: Path) -> str:
    s = path.suffix.lower()
    return {".safetensors": "safetensors", ".pt": "torch (.pt)", ".pth": "torch (.pth)",
            ".caffemodel": "caffemodel", ".onnx": "onnx"}.get(s, f"unknown suffix {s!r} (sniffed)")


def describe_checkpoint(path: str | Path, arch: str | None = None) -> dict:
    """What ``fastfcn info`` prints, as a dict (arch, classes, width, params, preprocessing, format)."""
    path = Path(resolve(path))
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    info: dict = {"file": str(path), "file_size": path.stat().st_size, "format": _format_name(path)}
    if path.suffix.lower() == ".onnx":
        from ..export import read_onnx_metadata
        from .ort import describe

        config = read_onnx_metadata(path)
        graph = describe(path)
        export = config.pop("export", {})
        info["format"] = (f"onnx (opset {graph['opset']}, {export.get('precision', '?')}, "
                          f"{'dynamic' if export.get('dynamic') else 'static'} shapes)")
        info["params"] = graph["initializer_elements"]
        info["inputs"], info["outputs"] = graph["inputs"], graph["outputs"]
    else:
        from ..checkpoint import load
        from ..models import parameter_count

        model = load(path, arch=arch)
        config = dict(model.config)
        info["params"] = parameter_count(model)
    for k in ("arch", "num_classes", "width", "options", "mean", "std", "color_order", "input_scale"):
        info[k] = config.get(k)
    # The input modalities in channel order (fastfcn.modalities): ["color"] for the VOC nets.
    info["modalities"] = list(config.get("inputs") or ["color"])
    names = config.get("class_names") or []
    info["class_names"] = names
    info["fastfcn_version"] = config.get("fastfcn_version")
    return info


def _info(args) -> int:
    info = describe_checkpoint(args.checkpoint, args.arch)
    if args.json:
        print(json.dumps(info))
        return 0
    names = info["class_names"]
    more = ", ..." if len(names) > 6 else ""
    rows = [
        ("file", info["file"]),
        ("format", info["format"]),
        ("file size", _size(info["file_size"])),
        ("arch", info["arch"]),
        ("classes", f"{info['num_classes']}" + (f" ({', '.join(names[:6])}{more})" if names else "")),
        ("width", info["width"]),
        ("modalities", " + ".join(info["modalities"])),
        ("params", f"{info['params']:,} ({_size(4 * info['params'])} as fp32)"),
        ("mean", ", ".join(f"{m:g}" for m in info["mean"] or [])),
        ("std", ", ".join(f"{s:g}" for s in info["std"] or [])),
        ("colour order", info["color_order"]),
        ("input scale", info["input_scale"]),
        ("options", json.dumps(info["options"])),
    ]
    if "inputs" in info:
        rows += [(f"input {k}", f"{t} {s}") for k, (t, s) in info["inputs"].items()]
        rows += [(f"output {k}", f"{t} {s}") for k, (t, s) in info["outputs"].items()]
    if info.get("fastfcn_version"):
        rows.append(("written by", f"fastfcn {info['fastfcn_version']}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


# --------------------------------------------------------------------------------------- export


def _export(args) -> int:
    from ..export import export_onnx

    src, out = Path(resolve(args.checkpoint)), Path(args.out)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file")
    if out.suffix.lower() != ".onnx":
        raise InputError(f"{out}: the output file must end in .onnx")
    if args.opset is not None and args.opset < 18:
        raise InputError(f"--opset {args.opset}: expected 18 or later (the torch.export exporter's minimum)")
    if args.static and (min(args.size) < 1 or args.batch < 1):
        raise InputError(f"--size and --batch must be >= 1; got {args.size} and {args.batch}")
    check_output_file(out, "the output file")
    t0 = time.perf_counter()
    export_onnx(src, out, dynamic=not args.static, opset=args.opset, precision=args.precision, arch=args.arch,
                input_size=tuple(args.size), batch_size=args.batch)
    shape = f"{args.batch}x3x{args.size[0]}x{args.size[1]}" if args.static else "Nx3xHxW (dynamic)"
    print(f"wrote {out} ({_size(out.stat().st_size)}, {args.precision}, input {shape}) "
          f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


# -------------------------------------------------------------------------------------- segment


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


def _second_modality(args, seg) -> tuple[str, Path] | None:
    """(modality, folder) of --depth / --hha, checked against the model's inputs."""
    inputs = seg.config.get("inputs") or ["color"]
    given = {k: v for k, v in (("depth", args.depth), ("hha", args.hha)) if v is not None}
    arch = seg.config.get("arch")
    if len(inputs) == 1:
        if given:
            raise InputError(f"{arch} takes one input; --{'/--'.join(given)} is for the two-modality nets")
        return None
    want = inputs[1]
    if set(given) != {want}:
        raise InputError(f"{arch} takes {inputs[0]} images and {want}: pass --{want} DIR (and only it)")
    folder = Path(given[want])
    if not folder.is_dir():
        raise InputError(f"--{want} {folder}: not a folder")
    return want, folder


def _segment(args) -> int:
    from PIL import Image

    from .. import Segmenter
    from .modal import match_file, read_second

    # Everything is validated before the model loads and before anything is written.
    if not 0 <= args.alpha <= 1:
        raise InputError(f"--alpha must be between 0 and 1; got {args.alpha}")
    if args.max_pixels < 1:
        raise InputError(f"--max-pixels must be >= 1; got {args.max_pixels}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1; got {args.batch_size}")
    tiling = {}
    if args.tile is None and args.overlap is not None:
        raise InputError(f"--overlap {args.overlap} is for tiled runs; add --tile H W")
    if args.tile is not None:
        from .tiling import check_tiling

        tile, overlap = check_tiling(tuple(args.tile), args.overlap)
        tiling = {"tile": tile, "overlap": overlap}
    ckpt = Path(resolve(args.checkpoint))
    if not ckpt.exists():
        raise FileNotFoundError(f"{ckpt}: no such checkpoint")
    out = check_output_dir(args.out, "--out")
    found = collect_images(args.inputs, out, args.recursive)
    jobs = plan_outputs(found, out)
    bases = {job.src: base for job, (_, base) in zip(jobs, found)}
    try:
        seg = Segmenter(ckpt, arch=args.arch, device=args.device, backend=args.backend,
                        precision=args.precision, max_pixels=args.max_pixels)
    except (ValueError, TypeError) as e:
        if isinstance(e, FastFCNError):
            raise
        # A bad --device: the Segmenter's message, as a one-line CLI error.
        raise InputError(str(e)) from None
    second = _second_modality(args, seg)
    palette = seg.palette
    bar = Progress(len(jobs), "segment", enabled=not args.quiet and len(jobs) > 1, unit="img")
    t0 = time.perf_counter()
    skipped = replaced = 0
    # With --tile, --max-pixels is the limit per tile, not per file (Pillow's own limit still holds).
    read_limit = None if tiling else args.max_pixels

    def skip(job: Job, e: InputError) -> None:
        nonlocal skipped
        if args.on_error == "stop":
            raise e
        skipped += 1
        print(bar.interrupt() + f"fastfcn segment: skipped {e}", file=sys.stderr)
        bar.step(job.src.name)

    for i in range(0, len(jobs), args.batch_size):
        loaded, extra = [], []
        for job in jobs[i:i + args.batch_size]:
            try:
                image = read_image(job.src, read_limit)
                if second is not None:  # the second modality's file, matched by name
                    modality, folder = second
                    path = match_file(job.src, bases[job.src], folder, modality)
                    extra.append({modality: read_second(path, modality, read_limit)})
                loaded.append((job, image))
            except InputError as e:
                skip(job, e)
        if not loaded:
            continue
        both = {k: [x[k] for x in extra] for k in extra[0]} if extra else {}
        try:
            results = seg.run([im for _, im in loaded], **tiling, **both)
        except InputError as e:
            if len(loaded) > 1:  # find the image that failed: one at a time
                results = []
                for j, (job, im) in enumerate(loaded):
                    try:
                        results.append(seg.run(im, **tiling, **(extra[j] if extra else {})))
                    except InputError as e1:
                        skip(job, e1)
                        results.append(None)
            else:
                skip(loaded[0][0], e)
                continue
        for (job, image), labels in zip(loaded, results):
            if labels is None:
                continue
            labels = labels.cpu().numpy()
            replaced += job.labels.exists() + job.overlay.exists()
            for path in (job.labels, job.overlay):
                path.parent.mkdir(parents=True, exist_ok=True)
            save_labels(labels, palette, job.labels)
            # format= explicitly: Pillow takes the format from os.path.splitext, which sees no
            # suffix in a name like "..png".
            Image.fromarray(overlay(image, labels, palette, args.alpha)).save(job.overlay, format="PNG")
            bar.step(job.src.name)
    dt = time.perf_counter() - t0
    done = len(jobs) - skipped
    msg = (f"segmented {done} image{'s' * (done != 1)} with {seg.backend} on {seg.device} "
           f"({seg.precision}) in {dt:.1f} s -> {out}")
    if replaced:
        msg += f"; replaced {replaced} files of an earlier run"
    if skipped:
        msg += f"; skipped {skipped} of {len(jobs)} (reasons above)"
    print(msg, file=sys.stderr)
    return 1 if skipped else 0
