"""``fastfcn data synth OUT [--arch ARCH]``: write synthetic scenes in the VOC layout (train, val,
trainval lists), with what ARCH trains and evaluates on (labels per head, depth / HHA files, HHA
images) where ``fastfcn train`` and ``fastfcn eval`` read a real data set's."""

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
    p.add_argument("--num-classes", type=int, default=5,
                   help="background + object classes, a SIFT Flow net's semantic head's (default 5)")
    p.add_argument("--arch", default=None,
                   help="write what this net of `fastfcn train --arch` takes, as `--data synthetic` makes "
                        "it: SIFT Flow nets their semantic and geometric labels in "
                        "SegmentationClass/<head>/; nyud-fcn32s-color-d a depth/ folder of 16-bit "
                        "millimetre PNGs (pass --depth OUT/depth), nyud-fcn32s-color-hha an hha/ folder "
                        "of HHA PNGs (pass --hha OUT/hha); nyud-fcn32s-hha HHA images as "
                        "JPEGImages/<id>.png (lossless); default: colour images and one label map, as the "
                        "VOC nets take")  # fmt: skip


def synthetic_archs() -> tuple[dict[str, dict], dict[str, str]]:
    """{arch: SyntheticScenes' heads / second / image options} of every net the scenes serve, and
    {arch: why not} of the others, in ``fastfcn.models.available()`` order."""
    from ..config import arch_inputs
    from ..data import scene_options
    from ..models import DEFAULT_CLASSES, available
    from ..models.multihead import output_heads

    served, refused = {}, {}
    for arch in available():
        heads = output_heads({"arch": arch, "num_classes": DEFAULT_CLASSES[arch]})
        try:
            served[arch] = scene_options(arch_inputs(arch), [n for n, _ in heads] if heads else None)
        except InputError as e:
            refused[arch] = str(e)
    return served, refused


def _options(arch: str | None) -> dict:
    """SyntheticScenes' options for --arch (none: the one-head colour scenes); InputError listing
    the nets the scenes serve for an unknown arch or one they cannot serve."""
    if arch is None:
        return {}
    served, refused = synthetic_archs()
    if arch in served:
        return served[arch]
    why = f"synthetic scenes cannot serve it ({refused[arch]})" if arch in refused else "unknown architecture"
    raise InputError(f"--arch {arch}: {why}; expected one of {', '.join(served)}")


def _check_own_lists(out: Path) -> None:
    """Refuse an OUT whose split lists name images that ``data synth`` did not write (a real data
    set's VOC root): writing would replace its train, val and trainval lists and add a
    class_names.txt of the scenes' classes, after which the folder reads as the scenes. A folder
    it wrote before is written again."""
    import re

    from ..data import split_ids

    for split in ("train", "val", "trainval"):
        lst = out / "ImageSets" / "Segmentation" / f"{split}.txt"
        ids = split_ids(lst) if lst.is_file() else []
        foreign = [i for i in ids if not re.fullmatch(r"(train|val)_\d{6,}", i)]
        if foreign:
            raise InputError(
                f"OUT {out}: {lst} lists images that data synth did not write ({foreign[0]}, ...); "
                "writing there would replace it: choose a new or empty folder"
            )


def main(args: argparse.Namespace) -> int:
    if args.data_command != "synth":
        raise InputError(f"unknown data action {args.data_command!r}")
    if args.seed == HELDOUT_SEED and args.n:
        raise InputError(f"seed {HELDOUT_SEED} is the held-out split's; choose another training seed")
    options = _options(args.arch)
    from ..paths import check_output_dir

    check_output_dir(args.out, "OUT")
    _check_own_lists(Path(args.out))
    train = SyntheticScenes(args.n, args.size, args.seed, args.num_classes, **options)
    val = SyntheticScenes(args.val_n, args.size, HELDOUT_SEED, args.num_classes, **options)
    a = write_voc(train, args.out, "train")
    b = write_voc(val, args.out, "val")
    seg = Path(args.out) / "ImageSets" / "Segmentation"
    (seg / "trainval.txt").write_text("".join(f"{i}\n" for i in a + b))
    what = [f"{args.num_classes} classes"]
    if options.get("heads"):
        geometric = len(train.class_names) - args.num_classes
        what = [f"{args.num_classes} semantic and {geometric} geometric classes, labels per head in "
                f"SegmentationClass/{{{','.join(options['heads'])}}}/"]  # fmt: skip
    if options.get("image") == "hha":
        what.append("HHA images as JPEGImages/<id>.png")
    second = options.get("second")
    use = f"; pass --{second} {Path(args.out) / second} to fastfcn train and eval" if second else ""
    print(
        f"wrote {len(a)} train and {len(b)} val scenes ({args.size}x{args.size}, {', '.join(what)}) "
        f"to {args.out}{f' for {args.arch}' if args.arch else ''}{use}",
        file=sys.stderr,
    )
    return 0
