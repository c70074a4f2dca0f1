"""What several commands do the same way: find the checkpoint, open the Segmenter, read the
dense CRF's options (--crf and its parameters)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import FastFCNError, InputError
from ..zoo import resolve


def checkpoint_path(name: str) -> Path:
    """A checkpoint argument (a path or a built-in model's name) as an existing path."""
    ckpt = Path(resolve(name))
    if not ckpt.exists():
        raise FileNotFoundError(f"{ckpt}: no such checkpoint")
    return ckpt


def open_segmenter(ckpt: Path, args: argparse.Namespace, **options):
    """``Segmenter(ckpt)`` with the command's --arch, --device, --backend and --precision; a bad
    value among them is an InputError with the Segmenter's message (one line on the CLI)."""
    from ..runtime import Segmenter

    try:
        return Segmenter(ckpt, arch=args.arch, device=args.device, backend=args.backend,
                         precision=args.precision, **options)  # fmt: skip
    except (ValueError, TypeError) as e:
        if isinstance(e, FastFCNError):
            raise
        raise InputError(str(e)) from None


_FLAGS = {  # CLI option -> CRFParams field
    "--crf-iterations": "iterations",
    "--crf-gaussian-sxy": "gaussian_sxy",
    "--crf-gaussian-compat": "gaussian_compat",
    "--crf-bilateral-sxy": "bilateral_sxy",
    "--crf-bilateral-srgb": "bilateral_srgb",
    "--crf-bilateral-compat": "bilateral_compat",
}


def add_crf_arguments(parser: argparse.ArgumentParser) -> None:
    """``--crf`` and its parameters (defaults: fastfcn.runtime.crf.CRFParams, DeepLab's)."""
    from ..runtime.crf import INSTALL_HINT, CRFParams

    d = CRFParams()
    parser.add_argument("--crf", action="store_true",
                        help=f"refine with a dense CRF on the original image (extra: {INSTALL_HINT})")
    for flag, name in _FLAGS.items():
        kind = int if name == "iterations" else float
        parser.add_argument(flag, type=kind, default=None, metavar="N" if kind is int else "X",
                            help=f"with --crf: {name} (default {getattr(d, name):g}, DeepLab's)")


def crf_from_args(args: argparse.Namespace) -> dict:
    """Segmenter keyword arguments for the parsed ``--crf*`` options: {} without --crf;
    a CRF parameter without --crf is an error."""
    from ..runtime.crf import CRFParams

    given = {name: getattr(args, flag[2:].replace("-", "_")) for flag, name in _FLAGS.items()}
    given = {k: v for k, v in given.items() if v is not None}
    if not args.crf:
        if given:
            flags = [f for f, n in _FLAGS.items() if n in given]
            raise InputError(f"{', '.join(flags)} set without --crf; add --crf to use the dense CRF")
        return {}
    try:
        return {"postprocess": "crf", "crf": CRFParams(**given)}
    except ValueError as e:
        raise InputError(str(e).replace("CRFParams.", "--crf-").replace("_", "-")) from None
