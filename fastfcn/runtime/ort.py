"""The ``onnxruntime`` backend: the exported reference graph run by ONNX Runtime.

    backend = OnnxRuntimeBackend(model_or_onnx_path, device="cpu", precision="fp32")
    labels = backend(x, output="labels")       # x: float (N, 3, H, W), preprocessed, on device

CUDA provider when onnxruntime-gpu is installed and the device is CUDA: inputs and
outputs are bound to torch's own device memory (IO binding), so no tensor crosses
to the host. CPU provider otherwise: the input's memory is shared with numpy and
the output wrapped without copying.
"""

from __future__ import annotations

import json
import os

import torch

from ..errors import BackendUnavailableError
from ..kernels.structure import check_output
from ..models.multihead import finish
from .backends import Backend
from .onnx_source import OnnxSource, check_graph_input, check_graph_output, check_static_dims

# "tf32" is fp32 storage with TF32 tensor-core math (CUDA provider only); "auto" means the
# precision an .onnx file was exported at (fp32 for a model).
PRECISIONS = ("auto", "fp32", "tf32", "fp16")


def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendUnavailableError(
            f"the onnxruntime backend needs the onnxruntime package ({e}); install it with "
            "`pip install onnxruntime` (CPU) or `pip install onnxruntime-gpu` (CUDA)"
        ) from None
    return onnxruntime


def available(device: str | torch.device = "cpu", precision: str = "fp32") -> tuple[bool, str]:
    """Whether this backend can run on ``device`` at ``precision`` here, and why not.

    Returns (True, "") or (False, a sentence naming what is missing).
    """
    try:
        ort = _ort()
    except BackendUnavailableError as e:
        return False, str(e)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        return False, f"bad device {device!r} ({e})"
    if precision not in PRECISIONS:
        return False, f"precision must be one of {PRECISIONS} for onnxruntime; got {precision!r}"
    providers = ort.get_available_providers()
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in providers:
            return False, (
                f"device {device} needs onnxruntime's CUDAExecutionProvider, but this onnxruntime "
                f"{ort.__version__} offers only {providers}; install onnxruntime-gpu instead of onnxruntime"
            )
        if not torch.cuda.is_available():
            return False, f"device {device} requested but torch sees no CUDA device"
        return True, ""
    if device.type != "cpu":
        return False, f"onnxruntime serves cpu and cuda devices; got {device}"
    if precision == "tf32":
        return False, "tf32 is a CUDA tensor-core mode; on the CPU use fp32"
    return True, ""


