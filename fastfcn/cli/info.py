"""``fastfcn info CHECKPOINT [--arch A] [--json]``: describe a checkpoint (or a built-in model by name)."""

from __future__ import annotations

import argparse
import json

from ..names import ARCHS
from ..zoo import BUILTIN


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    builtin = f"or a built-in model by name ({', '.join(BUILTIN)})"
    parser.add_argument("checkpoint",
                        help=f".safetensors, .pt/.pth, .caffemodel (with --arch), .onnx {builtin}")
    parser.add_argument("--arch", choices=ARCHS, help="for files that do not record it")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def human_size(n: int) -> str:
    """Bytes as ``512 B``, ``1.5 kB``, ``138.4 MB`` (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def main(args: argparse.Namespace) -> int:
    from ..describe import describe_checkpoint

    info = describe_checkpoint(args.checkpoint, args.arch)
    if args.json:
        print(json.dumps(info))
        return 0
    names = info["class_names"]
    more = ", ..." if len(names) > 6 else ""
    rows = [
        ("file", info["file"]),
        ("format", info["format"]),
        ("file size", human_size(info["file_size"])),
        ("arch", info["arch"]),
        ("classes", f"{info['num_classes']}" + (f" ({', '.join(names[:6])}{more})" if names else "")),
        ("width", info["width"]),
        ("modalities", " + ".join(info["modalities"])),
        ("params", f"{info['params']:,} ({human_size(4 * info['params'])} as fp32)"),
        ("mean", ", ".join(f"{m:g}" for m in info["mean"] or [])),
        ("std", ", ".join(f"{s:g}" for s in info["std"] or [])),
        ("colour order", info["color_order"]),
        ("input scale", info["input_scale"]),
        ("options", json.dumps(info["options"])),
    ]
    if info.get("heads"):
        rows.insert(5, ("heads", ", ".join(f"{n} ({c} classes)" for n, c in info["heads"])))
    if "inputs" in info:
        rows += [(f"input {k}", f"{t} {s}") for k, (t, s) in info["inputs"].items()]
        rows += [(f"output {k}", f"{t} {s}") for k, (t, s) in info["outputs"].items()]
    if info.get("fastfcn_version"):
        rows.append(("written by", f"fastfcn {info['fastfcn_version']}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0

