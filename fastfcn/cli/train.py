"""``fastfcn train``: the arguments of a training run, checked before anything is read or
written; the run itself is ``fastfcn.training.train``."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..errors import InputError


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    from ..data import HELDOUT_SIZE
    from ..models import available
    from ..names import device_arg

    a = parser.add_argument
    a("--data", default="synthetic",
      help="a VOC root, or 'synthetic' (SyntheticScenes; default: for SIFT Flow nets with geometric labels "
           "too, for the colour + depth / HHA nets with each scene's depth map / HHA image); for a net "
           "with several heads (SIFT Flow) the labels of each head in "
           "SegmentationClass/<head>/<id>.png; `fastfcn data synth OUT --arch ARCH` writes the scenes "
           "in the layout ARCH reads")  # fmt: skip
    a("--split", default="train", help="VOC split to train on (default train; e.g. train_aug with SBD)")
    a("--val-split", default="val", help="VOC split for validation during training (default val)")
    a("--out", default="runs/train", help="output folder: checkpoints, history, curves (default runs/train)")
    a("--export", default=None, help="also write the final model to this path")
    a("--arch", default="fcn8s", choices=available(),
      help="architecture (default fcn8s); see --stages for the staged schedule")  # fmt: skip
    a("--stages", default=None, help="staged schedule, e.g. fcn32s:3000,fcn16s:1000,fcn8s:1000")
    a("--width", type=float, default=1.0, help="channel width multiplier (default 1.0 = the paper's net)")
    a("--num-classes", type=int, default=5,
      help="classes of the synthetic data, SIFT Flow's semantic head's (its geometric head adds 3; VOC: from "
           "the data)")  # fmt: skip
    a("--size", type=int, default=HELDOUT_SIZE, help=f"synthetic scene size (default {HELDOUT_SIZE})")
    a("--train-n", type=int, default=100_000, help="synthetic training scenes to draw from (default 100000)")
    a("--seed", type=int, default=0, help="seed of data order, augmentation, init and synthetic scenes")
    a("--iters", type=int, default=1000, help="iterations (single stage; default 1000)")
    a("--batch", type=int, default=8, help="global batch size (split over processes; default 8)")
    a("--mosaic", type=int, default=1, help="train on KxK tiles of images (same-size data; default 1)")
    a("--optimizer", choices=("sgd", "adam"), default="adam", help="adam (default) or sgd with momentum")
    a("--lr", type=float, default=None, help="learning rate (default: adam 1e-3, sgd 1e-2 with mean loss)")
    a("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9; the paper: 0.99 with sum loss)")
    a("--weight-decay", type=float, default=0.0, help="weight decay (the paper: 5e-4 or 2e-4)")
    a("--schedule", choices=("const", "poly", "cosine"), default="const", help="learning-rate schedule")
    a("--loss-reduction", choices=("mean", "sum"), default="mean",
      help="mean over pixels (default) or the paper's unnormalised sum")  # fmt: skip
    a("--scale-min", type=float, default=0.5, help="random scaling range, low end (default 0.5)")
    a("--scale-max", type=float, default=1.3, help="random scaling range, high end (0: off; default 1.3)")
    a("--no-flip", dest="flip", action="store_false", help="no random horizontal flips")
    a("--dropout", type=float, default=0.5, help="dropout after fc6 and fc7 (default 0.5, the paper's)")
    a("--batchnorm", action="store_true",
      help="train with BatchNorm after each conv, folded away in every saved model (from-scratch training)")
    a("--learnable-upsampling", action="store_true", help="learn the upsampling deconvolutions too")
    a("--init", default=None,
      help="initialise from a checkpoint, by layer name where shapes match, or from an ImageNet "
           "classifier (VGG16 / AlexNet / GoogLeNet .caffemodel, torchvision vgg16 .pth; told apart "
           "by content)")  # fmt: skip
    a("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    a("--val-every", type=int, default=200, help="validate every N iterations (0: never; default 200)")
    a("--val-n", type=int, default=100, help="validation images (default 100)")
    a("--save-every", type=int, default=200, help="checkpoint every N iterations (default 200)")
    a("--device", default="auto", type=device_arg,
      help="cpu, cuda, cuda:1 ... (default: the GPU of this rank, else CPU)")
    a("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    a("--quiet", action="store_true", help="no progress bar")
    from .segment import add_second_input_arguments

    add_second_input_arguments(parser, "DIR/<id>.png for JPEGImages/<id>.jpg (any image suffix), for the "
                                       "training and validation splits alike")  # fmt: skip


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad arguments with one InputError naming the option and its value, before any
    data is read or anything is written (a bad --export found after training loses the run)."""
    import torch

    from ..models import available
    from ..paths import check_output_dir, check_output_file
    from ..training.loop import parse_stages

    def need(ok: bool, option: str, value, expected: str) -> None:
        if not ok:
            raise InputError(f"{option} {value}: expected {expected}")

    finite = math.isfinite
    need(finite(args.lr) and args.lr > 0, "--lr", args.lr, "a learning rate > 0")
    need(0 < args.width <= 4, "--width", args.width, "a channel width multiplier in (0, 4]")
    need(finite(args.momentum) and 0 <= args.momentum < 1, "--momentum", args.momentum, "a value in [0, 1)")
    need(finite(args.weight_decay) and args.weight_decay >= 0, "--weight-decay", args.weight_decay, ">= 0")
    need(0 <= args.dropout < 1, "--dropout", args.dropout, "a probability in [0, 1)")
    for option in ("batch", "iters", "mosaic", "save_every", "train_n"):
        v = getattr(args, option)
        need(v >= 1, "--" + option.replace("_", "-"), v, ">= 1")
    for option in ("val_every", "val_n", "threads", "seed"):  # numpy's generators take no negative seed
        v = getattr(args, option)
        need(v >= 0, "--" + option.replace("_", "-"), v, ">= 0")
    need(args.num_classes >= 2, "--num-classes", args.num_classes, ">= 2 (background and one object class)")
    need(args.size >= 8, "--size", args.size, ">= 8 pixels")
    for option in ("scale_min", "scale_max"):  # numpy's uniform(0.5, inf) overflows, naming no option
        v = getattr(args, option)
        need(finite(v), "--" + option.replace("_", "-"), v, "a finite number")
    if not 0 <= args.scale_min <= args.scale_max and args.scale_max != 0:
        raise InputError(f"--scale-min {args.scale_min} must be in 0..--scale-max ({args.scale_max})")
    stages = parse_stages(args.stages, args.arch, args.iters)
    for arch, _ in stages:
        need(arch in available(), "--stages architecture", repr(arch), f"one of {', '.join(available())}")
    _check_heads_and_inputs(args, [arch for arch, _ in stages])
    if args.init is not None and not Path(args.init).is_file():
        raise InputError(f"--init {args.init}: no such checkpoint file")
    if args.data != "synthetic" and not Path(args.data).is_dir():
        raise InputError(f"--data {args.data}: not a folder; expected a VOC root or 'synthetic'")
    if args.device != "auto":
        try:
            torch.device(args.device)
        except (RuntimeError, TypeError):
            raise InputError(f"--device {args.device}: expected auto, cpu, cuda or cuda:N") from None
    check_output_dir(args.out, "--out")
    if args.export:
        check_output_file(args.export, "--export")


