"""``fastfcn demo``: the built-in model on held-out synthetic scenes through every backend
that runs here (``fastfcn.demo.run_demo``)."""

from __future__ import annotations

import argparse
import sys
import time

from ..demo import DEMO_MODEL, run_demo
from ..runtime.registry import available_backends


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    a = parser.add_argument
    a("--out", default="fastfcn-demo-out", help="folder for the overlays (default ./fastfcn-demo-out)")
    a("--n", type=int, default=16, help="number of scenes (default 16)")
    a("--backends", default=None,
      help=f"comma-separated subset of {','.join(available_backends())} (default: all)")
    a("--checkpoint", default=None, help="a checkpoint other than the built-in model")
    a("--repeats", type=int, default=3, help="timed runs per backend (default 3; median reported)")
    a("--video-seconds", type=float, default=3.0,
      help="length of the demo video of moving scenes (default 3; 0: none)")


def main(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..paths import check_output_dir

    if args.n < 1 or args.repeats < 1:
        raise InputError(f"--n and --repeats must be >= 1; got {args.n} and {args.repeats}")
    check_output_dir(args.out, "--out")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else None
    unknown = sorted(set(backends or ()) - set(available_backends()))
    if unknown:
        raise InputError(f"unknown backend(s) {unknown}; expected some of {available_backends()}")
    if args.checkpoint is None and not DEMO_MODEL.is_file():
        raise InputError(f"the built-in model {DEMO_MODEL} is missing; reinstall fastfcn")
    t = time.perf_counter()
    if args.video_seconds < 0:
        raise InputError(f"--video-seconds must be >= 0; got {args.video_seconds}")
    run_demo(args.out, args.n, backends, args.checkpoint, args.repeats, video_seconds=args.video_seconds)
    print(f"done in {time.perf_counter() - t:.1f} s", file=sys.stdout)
    return 0