class OnnxRuntimeBackend(Backend):
    """An exported fastfcn graph in an ONNX Runtime session.

    source: a fastfcn nn.Module (exported once to a temporary .onnx owned by this
    instance, fp16 when precision is "fp16") or the path of an .onnx file exported
    by fastfcn. device: "cpu" or a CUDA device. precision: "auto" | "fp32" | "tf32" | "fp16";
    an .onnx file runs at the precision it was exported with, and a different request
    is refused. ``__call__`` is safe from several threads (ORT sessions are).
    """

    name = "onnxruntime"
    graph_safe = False  # ORT allocates and synchronises inside Run: never inside a CUDA graph
    thread_safe = True

    def __init__(self, source, device: str | torch.device = "cpu", precision: str = "auto"):
        ort = _ort()
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
        self.device = device
        ok, why = available(self.device, precision)
        if not ok:
            raise BackendUnavailableError(why)
        want = "fp32" if precision in ("auto", "fp32", "tf32") else precision
        self._source = OnnxSource(source, want, prefix="fastfcn-ort-")
        self.onnx_path, self.config = self._source.path, self._source.config
        exported = self._source.exported
        if precision == "auto":
            precision = exported
        elif (precision == "tf32" and exported != "fp32") or (precision != "tf32" and precision != exported):
            storage = "fp32" if precision == "tf32" else precision
            raise BackendUnavailableError(
                f"{self.onnx_path} was exported at {exported} but precision {precision!r} was requested; "
                f"re-export it with `fastfcn export --precision {storage}`"
            )
        # the graph's interface is float32 at every precision
        super().__init__(source, self.device, precision, input_dtype=torch.float32)
        self.num_classes = int(self.config["num_classes"])
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = max(1, torch.get_num_threads())
        opts.log_severity_level = 3  # errors only: ORT warns about every shape it cannot infer
        if self.device.type == "cuda":
            providers = [
                ("CUDAExecutionProvider",
                 {"device_id": self.device.index, "use_tf32": int(precision == "tf32")}),
                "CPUExecutionProvider",
            ]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(self.onnx_path), sess_options=opts, providers=providers)
        except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, NotImplemented)
            raise BackendUnavailableError(
                f"onnxruntime cannot run {self.onnx_path} on {self.device} at {precision} "
                f"({type(e).__name__}: {str(e).strip()[:400]})"
            ) from None
        if self.device.type == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise BackendUnavailableError(
                f"onnxruntime could not start its CUDA provider on {self.device} (missing CUDA/cuDNN "
                f"libraries?); providers in use: {self.session.get_providers()}"
            )
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        self.output_name = self.session.get_outputs()[0].name
        # ORT reports a symbolic dim as its name (or None), a fixed one as an int.
        self.input_dims = tuple(d if isinstance(d, int) else None for d in graph_input.shape)

    def __repr__(self) -> str:
        return (f"OnnxRuntimeBackend({self.config.get('arch')}, device={self.device}, "
                f"precision={self.precision}, path={str(self.onnx_path)!r})")

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, output: str = "logits") -> torch.Tensor:
        """x: float (N, 3, H, W) preprocessed, on the backend's device.

        Returns logits or probs float32 (N, C, H, W), or labels (N, H, W) uint8 (int32 when
        C > 256), on the same device.
        """
        check_output(output)
        x = check_graph_input(x, self.device, self._source.in_channels)
        check_static_dims(x, self.input_dims, self.onnx_path)
        if self.device.type == "cuda":
            y = self._run_cuda(x)
        else:
            y = torch.from_numpy(self.session.run([self.output_name], {self.input_name: x.numpy()})[0])
        check_graph_output(x, y, self.num_classes, self.onnx_path)
        return finish(y, output, self._source.heads)

    def _run_cuda(self, x: torch.Tensor) -> torch.Tensor:
        import numpy as np

        n, _, h, w = x.shape
        y = torch.empty((n, self.num_classes, h, w), dtype=torch.float32, device=self.device)
        binding = self.session.io_binding()
        idx = self.device.index
        binding.bind_input(self.input_name, "cuda", idx, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(self.output_name, "cuda", idx, np.float32, tuple(y.shape), y.data_ptr())
        # ORT runs on its own stream: wait for torch's work producing x; Run returns after
        # ORT's stream has finished writing y (its default end-of-run synchronisation).
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        return y


def describe(path: str | os.PathLike) -> dict:
    """Inputs, outputs and opset of an .onnx file, for ``fastfcn info``."""
    import numpy as np
    import onnx

    proto = onnx.load_model(str(path), load_external_data=False)

    def shape(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    def dtype(vi):
        return onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type).lower()

    # Weights only: the graph also stores small integer constants (shape arithmetic).
    tp = onnx.TensorProto
    floats = {tp.FLOAT, tp.FLOAT16, tp.BFLOAT16, tp.DOUBLE}
    weights = sum(int(np.prod(t.dims)) for t in proto.graph.initializer if t.data_type in floats)
    return {
        "inputs": {vi.name: (dtype(vi), shape(vi)) for vi in proto.graph.input},
        "outputs": {vi.name: (dtype(vi), shape(vi)) for vi in proto.graph.output},
        "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
        "initializer_elements": weights,
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "metadata_keys": json.dumps(sorted(p.key for p in proto.metadata_props)),
    }


__all__ = ["OnnxRuntimeBackend", "available", "describe"]
