"""The `fastfcn` command.

Each subcommand lives in its own module, imported only when it runs, and
exposes ``add_arguments(parser, command)`` and ``main(args) -> int``
(``args.command`` names the subcommand, for modules that serve several).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import FastFCNError

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("fastfcn.demo", "segment generated images with the built-in model; compare backends"),
    "info": ("fastfcn.runtime.commands", "describe a checkpoint"),
    "export": ("fastfcn.runtime.commands", "export a checkpoint to ONNX"),
    "segment": ("fastfcn.runtime.commands", "segment images to label PNGs and overlays"),
    "video": ("fastfcn.video", "segment a video file: overlay, side by side or a lossless label video"),
    "train": ("fastfcn.train", "train a model"),
    "eval": ("fastfcn.evaluate", "evaluate a checkpoint: pixel acc, mean acc, mean IU, f.w. IU"),
    "data": ("fastfcn.data", "dataset tools (data synth OUT: write synthetic scenes in VOC layout)"),
    "bench-report": ("fastfcn.bench_report", "turn stored benchmark results into a table and chart"),
}


def _module(name: str):
    return importlib.import_module(COMMANDS[name][0])


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="fastfcn", description="Fully convolutional segmentation, fast.")
    parser.add_argument("--version", action="version", version=f"fastfcn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if only == name:
            _module(name).add_arguments(p, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    only = first if first in COMMANDS else None
    parser = build_parser(only)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    mod = _module(args.command)
    try:
        rc = mod.main(args)
    except FastFCNError as e:
        print(f"fastfcn {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        print(f"fastfcn {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fastfcn {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
