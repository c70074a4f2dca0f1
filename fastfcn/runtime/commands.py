"""``fastfcn info``, ``fastfcn export`` and ``fastfcn segment``.

    fastfcn info fcn8s.safetensors
    fastfcn export fcn8s.safetensors fcn8s.onnx [--static --size 500 500] [--opset 18] [--precision fp16]
    fastfcn segment fcn8s.safetensors photos/ street.jpg --out seg/ [--backend onnxruntime]

segment writes, per image, ``OUT/<stem>.png`` (the class ids as a palette PNG in
the checkpoint's colours: pixel values are class ids) and ``OUT/<stem>_overlay.png``
(the image blended with the class colours).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, FastFCNError, InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


# ------------------------------------------------------------------------------------ arguments


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    if command == "info":
        parser.add_argument("checkpoint", help=".safetensors, .pt/.pth, .caffemodel (with --arch) or .onnx")
        parser.add_argument("--arch", help="architecture, for files that do not record it (fcn8s-atonce)")
        parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    elif command == "export":
        parser.add_argument("checkpoint", help=".safetensors, .pt/.pth or .caffemodel (with --arch)")
        parser.add_argument("out", help="the .onnx file to write")
        parser.add_argument("--arch", help="architecture, for files that do not record it")
        parser.add_argument("--static", action="store_true",
                            help="fix batch, height and width (to --batch x --size) instead of dynamic")
        parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(500, 500),
                            help="input size of a --static graph (default 500 500)")
        parser.add_argument("--batch", type=int, default=1, help="batch size of a --static graph (default 1)")
        parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
        parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                            help="fp16: weights and compute in float16, input/output still float32")
    elif command == "segment":
        parser.add_argument("checkpoint", help="a checkpoint fastfcn.load reads, or an exported .onnx")
        parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or directories")
        parser.add_argument("--out", required=True, help="output directory (created if missing)")
        parser.add_argument("--arch", help="architecture, for files that do not record it")
        parser.add_argument("--backend", default="auto",
                            help="auto | fused | torch | compile | onnxruntime | openvino (default auto)")
        parser.add_argument("--precision", default="auto", help="auto | fp32 | tf32 | bf16 | fp16")
        parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
        parser.add_argument("--alpha", type=float, default=0.5,
                            help="overlay opacity of the class colours, 0..1 (default 0.5)")
        parser.add_argument("--quiet", action="store_true", help="no progress bar")
    else:
        raise ValueError(f"fastfcn.runtime.commands serves info, export and segment; got {command!r}")


def main(args: argparse.Namespace) -> int:
    return {"info": _info, "export": _export, "segment": _segment}[args.command](args)


# ----------------------------------------------------------------------------------------- info


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _format_name(path: Path) -> str:
    s = path.suffix.lower()
    return {".safetensors": "safetensors", ".pt": "torch (.pt)", ".pth": "torch (.pth)",
            ".caffemodel": "caffemodel", ".onnx": "onnx"}.get(s, f"unknown suffix {s!r} (sniffed)")


def describe_checkpoint(path: str | Path, arch: str | None = None) -> dict:
    """What ``fastfcn info`` prints, as a dict (arch, classes, width, params, preprocessing, format)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    info: dict = {"file": str(path), "file_size": path.stat().st_size, "format": _format_name(path)}
    if path.suffix.lower() == ".onnx":
        from ..export import read_onnx_metadata
        from .ort import describe

        config = read_onnx_metadata(path)
        graph = describe(path)
        export = config.pop("export", {})
        info["format"] = (f"onnx (opset {graph['opset']}, {export.get('precision', '?')}, "
                          f"{'dynamic' if export.get('dynamic') else 'static'} shapes)")
        info["params"] = graph["initializer_elements"]
        info["inputs"], info["outputs"] = graph["inputs"], graph["outputs"]
    else:
        from ..checkpoint import load
        from ..models import parameter_count

        model = load(path, arch=arch)
        config = dict(model.config)
        info["params"] = parameter_count(model)
    for k in ("arch", "num_classes", "width", "options", "mean", "std", "color_order", "input_scale"):
        info[k] = config.get(k)
    names = config.get("class_names") or []
    info["class_names"] = names
    info["fastfcn_version"] = config.get("fastfcn_version")
    return info


