"""``fastfcn video CHECKPOINT IN OUT``: a video file through ``fastfcn.video.segment_video``.

    fastfcn video fcn8s.safetensors street.mp4 street_seg.mp4 [--mode overlay|labels|side-by-side]
        [--labels-out labels.mkv] [--alpha 0.5] [--batch-size 8] [--every 1] [--start S] [--duration S]
        [--backend B] [--precision P] [--device D] [--depth DEPTH_VIDEO | --hha HHA_VIDEO]
        [--pair index|time|clock] [--pair-tolerance SECONDS]

A net with several heads (SIFT Flow: semantic and geometric) writes each output once per head:
street_seg.semantic.mp4 and street_seg.geometric.mp4, labels.semantic.mkv / labels.geometric.mkv,
a label folder labels/ as labels/semantic/ and labels/geometric/ (fastfcn.video.head_target).

The two-input NYUDv2 nets segment an RGB-D recording: the colour video IN with its depth video
(nyud-fcn32s-color-d: --depth, 16-bit greyscale millimetres, e.g. FFV1 gray16le in .mkv) or HHA
video (nyud-fcn32s-color-hha: --hha), decoded in lockstep, frame i with frame i over the same
--start / --duration (--pair index, the default), or each colour frame with the second video's
frame nearest in time, each from its stream's start (--pair time: streams at other or drifting
rates; within --pair-tolerance seconds, default half the colour frame interval; the summary line
counts the second video's frames no colour frame took), or nearest in time as both files record it
(--pair clock: one recorder's files on one clock, a later start kept as an offset). The output
shows the colour frames. A missing or wrong flag for the net, an 8-bit or colour depth video,
another size or frame count, or (--pair time / clock) a colour frame without a second frame near
enough is an error (one line, status 1).
"""

from __future__ import annotations

import argparse
import sys

from ..names import ARCHS, BACKENDS, PRECISIONS, device_arg
from ..zoo import BUILTIN
from .common import checkpoint_path, open_segmenter


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    from ..video import MODES, PAIRS

    a = parser.add_argument
    a("checkpoint", help=f"a checkpoint fastfcn.load reads, an exported .onnx, or a built-in model by name "
                         f"({', '.join(BUILTIN)})")
    a("input", help="the video file to segment")
    a("output", help="the video to write (.mp4, .mkv, ...; --mode labels: .mkv or a folder for PNGs); a net "
                     "with several heads (SIFT Flow) writes one per head, OUT.mp4 as OUT.semantic.mp4 and "
                     "OUT.geometric.mp4, a folder DIR/ as DIR/semantic/ and DIR/geometric/")
    a("--mode", choices=MODES, default="overlay",
      help="overlay (default): frame + class colours; side-by-side: frame | colours; labels: class ids")
    a("--labels-out", default=None, metavar="PATH",
      help="also write the class ids: a lossless FFV1 .mkv, or a folder for palette PNGs (one per head, "
           "named as OUTPUT's, for a net with several heads)")
    a("--alpha", type=float, default=0.5, help="overlay opacity of the class colours, 0..1 (default 0.5)")
    a("--batch-size", type=int, default=8, help="frames per inference batch (default 8)")
    a("--every", type=int, default=1,
      help="segment every Nth frame, reusing its labels for the frames between (default 1)")
    a("--start", type=float, default=None, help="start at this time, in seconds")
    a("--duration", type=float, default=None, help="segment this many seconds")
    a("--backend", default="auto", choices=("auto", *BACKENDS), help="Segmenter backend")
    a("--precision", default="auto", choices=("auto", *PRECISIONS), help="compute precision")
    a("--device", default="auto", type=device_arg, help="auto | cpu | cuda | cuda:N")
    a("--depth", metavar="DEPTH_VIDEO", default=None,
      help="the depth video of a colour + depth net (nyud-fcn32s-color-d): 16-bit greyscale millimetres "
           "(FFV1 gray16le in .mkv, as RGB-D recorders write), frame i paired with the input's frame i")
    a("--hha", metavar="HHA_VIDEO", default=None,
      help="the HHA video of a colour + HHA net (nyud-fcn32s-color-hha), paired frame by frame as --depth")
    a("--pair", choices=PAIRS, default="index",
      help="how --depth / --hha frames meet the input's: index (default): frame i with frame i, equal "
           "counts; time: each input frame with the nearest in time (streams at other or drifting "
           "rates), the frames no input frame takes skipped and counted; clock: as time, with the times "
           "as both files record them (one recorder's files on one clock: a later start stays an offset)")
    a("--pair-tolerance", type=float, default=None, metavar="SECONDS",
      help="--pair time / clock: the largest time between paired frames (default half the input's frame "
           "interval)")
    a("--arch", choices=ARCHS, help="architecture, for checkpoint files that do not record it")
    a("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from ..video import check_options, check_paths, format_summary, second_video, segment_video

    check_options(args.mode, args.alpha, args.batch_size, args.every, args.start, args.duration, args.pair,
                  args.pair_tolerance)  # fmt: skip
    check_paths(args.input, args.output, args.labels_out, args.depth if args.depth is not None else args.hha,
                args.mode)
    seg = open_segmenter(checkpoint_path(args.checkpoint), args)
    second_video(seg.config, args.depth, args.hha, "--{m}", " VIDEO")  # the flag fits the net
    summary = segment_video(
        args.input, args.output, seg, mode=args.mode, alpha=args.alpha, batch_size=args.batch_size,
        every=args.every, start=args.start, duration=args.duration, labels_out=args.labels_out,
        progress=not args.quiet, depth=args.depth, hha=args.hha, pair=args.pair,
        pair_tolerance=args.pair_tolerance,
    )  # fmt: skip
    if args.quiet:
        print(format_summary(summary), file=sys.stderr)
    return 0
