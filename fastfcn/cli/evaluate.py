"""``fastfcn eval CHECKPOINT --data VOCROOT|synthetic [--depth DIR | --hha DIR]``: ``fastfcn.evaluate``
through any backend, as a table or one JSON object; per head for a net with several (SIFT Flow:
``SegmentationClass/<head>/<id>.png``), with each image's second input for the NYUDv2 fusion nets
(``DIR/<id>.<png|...>``, paired as ``segment`` pairs them)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from ..data import Paired
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


def _open_data(args, num_classes: int, heads=None, second=None, max_pixels: int | None = None,
               image: str = "color"):  # fmt: skip
    """The dataset and a line saying what it is. heads: the model's ((name, classes), ...) when it
    has several (labels per head); second: (modality, folder) of a two-input net (paired files);
    image: the model's first input, "hha" for a net that takes HHA images (the synthetic scenes
    then give their HHA encoding as the image, as a VOC-layout folder for it holds HHA images)."""
    from .. import data

    if args.data == "synthetic":
        # The scenes give a two-headed net SIFT Flow's geometric labels too, and a two-input net
        # each scene's depth map or HHA image (fastfcn.data.SyntheticScenes), as training does.
        n = args.n or data.HELDOUT_N
        names = [name for name, _ in heads] if heads else None
        semantic = heads[0][1] if heads else num_classes  # SIFT Flow's semantic head comes first
        if not 2 <= semantic <= data.MAX_CLASSES:
            raise InputError(
                f"--data synthetic: the scenes have 2..{data.MAX_CLASSES} classes (background + shapes) but "
                f"the model predicts {semantic}{' semantic' if heads else ''}; evaluate it on its own data "
                "set (a VOC root)"
            )
        ds = data.heldout_scenes(n, args.size, semantic, heads=names, second=second and second[0],
                                 image=image)  # fmt: skip
        extra = (f", with {second[0]}" if second else "") + (", HHA images" if image == "hha" else "")
        return ds, f"held-out synthetic split ({n} scenes{extra})"
    ds = data.VOCSegmentation(args.data, args.split, heads=[n for n, _ in heads] if heads else None)
    # A folder of labels per head without a class_names.txt has no class count of its own (the
    # reader's default is VOC's): there the net's are taken, as `fastfcn train` takes the arch's.
    counted = not heads or (ds.root / "class_names.txt").is_file()
    if counted and ds.num_classes != num_classes:
        raise InputError(
            f"{args.data} has {ds.num_classes} classes but the model predicts {num_classes}; "
            "evaluate a model trained for this dataset"
        )
    if args.n and args.n < len(ds):
        ds.ids, ds.images, ds.labels = ds.ids[: args.n], ds.images[: args.n], ds.labels[: args.n]
    what = f"{ds.root} split {args.split} ({len(ds)} images)"
    if second is None:
        return ds, what
    return Paired(ds, *second, max_pixels), f"{what} with {second[0]} from {second[1]}"


def _second(args, seg) -> tuple[str, Path | None] | None:
    """(modality, folder) of --depth / --hha, checked against the model's inputs; with --data
    synthetic, whose scenes make it, (the model's second modality, None), the flags refused."""
    from ..config import config_inputs
    from ..modalities import synthetic_second
    from .segment import second_modality

    if args.data != "synthetic":
        return second_modality(args, seg)
    given = {k: v for k in ("depth", "hha") if (v := getattr(args, k)) is not None}
    want = synthetic_second(seg.config.get("arch"), config_inputs(seg.config), given)
    return None if want is None else (want, None)


def _metrics(result: dict, matrix, names: list) -> dict:
    """One head's numbers as JSON values (nan: null)."""
    clean = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
    return {
        **{k: clean(result[k]) for k in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu")},
        "per_class_iu": {n: clean(float(v)) for n, v in zip(names, result["per_class_iu"])},
        "per_class_acc": {n: clean(float(v)) for n, v in zip(names, result["per_class_acc"])},
        "confusion_matrix": matrix.tolist(),
    }


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    from ..data import HELDOUT_SIZE
    from ..names import BACKENDS, PRECISIONS, device_arg

    a = parser.add_argument
    a("checkpoint", help="a fastfcn checkpoint, an ONNX file exported by fastfcn, or a built-in name (demo)")
    a("--data", required=True,
      help="a VOC root (VOCdevkit/VOC2012) or 'synthetic' (the held-out split, with geometric labels or "
           "depth / HHA for the nets that take them); for a net with several heads (SIFT Flow) the labels "
           "of each head in SegmentationClass/<head>/<id>.png")  # fmt: skip
    a("--split", default="val", help="VOC split (default val)")
    a("--n", type=int, default=0, help="evaluate only the first N images (synthetic: default 500)")
    a("--size", type=int, default=HELDOUT_SIZE, help=f"synthetic scene size (default {HELDOUT_SIZE})")
    a("--backend", default="auto", choices=("auto", *BACKENDS), help="Segmenter backend")
    a("--device", default="auto", type=device_arg, help="auto, cpu, cuda, cuda:N")
    a("--precision", default="auto", choices=("auto", *PRECISIONS), help="default auto")
    a("--batch", type=int, default=8, help="images per run() call (default 8)")
    a("--json", action="store_true", help="print the metrics as one JSON object (per head under \"heads\" "
                                           "for a net with several)")
    from .segment import add_second_input_arguments

    add_second_input_arguments(parser, "DIR/<id>.png for JPEGImages/<id>.jpg (any image suffix)")
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
    second = _second(args, seg)
    cfg = segmenter_config(seg, args.checkpoint)
    num_classes = int(cfg["num_classes"])
    heads = getattr(seg, "heads", None)
    from ..config import config_inputs

    ds, what = _open_data(args, num_classes, heads, second, seg.max_pixels, image=config_inputs(cfg)[0])
    t0 = time.perf_counter()
    bar = Progress(len(ds), "eval", enabled=not args.json)
    result, matrix = evaluate(seg, ds, num_classes, batch=args.batch, progress=bar)
    seconds = time.perf_counter() - t0
    if heads:
        from ..models.multihead import head_entries

        names = head_entries(cfg, "class_names", heads)
    else:
        names = {None: list(cfg.get("class_names") or [str(i) for i in range(num_classes)])}
        result, matrix = {None: result}, {None: matrix}
    backend = getattr(seg, "backend", args.backend)
    if args.json:
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
        }
        if second is not None:
            obj[second[0]] = str(second[1]) if second[1] is not None else "synthetic"
        per = {n: _metrics(result[n], matrix[n], names[n]) for n in result}
        obj.update({"heads": per} if heads else per[None])
        obj["seconds"] = round(seconds, 3)
        print(json.dumps(obj))
    else:
        crf = f", dense CRF {post['crf']}" if post else ""
        print(f"{args.checkpoint} on {what}, backend {backend}{crf}, {seconds:.1f} s", file=sys.stderr)
        title = lambda n: f"{n} ({len(names[n])} classes)\n" if n else ""  # noqa: E731
        print("\n\n".join(title(n) + format_table(result[n], names[n]) for n in result))
    return 0