def _info(args) -> int:
    info = describe_checkpoint(args.checkpoint, args.arch)
    if args.json:
        print(json.dumps(info))
        return 0
    names = info["class_names"]
    more = ", ..." if len(names) > 6 else ""
    rows = [
        ("file", info["file"]),
        ("format", info["format"]),
        ("file size", _size(info["file_size"])),
        ("arch", info["arch"]),
        ("classes", f"{info['num_classes']}" + (f" ({', '.join(names[:6])}{more})" if names else "")),
        ("width", info["width"]),
        ("params", f"{info['params']:,} ({_size(4 * info['params'])} as fp32)"),
        ("mean", ", ".join(f"{m:g}" for m in info["mean"] or [])),
        ("std", ", ".join(f"{s:g}" for s in info["std"] or [])),
        ("colour order", info["color_order"]),
        ("input scale", info["input_scale"]),
        ("options", json.dumps(info["options"])),
    ]
    if "inputs" in info:
        rows += [(f"input {k}", f"{t} {s}") for k, (t, s) in info["inputs"].items()]
        rows += [(f"output {k}", f"{t} {s}") for k, (t, s) in info["outputs"].items()]
    if info.get("fastfcn_version"):
        rows.append(("written by", f"fastfcn {info['fastfcn_version']}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


# --------------------------------------------------------------------------------------- export


def _export(args) -> int:
    from ..export import export_onnx

    src, out = Path(args.checkpoint), Path(args.out)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file")
    if out.suffix.lower() != ".onnx":
        raise InputError(f"{out}: the output file must end in .onnx")
    if args.static and (min(args.size) < 1 or args.batch < 1):
        raise InputError(f"--size and --batch must be >= 1; got {args.size} and {args.batch}")
    t0 = time.perf_counter()
    export_onnx(src, out, dynamic=not args.static, opset=args.opset, precision=args.precision, arch=args.arch,
                input_size=tuple(args.size), batch_size=args.batch)
    shape = f"{args.batch}x3x{args.size[0]}x{args.size[1]}" if args.static else "Nx3xHxW (dynamic)"
    print(f"wrote {out} ({_size(out.stat().st_size)}, {args.precision}, input {shape}) "
          f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


# -------------------------------------------------------------------------------------- segment


class Progress:
    """A one-line progress bar on stderr: ``[#####.....] 5/10 name`` (redrawn on a terminal,
    one line per step otherwise, so logs stay readable)."""

    def __init__(self, total: int, stream=None, width: int = 30, enabled: bool = True):
        self.total, self.done, self.width = total, 0, width
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and total > 1
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()

    def step(self, name: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        filled = self.width * self.done // self.total
        rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{rate:.2f} img/s {name}")
        if self.tty:
            self.stream.write("\r" + line[:120].ljust(120))
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def collect_images(inputs: list[str]) -> list[Path]:
    """Image files named directly plus the image files (by suffix) in named directories, sorted."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InputError(f"{p}: no images in this directory (looked for {', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return files


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB; InputError naming the file when it is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return np.array(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise InputError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def _out_names(files: list[Path]) -> list[str]:
    # Output stems; a.png and a.jpg in one run would collide, so those keep their suffix.
    stems = [f.stem for f in files]
    return [f.name.replace(".", "_") if stems.count(f.stem) > 1 else f.stem for f in files]


def palette_bytes(palette: list, n: int = 256) -> list[int]:
    """A flat 768-entry PIL palette: the checkpoint's colours, then the VOC colour map."""
    from ..models import voc_palette

    cols = [tuple(int(v) for v in c) for c in (palette if palette is not None else [])][:n]
    cols += voc_palette(n)[len(cols):]
    return [v for c in cols for v in c]


def save_labels(labels: np.ndarray, palette: list, path: Path) -> None:
    """labels: (H, W) class ids -> a palette ("P") PNG whose pixel values are the ids; more than
    256 classes do not fit a palette PNG and are written as 16-bit greyscale."""
    from PIL import Image

    if labels.max(initial=0) > 255:
        Image.fromarray(labels.astype(np.uint16)).save(path)
        return
    im = Image.fromarray(labels.astype(np.uint8))
    # putpalette turns the "L" image into "P" keeping its values (convert("P") would requantise).
    im.putpalette(palette_bytes(palette))
    im.save(path, optimize=False)


def overlay(
    image: np.ndarray, labels: np.ndarray, palette, alpha: float = 0.5, skip_background: bool = False
) -> np.ndarray:
    """(H, W, 3) uint8 blend: (1 - alpha) * image + alpha * colour(labels).

    image: (H, W, 3) uint8; labels: (H, W) class ids; palette: (R, G, B) rows, the VOC colour
    map beyond them. skip_background leaves class-0 pixels as they are, so objects stand out.
    """
    n = max(256, int(labels.max(initial=0)) + 1)
    colours = np.asarray(palette_bytes(palette, n), dtype=np.float32).reshape(-1, 3)
    a = np.where(labels[..., None] > 0, alpha, 0.0) if skip_background else alpha
    blend = (1 - a) * image.astype(np.float32) + a * colours[labels]
    return np.clip(blend + 0.5, 0, 255).astype(np.uint8)


def _segment(args) -> int:
    from PIL import Image

    from .. import Segmenter

    if not 0 <= args.alpha <= 1:
        raise InputError(f"--alpha must be between 0 and 1; got {args.alpha}")
    ckpt = Path(args.checkpoint)
    if not ckpt.exists():
        raise FileNotFoundError(f"{ckpt}: no such checkpoint")
    files = collect_images(args.inputs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        seg = Segmenter(str(ckpt), arch=args.arch, device=args.device, backend=args.backend,
                        precision=args.precision)
    except (ValueError, TypeError) as e:
        if isinstance(e, FastFCNError):
            raise
        # A bad --backend / --precision / --device: the Segmenter's message, as a one-line CLI error.
        raise InputError(str(e)) from None
    palette = seg.palette
    bar = Progress(len(files), enabled=not args.quiet)
    t0 = time.perf_counter()
    for f, name in zip(files, _out_names(files)):
        image = read_image(f)
        labels = seg.run(image)
        labels = labels.cpu().numpy()
        save_labels(labels, palette, out / f"{name}.png")
        Image.fromarray(overlay(image, labels, palette, args.alpha)).save(out / f"{name}_overlay.png")
        bar.step(f.name)
    dt = time.perf_counter() - t0
    print(f"segmented {len(files)} image{'s' * (len(files) != 1)} with {seg.backend} on {seg.device} "
          f"({seg.precision}) in {dt:.1f} s -> {out}", file=sys.stderr)
    return 0
