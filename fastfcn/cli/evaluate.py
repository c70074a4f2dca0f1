"""``fastfcn eval CHECKPOINT --data VOCROOT|synthetic``: ``fastfcn.evaluate`` through any backend,
as a table or one JSON object."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from ..errors import InputError
from ..evaluate import evaluate
from ..metrics import format_table


def segmenter_config(seg, checkpoint=None) -> dict:
    """The model config (num_classes, class_names, ...) behind a Segmenter."""
    for holder in (seg, getattr(seg, "model", None)):
        cfg = getattr(holder, "config", None)
        if isinstance(cfg, dict) and "num_classes" in cfg:
            return cfg
    if checkpoint is not None and not str(checkpoint).endswith(".onnx"):
        import fastfcn

        return dict(fastfcn.load(checkpoint).config)
    raise InputError("cannot tell the number of classes of this model; pass a fastfcn checkpoint")


def _open_data(args, num_classes: int):
    from .. import data

    if args.data == "synthetic":
        n = args.n or data.HELDOUT_N
        return data.heldout_scenes(n, args.size, num_classes), f"held-out synthetic split ({n} scenes)"
    ds = data.VOCSegmentation(args.data, args.split)
    if ds.num_classes != num_classes:
        raise InputError(
            f"{args.data} has {ds.num_classes} classes but the model predicts {num_classes}; "
            "evaluate a model trained for this dataset"
        )
    if args.n and args.n < len(ds):
        ds.ids, ds.images, ds.labels = ds.ids[: args.n], ds.images[: args.n], ds.labels[: args.n]
    return ds, f"{ds.root} split {args.split} ({len(ds)} images)"


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    from ..data import HELDOUT_SIZE
    from ..names import BACKENDS, PRECISIONS, device_arg

    a = parser.add_argument
    a("checkpoint", help="a fastfcn checkpoint, an ONNX file exported by fastfcn, or a built-in name (demo)")
    a("--data", required=True, help="a VOC root (VOCdevkit/VOC2012) or 'synthetic' (the held-out split)")
    a("--split", default="val", help="VOC split (default val)")
    a("--n", type=int, default=0, help="evaluate only the first N images (synthetic: default 500)")
    a("--size", type=int, default=HELDOUT_SIZE, help=f"synthetic scene size (default {HELDOUT_SIZE})")
    a("--backend", default="auto", choices=("auto", *BACKENDS), help="Segmenter backend")
    a("--device", default="auto", type=device_arg, help="auto, cpu, cuda, cuda:N")
    a("--precision", default="auto", choices=("auto", *PRECISIONS), help="default auto")
    a("--batch", type=int, default=8, help="images per run() call (default 8)")
    a("--json", action="store_true", help="print the metrics as one JSON object")
    from .common import add_crf_arguments

    add_crf_arguments(parser)


def main(args: argparse.Namespace) -> int:
    import fastfcn

    from ..progress import Progress

    # Arguments first: a typo must not cost a model load.
    if args.n < 0 or args.batch < 1 or args.size < 8:
        raise InputError(f"--n {args.n}, --batch {args.batch}, --size {args.size}: expected --n >= 0, "
                         "--batch >= 1 and --size >= 8")
    from .common import crf_from_args

    post = crf_from_args(args)
    if args.data != "synthetic" and not Path(args.data).is_dir():
        raise InputError(f"--data {args.data}: not a folder; expected a VOC root or 'synthetic'")
    from ..zoo import resolve

    if not Path(resolve(args.checkpoint)).is_file():
        raise InputError(f"{args.checkpoint}: no such checkpoint file")
    seg = fastfcn.Segmenter(
        args.checkpoint, backend=args.backend, device=args.device, precision=args.precision, **post
    )
    cfg = segmenter_config(seg, args.checkpoint)
    num_classes = int(cfg["num_classes"])
    names = list(cfg.get("class_names") or [str(i) for i in range(num_classes)])
    ds, what = _open_data(args, num_classes)
    t0 = time.perf_counter()
    bar = Progress(len(ds), "eval", enabled=not args.json)
    result, matrix = evaluate(seg, ds, num_classes, batch=args.batch, progress=bar)
    seconds = time.perf_counter() - t0
    backend = getattr(seg, "backend", args.backend)
    if args.json:
        clean = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
        obj = {
            "checkpoint": str(args.checkpoint),
            "data": args.data if args.data != "synthetic" else "synthetic",
            "split": args.split if args.data != "synthetic" else "heldout",
            "images": len(ds),
            "backend": str(backend),
            "device": str(getattr(seg, "device", args.device)),
            "precision": str(getattr(seg, "precision", args.precision)),
            "postprocess": post.get("postprocess"),
            "crf": post["crf"].as_dict() if post else None,
            **{k: clean(result[k]) for k in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu")},
            "per_class_iu": {n: clean(float(v)) for n, v in zip(names, result["per_class_iu"])},
            "per_class_acc": {n: clean(float(v)) for n, v in zip(names, result["per_class_acc"])},
            "confusion_matrix": matrix.tolist(),
            "seconds": round(seconds, 3),
        }
        print(json.dumps(obj))
    else:
        crf = f", dense CRF {post['crf']}" if post else ""
        print(f"{args.checkpoint} on {what}, backend {backend}{crf}, {seconds:.1f} s", file=sys.stderr)
        print(format_table(result, names))
    return 0
