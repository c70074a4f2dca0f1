"""What the ONNX-graph backends (onnxruntime, openvino) share: the graph file and its input.

    src = OnnxSource(model_or_path, export_precision="fp32", prefix="fastfcn-ort-")
    src.path, src.config, src.exported      # the .onnx file, its fastfcn config, "fp32" | "fp16"
    x = check_graph_input(x, device)        # float32 contiguous (N, 3, H, W) or InputError
    check_static_dims(x, dims, path)        # a static graph's fixed dims, or InputError

A model is exported once to a temporary .onnx owned by the OnnxSource (removed when it is
garbage-collected); a path is used as it is and must be an .onnx file exported by fastfcn.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch
from torch import nn

from ..config import config_inputs
from ..errors import CheckpointError, InputError
from ..modalities import input_channels
from ..models.multihead import output_heads


class OnnxSource:
    """An exported fastfcn graph on disk.

    source: a fastfcn nn.Module (exported with ``export_onnx`` at ``export_precision`` into a
    temporary folder that lives as long as this object) or the path of an .onnx file.
    Attributes: ``path`` (Path), ``config`` (the file's fastfcn metadata, ``export`` included),
    ``exported`` (the precision the graph was exported at: "fp32" or "fp16"), ``in_channels``
    and ``heads`` (models.multihead.output_heads).
    """

    def __init__(self, source, export_precision: str = "fp32", prefix: str = "fastfcn-onnx-"):
        self._tmpdir = None
        if isinstance(source, nn.Module):
            from ..export import export_onnx

            self._tmpdir = tempfile.mkdtemp(prefix=prefix)
            weakref.finalize(self, shutil.rmtree, self._tmpdir, True)
            self.path = export_onnx(source, Path(self._tmpdir) / "model.onnx", precision=export_precision)
        elif isinstance(source, (str, os.PathLike)):
            self.path = Path(source)
            if not self.path.is_file():
                raise FileNotFoundError(f"{self.path}: no such ONNX file")
        else:
            raise TypeError(f"source must be a fastfcn model or an .onnx path; got {type(source).__name__}")
        from ..export import read_onnx_metadata

        self.config = read_onnx_metadata(self.path)
        self.exported = self.config.get("export", {}).get("precision", "fp32")
        # What every call needs from the config, derived once: the input's channel count (the
        # modalities concatenated) and the heads of a two-headed net (None for one).
        self.in_channels = input_channels(config_inputs(self.config))
        self.heads = output_heads(self.config)


def check_graph_output(x: torch.Tensor, y, num_classes: int, path) -> None:
    """y must be float32 (N, num_classes, H, W) for x (N, 3, H, W). The signature is checked at
    load, but symbolic dims are only resolved at run time: a graph that is not the one its
    metadata describes shows here, not as wrong labels. Raises CheckpointError."""
    want = (x.shape[0], num_classes, x.shape[2], x.shape[3])
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != want or y.dtype != torch.float32:
        got = (tuple(y.shape), y.dtype) if isinstance(y, torch.Tensor) else type(y).__name__
        raise CheckpointError(
            f"{path}: the graph returned {got} for an input of {tuple(x.shape)}; "
            f"expected float32 {want} (N, num_classes, H, W)"
        )


def check_static_dims(x: torch.Tensor, dims, path) -> None:
    """x's shape against the graph input's ``dims`` (N, C, H, W: an int where the graph fixes it,
    None where it is symbolic), as the backend's runtime reads them: a static export
    (``export_onnx(dynamic=False)``) runs at its one shape only. Raises InputError."""
    if any(d is not None and d != n for d, n in zip(dims, x.shape)):
        shape = "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"
        raise InputError(
            f"{path} was exported with the static input shape {shape}; got {tuple(x.shape)}. "
            "Export it with dynamic shapes (the default) to run other sizes"
        )


def check_graph_input(x, device: torch.device, channels: int = 3) -> torch.Tensor:
    """x: preprocessed float (N, channels, H, W) on ``device`` -> float32 contiguous (the graph's
    interface at every precision; fp16 graphs cast inside). Raises InputError otherwise.
    channels: the model's input channels (3; NYUDv2 fusion 4 or 6)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != channels:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"input must be a float tensor (N, {channels}, H, W); got {got}")
    if not x.is_floating_point():
        raise InputError(f"input must be a preprocessed float tensor; got dtype {x.dtype}")
    if x.device != device and not (x.device.type == device.type == "cpu"):
        raise InputError(f"input is on {x.device} but this backend runs on {device}")
    if 0 in x.shape:
        raise InputError(f"input must be non-empty (N, {channels}, H, W); got {tuple(x.shape)}")
    return x.to(torch.float32).contiguous()


__all__ = ["OnnxSource", "check_graph_input", "check_graph_output", "check_static_dims"]
