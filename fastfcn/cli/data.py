"""``fastfcn data synth OUT``: write synthetic scenes in the VOC layout (train, val, trainval lists)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data import HELDOUT_SEED, HELDOUT_SIZE, SyntheticScenes, write_voc
from ..errors import InputError


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = sub.add_parser("synth", help="write synthetic scenes in the VOC layout (train, val, trainval lists)")
    p.add_argument("out", help="output folder (created)")
    p.add_argument("--n", type=int, default=1000, help="training scenes (default 1000)")
    p.add_argument("--val-n", type=int, default=200, help="val scenes, from the held-out seed (default 200)")
    p.add_argument("--size", type=int, default=HELDOUT_SIZE, help=f"side in pixels (default {HELDOUT_SIZE})")
    p.add_argument("--seed", type=int, default=0, help="seed of the training scenes (default 0)")
    p.add_argument("--num-classes", type=int, default=5, help="background + object classes (default 5)")


def main(args: argparse.Namespace) -> int:
    if args.data_command != "synth":
        raise InputError(f"unknown data action {args.data_command!r}")
    if args.seed == HELDOUT_SEED and args.n:
        raise InputError(f"seed {HELDOUT_SEED} is the held-out split's; choose another training seed")
    from ..paths import check_output_dir

    check_output_dir(args.out, "OUT")
    train = SyntheticScenes(args.n, args.size, args.seed, args.num_classes)
    val = SyntheticScenes(args.val_n, args.size, HELDOUT_SEED, args.num_classes)
    a = write_voc(train, args.out, "train")
    b = write_voc(val, args.out, "val")
    seg = Path(args.out) / "ImageSets" / "Segmentation"
    (seg / "trainval.txt").write_text("".join(f"{i}\n" for i in a + b))
    print(
        f"wrote {len(a)} train and {len(b)} val scenes ({args.size}x{args.size}, {args.num_classes} classes) "
        f"to {args.out}",
        file=sys.stderr,
    )
    return 0