def _check_heads_and_inputs(args: argparse.Namespace, archs: list[str]) -> None:
    """Every stage's net has the heads and inputs of the first (the data and the loss are read
    once per run); --depth / --hha is given exactly when the nets take that second input, as a
    folder, and never with --data synthetic, whose scenes make their own depth maps and HHA images
    (and SIFT Flow's geometric labels: ``fastfcn.data.SyntheticScenes``)."""
    from ..config import arch_inputs
    from ..modalities import second_modality, synthetic_second
    from ..models import DEFAULT_CLASSES
    from ..models.multihead import output_heads

    def heads(arch):
        return tuple(n for n, _ in output_heads({"arch": arch, "num_classes": DEFAULT_CLASSES[arch]}) or ())

    kinds = {(heads(a), arch_inputs(a)) for a in archs}
    if len(kinds) > 1:
        raise InputError(f"--stages {args.stages}: every stage's net must have the same heads and inputs "
                         f"(one data set feeds them all); got {', '.join(archs)}")  # fmt: skip
    (_, inputs), arch = kinds.pop(), archs[0]
    given = {m: d for m, d in (("depth", args.depth), ("hha", args.hha)) if d is not None}
    if args.data == "synthetic":
        synthetic_second(arch, inputs, given)
        return
    want = second_modality(arch, inputs, given)
    if want is not None and not Path(given[want]).is_dir():
        raise InputError(f"--{want} {given[want]}: not a folder")


def main(args: argparse.Namespace) -> int:
    if args.lr is None:
        args.lr = 1e-3 if args.optimizer == "adam" else 1e-2
    check_args(args)
    from ..training import train

    train(args)
    return 0
