"""The ``openvino`` backend: the exported reference graph run by OpenVINO's CPU plugin.

    backend = OpenVinoBackend(model_or_onnx_path, device="cpu", precision="fp32")
    labels = backend(x, output="labels")       # x: float (N, 3, H, W), preprocessed, on the CPU

The graph is fastfcn's dynamic ONNX export (N, H and W symbolic). DeconvNet's unpooling is
a ScatterND there, which OpenVINO imports; an ONNX MaxUnpool would not be (no conversion
rule in OpenVINO 2026.4).

Precision is OpenVINO's ``INFERENCE_PRECISION_HINT`` on an fp32 graph: "fp32" sets "f32"
(the plugin otherwise picks bf16 by itself on CPUs with AVX512-BF16 or AMX, docs/facts.md, "Measured anchors":
0.7% relative logit error, 98.4-98.8% label agreement on FCN-8s); "bf16" sets "bf16" and
is refused on a CPU whose plugin does not report native BF16 (``OPTIMIZATION_CAPABILITIES``),
where OpenVINO would otherwise run f32 silently and a benchmark would mislabel it.

Threads: ``INFERENCE_NUM_THREADS`` is torch's thread count when the backend is built (the
Segmenter's ``num_threads``), so every backend is compared at the same count. Calls from
several threads are safe: each thread gets its own infer request from the one compiled
model (OpenVINO's compiled models are thread-safe; a request is not).
"""

from __future__ import annotations

import threading

import torch

from ..errors import BackendUnavailableError
from ..kernels.structure import check_output
from ..models.multihead import finish
from .backends import Backend
from .onnx_source import OnnxSource, check_graph_input, check_graph_output, check_static_dims

PRECISIONS = ("fp32", "bf16")
_HINTS = {"fp32": "f32", "bf16": "bf16"}


def _ov():
    try:
        import openvino
    except ImportError as e:
        raise BackendUnavailableError(
            f"the openvino backend needs the openvino package ({e}); install it with "
            "`pip install openvino` or `pip install fastfcn[openvino]`"
        ) from None
    return openvino


def native_bf16(core) -> bool:
    """Whether OpenVINO's CPU plugin reports native bf16 here (AVX512-BF16 or AMX)."""
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _reason(e: Exception) -> str:
    """An OpenVINO error as one line: its message is a C++ trace ("Exception from
    src/inference/src/cpp/core.cpp:84:", "Check 'false' failed at ...") with the reason in the
    lines after it ("-- No conversion rule found for operations: NoSuchOp-18")."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Exception from ", "Check '"))]
    text = " ".join(useful or lines) or type(e).__name__
    return text if len(text) <= 400 else text[:400] + "..."


class OpenVinoBackend(Backend):
    """An exported fastfcn graph compiled by OpenVINO for the CPU.

    source: a fastfcn nn.Module (exported once at fp32 to a temporary .onnx owned by this
    instance) or the path of an .onnx file exported by fastfcn at fp32. device: "cpu".
    precision: "fp32" | "bf16" (see the module docstring). ``__call__`` is thread-safe.
    """

    name = "openvino"
    graph_safe = False
    thread_safe = True

    def __init__(self, source, device: str | torch.device = "cpu", precision: str = "fp32"):
        ov = _ov()
        device = torch.device(device)
        if device.type != "cpu":
            raise BackendUnavailableError(
                f"backend 'openvino' runs on the CPU only; got device {device}. Use device='cpu'"
            )
        if precision not in PRECISIONS:
            raise BackendUnavailableError(
                f"backend 'openvino' runs at precision {' or '.join(PRECISIONS)}; got {precision!r}"
            )
        # the graph's interface is float32; bf16 is the plugin's inner math
        super().__init__(source, device, precision, input_dtype=torch.float32)
        core = ov.Core()
        if precision == "bf16" and not native_bf16(core):
            caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
            raise BackendUnavailableError(
                f"precision 'bf16' needs a CPU with native bf16 (AVX512-BF16 or AMX); OpenVINO reports "
                f"{core.get_property('CPU', 'FULL_DEVICE_NAME')} with {list(caps)}. Use precision 'fp32'"
            )
        self._source = OnnxSource(source, "fp32", prefix="fastfcn-ov-")
        self.onnx_path, self.config = self._source.path, self._source.config
        if self._source.exported != "fp32":
            raise BackendUnavailableError(
                f"{self.onnx_path} was exported at {self._source.exported}; backend 'openvino' takes an "
                "fp32 graph (bf16 is its own inference precision): re-export it with "
                "`fastfcn export --precision fp32`"
            )
        self.num_classes = int(self.config["num_classes"])
        self.num_threads = max(1, torch.get_num_threads())
        config = {
            "INFERENCE_PRECISION_HINT": _HINTS[precision],
            "INFERENCE_NUM_THREADS": self.num_threads,
            # One stream, lowest latency per call: the Segmenter hands over whole batches.
            "PERFORMANCE_HINT": "LATENCY",
        }
        try:
            self.compiled = core.compile_model(core.read_model(str(self.onnx_path)), "CPU", config)
        except Exception as e:  # OpenVINO raises RuntimeError subclasses with long C++ traces
            raise BackendUnavailableError(
                f"openvino cannot compile {self.onnx_path} for the CPU at {precision} "
                f"({type(e).__name__}: {_reason(e)})"
            ) from None
        self.ov_version = ov.__version__ if hasattr(ov, "__version__") else ov.get_version()
        # A static export (``export_onnx(dynamic=False)``) runs at its one shape only.
        shape = self.compiled.input(0).get_partial_shape()
        self.input_dims = tuple(d.get_length() if d.is_static else None for d in shape)
        self._local = threading.local()

    def __repr__(self) -> str:
        return (f"OpenVinoBackend({self.config.get('arch')}, precision={self.precision}, "
                f"threads={self.num_threads}, path={str(self.onnx_path)!r})")

    def _request(self):
        req = getattr(self._local, "request", None)
        if req is None:
            req = self._local.request = self.compiled.create_infer_request()
        return req

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, output: str = "logits") -> torch.Tensor:
        """x: float (N, 3, H, W) preprocessed, on the CPU.

        Returns logits or probs float32 (N, C, H, W), or labels (N, H, W) uint8 (int32 when
        C > 256).
        """
        check_output(output)
        x = check_graph_input(x, self.device, self._source.in_channels)
        check_static_dims(x, self.input_dims, self.onnx_path)
        # share_inputs: the plugin reads torch's buffer in place (x is contiguous float32).
        # share_outputs: y views the request's own output buffer, which the next call on this
        # thread overwrites; labels and probs are new tensors, logits are copied out.
        res = self._request().infer({0: x.numpy()}, share_inputs=True, share_outputs=True)
        y = torch.from_numpy(res[0])
        check_graph_output(x, y, self.num_classes, self.onnx_path)
        out = finish(y, output, self._source.heads)
        return out.clone() if output == "logits" else out


__all__ = ["OpenVinoBackend", "PRECISIONS", "native_bf16"]
