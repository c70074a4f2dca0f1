"""What several commands do the same way: find the checkpoint, open the Segmenter."""

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
