"""``fastfcn export CHECKPOINT OUT.onnx [--static --size H W] [--opset N] [--precision fp16]``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import InputError
from ..names import ARCHS
from ..paths import check_output_file
from ..zoo import BUILTIN, resolve
from .info import human_size


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    builtin = f"or a built-in model by name ({', '.join(BUILTIN)})"
    parser.add_argument("checkpoint",
                        help=f".safetensors, .pt/.pth or .caffemodel (with --arch) {builtin}")
    parser.add_argument("out", help="the .onnx file to write")
    parser.add_argument("--arch", choices=ARCHS, help="for files that do not record it")
    parser.add_argument("--static", action="store_true",
                        help="fix batch, height and width (to --batch x --size) instead of dynamic")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(500, 500),
                        help="input size of a --static graph (default 500 500)")
    parser.add_argument("--batch", type=int, default=1, help="batch size of a --static graph (default 1)")
    parser.add_argument("--opset", type=int, default=None,
                        help="ONNX opset, >= 18 (default: the exporter's)")
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                        help="fp16: weights and compute in float16, input/output still float32")


def main(args: argparse.Namespace) -> int:
    from ..export import export_onnx

    src, out = Path(resolve(args.checkpoint)), Path(args.out)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file")
    if out.suffix.lower() != ".onnx":
        raise InputError(f"{out}: the output file must end in .onnx")
    if args.opset is not None and args.opset < 18:
        raise InputError(f"--opset {args.opset}: expected 18 or later (the torch.export exporter's minimum)")
    if args.static and (min(args.size) < 1 or args.batch < 1):
        raise InputError(f"--size and --batch must be >= 1; got {args.size} and {args.batch}")
    check_output_file(out, "the output file")
    t0 = time.perf_counter()
    export_onnx(src, out, dynamic=not args.static, opset=args.opset, precision=args.precision, arch=args.arch,
                input_size=tuple(args.size), batch_size=args.batch)
    shape = f"{args.batch}x3x{args.size[0]}x{args.size[1]}" if args.static else "Nx3xHxW (dynamic)"
    print(f"wrote {out} ({human_size(out.stat().st_size)}, {args.precision}, input {shape}) "
          f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0

