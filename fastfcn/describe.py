"""What a checkpoint file holds, as a dict: ``fastfcn info`` prints it, ``fastfcn batch``
checks a model with it before starting workers."""

from __future__ import annotations

from pathlib import Path

from .config import config_inputs
from .errors import CheckpointError
from .zoo import resolve


def _format_name(path: Path) -> str:
    s = path.suffix.lower()
    return {".safetensors": "safetensors", ".pt": "torch (.pt)", ".pth": "torch (.pth)",
            ".caffemodel": "caffemodel", ".onnx": "onnx"}.get(s, f"unknown suffix {s!r} (sniffed)")


def describe_checkpoint(path: str | Path, arch: str | None = None) -> dict:
    """What ``fastfcn info`` prints, as a dict (arch, classes, width, params, preprocessing, format)."""
    path = Path(resolve(path))
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    info: dict = {"file": str(path), "file_size": path.stat().st_size, "format": _format_name(path)}
    if path.suffix.lower() == ".onnx":
        from .export import read_onnx_metadata
        from .runtime.ort import describe

        config = read_onnx_metadata(path)
        graph = describe(path)
        export = config.pop("export", {})
        info["format"] = (f"onnx (opset {graph['opset']}, {export.get('precision', '?')}, "
                          f"{'dynamic' if export.get('dynamic') else 'static'} shapes)")
        info["params"] = graph["initializer_elements"]
        info["inputs"], info["outputs"] = graph["inputs"], graph["outputs"]
    else:
        from .checkpoint import load
        from .models import parameter_count

        model = load(path, arch=arch)
        config = dict(model.config)
        info["params"] = parameter_count(model)
    for k in ("arch", "num_classes", "width", "options", "mean", "std", "color_order", "input_scale"):
        info[k] = config.get(k)
    # The input modalities in channel order (fastfcn.modalities): ["color"] for the VOC nets.
    info["modalities"] = list(config_inputs(config))
    names = config.get("class_names") or []
    info["class_names"] = names
    from .models.multihead import output_heads

    heads = output_heads(config)  # SIFT Flow: [["semantic", 33], ["geometric", 3]]; else None
    info["heads"] = [list(h) for h in heads] if heads else None
    info["fastfcn_version"] = config.get("fastfcn_version")
    return info

