"""The `fastfcn` command.

Each subcommand lives in its own module of this package (``fastfcn.cli.<command>``),
imported only when it runs (so ``fastfcn --help`` imports no torch), and exposes
``add_arguments(parser, command)`` and ``main(args) -> int``. The modules hold argument
parsing, checks and printing; the work itself is the library's (Segmenter, video,
training, evaluate, ...).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import FastFCNError

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("fastfcn.cli.demo", "segment generated images with the built-in model; compare backends"),
    "info": ("fastfcn.cli.info", "describe a checkpoint"),
    "export": ("fastfcn.cli.export", "export a checkpoint to ONNX"),
    "segment": ("fastfcn.cli.segment", "segment images to label PNGs and overlays"),
    "video": ("fastfcn.cli.video", "segment a video file: overlay, side by side or a lossless label video"),
    "batch": ("fastfcn.cli.batch", "segment folders of images and videos on a Ray cluster (extra: ray)"),
    "train": ("fastfcn.cli.train", "train a model"),
    "eval": ("fastfcn.cli.evaluate", "evaluate a checkpoint: pixel acc, mean acc, mean IU, f.w. IU"),
    "data": ("fastfcn.cli.data", "dataset tools (data synth OUT [--arch ARCH]: write synthetic scenes in VOC "
                                 "layout)"),
    "bench-report": ("fastfcn.cli.bench_report", "turn stored benchmark results into a table and chart"),
}


# name -> example lines shown at the end of its --help (every command has some)
EXAMPLES = {
    "demo": ["fastfcn demo", "fastfcn demo --backends torch,fused --n 4 --out demo-out"],
    "info": ["fastfcn info demo", "fastfcn info fcn8s.safetensors --json",
             "fastfcn info fcn8s-heavy-pascal.caffemodel --arch fcn8s"],
    "export": ["fastfcn export demo demo.onnx",
               "fastfcn export fcn8s.safetensors fcn8s.onnx --static --size 500 500"],
    "segment": ["fastfcn segment demo photos/ --out seg/",
                "fastfcn segment fcn8s.safetensors photos/ street.jpg --out seg/ --recursive --batch-size 8",
                "fastfcn segment demo aerial.tif --out seg/ --tile 1024 1024 --overlap 128"],
    "video": ["fastfcn video demo clip.mp4 clip_seg.mp4",
              "fastfcn video fcn8s.safetensors street.mp4 street.mkv --mode labels --every 2",
              "fastfcn video demo clip.mp4 side.mp4 --mode side-by-side --labels-out labels.mkv"],
    "batch": ["fastfcn batch demo photos/ clips/ --out seg/ --workers 2",
              "fastfcn batch fcn8s.safetensors s3://bucket/frames/ --out /shared/seg --address auto "
              "--gpus-per-worker 1 --overlays",
              "fastfcn batch nyud-color-d.safetensors nyud/images/ --depth nyud/depth/ --out seg/"],
    "train": ["fastfcn train --iters 200 --width 0.125 --out runs/tiny",
              "fastfcn train --data VOCdevkit/VOC2012 --stages fcn32s:3000,fcn16s:1000,fcn8s:1000"],
    "eval": ["fastfcn eval demo --data synthetic",
             "fastfcn eval fcn8s.safetensors --data VOCdevkit/VOC2012 --json"],
    "data": ["fastfcn data synth synth-voc/ --n 1000",
             "fastfcn data synth synth-nyud/ --arch nyud-fcn32s-color-d  # then --depth synth-nyud/depth"],
    "bench-report": ["fastfcn bench-report", "fastfcn bench-report benchmarks/results/ --markdown table.md"],
}

class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written; every option with a default shows it (unless its help does)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default in (None, False, argparse.SUPPRESS)
                or action.option_strings == [] and action.nargs in ("*", "+")):
            return text
        shown = action.default
        if isinstance(shown, (list, tuple)):
            shown = " ".join(map(str, shown))
        return f"{text} (default: {shown})"


def _epilog(name: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[name])


def _module(name: str):
    return importlib.import_module(COMMANDS[name][0])


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error contract: one line on stderr naming the option and the
    value, exit status 1 (argparse's default prints the usage block and exits 2)."""

    def error(self, message: str):
        self.exit(1, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(prog="fastfcn", description="Fully convolutional segmentation, fast.",
                     formatter_class=_Formatter,
                     epilog="examples:\n  fastfcn demo\n  fastfcn info demo\n"
                            "  fastfcn segment demo photos/ --out seg/\n"
                            "run 'fastfcn COMMAND --help' for the options of a command")
    parser.add_argument("--version", action="version", version=f"fastfcn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (_, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_, epilog=_epilog(name),
                           formatter_class=_Formatter)
        if only == name:
            _module(name).add_arguments(p, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    only = first if first in COMMANDS else None
    parser = build_parser(only)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or a usage error (1, already printed)
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    if args.command is None:
        parser.print_help()
        return 2
    mod = _module(args.command)
    try:
        rc = mod.main(args)
    except KeyboardInterrupt:
        print(f"fastfcn {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's contract: one line per error, exit 1
        if os.environ.get("FASTFCN_TRACEBACK") == "1":
            raise
        print(f"fastfcn {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 1
    return int(rc or 0)


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line. fastfcn's own errors, bad values (ValueError) and file
    system errors (OSError: they name the path) speak for themselves; anything else is
    unexpected and keeps its type, with the way to see the traceback."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    if isinstance(e, (FastFCNError, ValueError, OSError)):
        return text
    return f"unexpected {type(e).__name__}: {text} (set FASTFCN_TRACEBACK=1 to see the traceback)"


if __name__ == "__main__":
    sys.exit(main())
