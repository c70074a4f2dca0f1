"""``fastfcn batch``: segment folders of images and videos on a Ray cluster (fastfcn.distributed).

    fastfcn batch fcn8s.safetensors photos/ clips/*.mp4 s3://bucket/more/ --out seg/
        [--address ray://head:10001|auto] [--workers N] [--gpus-per-worker G] [--batch-size N]
        [--overlays] [--no-resume] [--depth DIR | --hha DIR]

Without ``--address`` a local Ray is started for the run (and stopped after it). Outputs are
named as ``fastfcn segment`` names them (a net with several heads, SIFT Flow: a folder per head,
``OUT/labels/semantic/``, ``OUT/labels/geometric/``, ...); ``OUT/manifest.jsonl`` has one row per
input. A two-input net (NYUDv2 fusion: nyud-fcn32s-color-d, -color-hha) takes ``--depth DIR`` or
``--hha DIR``: each image's file there is found as ``segment`` finds it, before Ray starts, and
read by the actor beside the image (videos have no depth track: refused for these nets). The
exit status is 1 when any input failed (the manifest and the last line name them).
"""

from __future__ import annotations

import argparse
import sys

from ..errors import InputError


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    from ..distributed import MODES
    from ..names import BACKENDS, PRECISIONS
    from ..zoo import BUILTIN

    a = parser.add_argument
    a("checkpoint", help=f"a checkpoint fastfcn.load reads, an exported .onnx (path or URI), or a built-in "
                         f"model by name ({', '.join(BUILTIN)})")
    a("inputs", nargs="+", metavar="INPUT",
      help="image and video files, folders (walked recursively), globs, or URIs (s3://, gs://, file://)")
    a("--out", required=True,
      help="output folder: labels/, overlays/ and manifest.jsonl; a net with several heads (SIFT Flow) "
           "writes labels/<head>/, overlays/<head>/, ... as segment does")
    a("--address", default=None,
      help="the Ray cluster: ray://HEAD:10001 or auto (a `ray start` on this machine); default: a local Ray")
    a("--workers", type=int, default=None, help="actors, each holding one Segmenter (default: one per "
      "CPU, or per --gpus-per-worker GPUs)")
    a("--gpus-per-worker", type=float, default=0, help="GPUs per actor (default 0: CPU)")
    a("--batch-size", type=int, default=8, help="images per actor call (default 8)")
    a("--overlays", action="store_true", help="also write OUT/overlays/<path>.png (.mp4 for videos)")
    a("--mode", choices=MODES, default="labels",
      help="the picture beside the labels: labels (none, the default), overlay or side-by-side")
    a("--no-resume", dest="resume", action="store_false",
      help="redo every input (default: skip inputs the manifest records as complete)")
    a("--backend", default="auto", choices=("auto", *BACKENDS), help="Segmenter backend")
    a("--precision", default="auto", choices=("auto", *PRECISIONS), help="compute precision")
    from .segment import add_second_input_arguments

    add_second_input_arguments(parser, "DIR/<path> named as each image, <path> relative to the image's "
                                       "input folder, any image suffix; DIR a local folder or a URI, read by "
                                       "the workers as the images are; images only (a video has no depth "
                                       "track)")


def main(args: argparse.Namespace) -> int:
    from ..distributed import segment_dataset

    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers must be >= 1; got {args.workers}")
    summary = segment_dataset(
        args.inputs, args.out, args.checkpoint, backend=args.backend, precision=args.precision,
        batch_size=args.batch_size, concurrency=args.workers, num_gpus_per_worker=args.gpus_per_worker,
        mode=args.mode, overlays=args.overlays, resume=args.resume, address=args.address,
        depth=args.depth, hha=args.hha,
    )  # fmt: skip
    for src, error in summary["failed_inputs"]:
        print(f"fastfcn batch: failed {src}: {error}", file=sys.stderr)
    return 1 if summary["failed"] else 0
