"""``fastfcn segment``: images to label PNGs and overlays.

    fastfcn segment fcn8s.safetensors photos/ street.jpg --out seg/ [--recursive] [--on-error stop]
        [--batch-size 8] [--tile 1024 1024 --overlap 128]

segment writes, per image, ``OUT/labels/<path>.png`` (the class ids as a palette PNG in the
checkpoint's colours: pixel values are class ids) and ``OUT/overlays/<path>.png`` (the image
blended with the class colours), ``<path>`` mirroring the input's subfolders (see
``plan_outputs``); a net with several heads (SIFT Flow) writes each head's under
``OUT/labels/<head>/<path>.png`` and ``OUT/overlays/<head>/<path>.png`` (``semantic``,
``geometric``). It refuses an output folder that holds an input, never reads its own
outputs, reports and skips unreadable images (exit status 1 when any was skipped) and
creates nothing before the first result is written.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import InputError
from ..imageio import read_image, read_second
from ..names import ARCHS, BACKENDS, DEFAULT_MAX_PIXELS, PRECISIONS, device_arg
from ..paths import Job, StemIndex, check_output_dir, collect_images, head_output, match_file, plan_outputs
from ..progress import Progress
from ..viz import overlay, save_labels
from ..zoo import BUILTIN
from .common import add_crf_arguments, checkpoint_path, crf_from_args, open_segmenter

# Torch is imported when the command runs, never here: `fastfcn segment --help` stays fast.


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    builtin = f"or a built-in model by name ({', '.join(BUILTIN)})"
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
    add_second_input_arguments(parser, "DIR/<path> named as each image, <path> relative to the image's "
                                       "input folder, any image suffix")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="overlay opacity of the class colours, 0..1 (default 0.5)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_crf_arguments(parser)


def add_second_input_arguments(parser: argparse.ArgumentParser, where: str) -> None:
    """--depth DIR / --hha DIR, the second input of the NYUDv2 fusion nets; ``where``: how a file
    of DIR is matched to its image (match_file)."""
    parser.add_argument("--depth", metavar="DIR", default=None,
                        help="the depth maps (16-bit PNGs in millimetres) of a colour + depth net "
                             f"(nyud-fcn32s-color-d): {where}")
    parser.add_argument("--hha", metavar="DIR", default=None,
                        help="the HHA images of a colour + HHA net (nyud-fcn32s-color-hha), matched "
                             "by name as --depth")


def _check(args: argparse.Namespace) -> dict:
    """The options, before the model loads and anything is written; returns the tiling arguments."""
    if not 0 <= args.alpha <= 1:
        raise InputError(f"--alpha must be between 0 and 1; got {args.alpha}")
    if args.max_pixels < 1:
        raise InputError(f"--max-pixels must be >= 1; got {args.max_pixels}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1; got {args.batch_size}")
    if args.tile is None and args.overlap is not None:
        raise InputError(f"--overlap {args.overlap} is for tiled runs; add --tile H W")
    if args.tile is None:
        return {}
    from ..runtime.tiling import check_tiling

    tile, overlap = check_tiling(tuple(args.tile), args.overlap)
    return {"tile": tile, "overlap": overlap}


def second_modality(args, seg) -> tuple[str, Path] | None:
    """(modality, folder) of --depth / --hha, checked against the model's inputs."""
    from ..config import config_inputs
    from ..modalities import second_modality as check_second

    given = {k: v for k, v in (("depth", args.depth), ("hha", args.hha)) if v is not None}
    want = check_second(seg.config.get("arch"), config_inputs(seg.config), given)
    if want is None:
        return None
    folder = Path(given[want])
    if not folder.is_dir():
        raise InputError(f"--{want} {folder}: not a folder")
    return want, folder


def _segment(seg, loaded: list, tiling: dict, skip, extra: dict) -> list:
    """Labels for each ``(job, image)`` of ``loaded``, in one run; if that fails, one image at a
    time, so only the bad image is skipped (its result None). ``extra``: job -> the second
    modality's keyword argument of run (two-modality nets), else empty."""
    both = {}
    if extra:
        both = {k: [extra[job][k] for job, _ in loaded] for k in extra[loaded[0][0]]}
    try:
        return seg.run([im for _, im in loaded], **tiling, **both)
    except InputError as e:
        if len(loaded) == 1:
            skip(loaded[0][0], e)
            return [None]
    results = []
    for job, im in loaded:
        try:
            results.append(seg.run(im, **tiling, **extra.get(job, {})))
        except InputError as e1:
            skip(job, e1)
            results.append(None)
    return results


def head_outputs(job: Job, result, palettes: dict, out) -> list:
    """[(job, labels (H, W) numpy, palette)] for one image: the job itself for a one-headed net
    (palettes {None: palette}); for a net with several heads (a {head: labels} result, SIFT Flow)
    one job per head writing ``OUT/labels/<head>/<path>.png`` and ``OUT/overlays/<head>/<path>.png``,
    each in that head's colours."""
    from ..models.multihead import host_results

    return [(Job(job.src, head_output(job.labels, out, name), head_output(job.overlay, out, name)), labels,
             palettes[name]) for name, labels in host_results(result).items()]  # fmt: skip


def _write(job: Job, image, labels, palette, alpha: float) -> int:
    """The label PNG and the overlay of one image; returns how many files it replaced."""
    from PIL import Image

    replaced = job.labels.exists() + job.overlay.exists()
    for path in (job.labels, job.overlay):
        path.parent.mkdir(parents=True, exist_ok=True)
    save_labels(labels, palette, job.labels)
    # format= explicitly: Pillow takes the format from os.path.splitext, which sees no
    # suffix in a name like "..png".
    Image.fromarray(overlay(image, labels, palette, alpha)).save(job.overlay, format="PNG")
    return replaced


def main(args: argparse.Namespace) -> int:
    # Everything is validated before the model loads and before anything is written.
    tiling = _check(args)
    post = crf_from_args(args)  # {} or postprocess="crf" with its parameters
    ckpt = checkpoint_path(args.checkpoint)
    out = check_output_dir(args.out, "--out")
    found = collect_images(args.inputs, out, args.recursive)
    jobs = plan_outputs(found, out)
    bases = {job.src: base for job, (_, base) in zip(jobs, found)}
    seg = open_segmenter(ckpt, args, max_pixels=args.max_pixels, **post)
    second = second_modality(args, seg)
    palettes = seg.head_palettes()
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

    index = StemIndex()  # the second modality's folders, each listed once
    for i in range(0, len(jobs), args.batch_size):
        loaded, extra = [], {}
        for job in jobs[i:i + args.batch_size]:
            try:
                image = read_image(job.src, read_limit)
                if second is not None:  # the second modality's file, matched by name
                    modality, folder = second
                    path = match_file(job.src, bases[job.src], folder, modality, index)
                    extra[job] = {modality: read_second(path, modality, read_limit)}
                loaded.append((job, image))
            except InputError as e:
                skip(job, e)
        results = _segment(seg, loaded, tiling, skip, extra) if loaded else []
        for (job, image), result in zip(loaded, results):
            if result is not None:
                for head_job, labels, palette in head_outputs(job, result, palettes, out):
                    replaced += _write(head_job, image, labels, palette, args.alpha)
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
