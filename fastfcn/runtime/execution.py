"""How a Segmenter runs, decided once when it is built: device, backend, precision.

``resolve_device`` and ``resolve_precision`` turn the user's "auto" into a choice;
``ExecutionPlan`` records the result together with what follows from it (the input dtype,
CUDA graphs or not, whether calls are serialised, the TF32 switches), so that nothing is
derived again per call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import BackendUnavailableError
from .backends import Backend, check_precision_name
from .registry import backend_spec, onnx_backends


def resolve_device(device, backend: str = "auto") -> torch.device:
    """device: "auto" | "cpu" | "cuda" | "cuda:N" | torch.device -> a torch.device.

    "auto" is CUDA when present and the backend (its registry entry) runs there, else the CPU.
    """
    if device is None or device == "auto":
        cuda_ok = backend == "auto" or "cuda" in backend_spec(backend).devices
        return torch.device("cuda" if cuda_ok and torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"unknown device {device!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:N' ({e})"
        ) from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"device {device!r} was asked for but this machine has no usable CUDA GPU"
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise BackendUnavailableError(
                f"device {device!r} does not exist; this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    return dev


def resolve_backend(backend: str, graph: bool) -> str:
    """"auto" -> "onnxruntime" for an exported graph (graph=True: an .onnx file), else "fused";
    a named backend must take the source (only the registry's onnx backends take a graph)."""
    if backend == "auto":
        return "onnxruntime" if graph else "fused"
    if graph and not backend_spec(backend).onnx:
        raise BackendUnavailableError(
            f"a .onnx file runs only with backend {' or '.join(map(repr, onnx_backends()))} (or 'auto'); "
            f"got backend {backend!r}. Load the checkpoint (.safetensors/.pt) to use the other backends."
        )
    return backend


def resolve_precision(precision: str, device: torch.device, backend: str = "auto") -> str:
    """"auto" -> bf16 on GPUs that support it, on the CPU for the fused backend where the CPU
    computes bf16 natively (cpu_auto_precision), fp32 otherwise; for a named backend, that
    choice only where its registry entry offers it on this device type (else fp32, else the
    first it offers). A named precision is checked."""
    if precision == "auto":
        choice = _auto_precision(device, backend)
        if backend != "auto":
            offered = backend_spec(backend).precisions.get(device.type, ())
            if offered and choice not in offered:
                choice = "fp32" if "fp32" in offered else offered[0]
        return choice
    check_precision_name(precision)
    return precision


def _auto_precision(device: torch.device, backend: str) -> str:
    # Native bf16 on this device (Ampere, sm_80, or newer): is_bf16_supported() asks about the
    # current device, not this one, and counts the emulated bf16 of a V100 or T4 (slower than
    # fp32) as support.
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return "bf16"
    if device.type == "cpu" and backend in ("auto", "fused"):
        return cpu_auto_precision()
    return "fp32"


def cpu_auto_precision() -> str:
    """bf16 where the CPU computes it natively (AVX512-BF16 / AMX), else fp32; the environment
    variable FASTFCN_CPU_PRECISION=fp32|bf16 pins the choice.

    Measured on a 2-core Zen 4 with AVX512-BF16 (shared machine, 2 threads, medians of 3
    interleaved rounds, benchmarks/cpu_fused_vs_torch.py): fused bf16 vs fused fp32, FCN-8s
    500x500 2.14 vs 3.06 s (torch fp32 5.12 s), FCN-AlexNet 500x500 1.37 vs 1.68 s; DeconvNet
    224x224 batch 2 3.6 vs 5.2 s (two runs at a similar load of ~7.5). Shipped FCN-8s on 32
    held-out scenes: 99.986% of labels equal the fp32 ones, mean IU 91.99 vs 91.98; untrained
    nets (nearly flat logits) 98.7-100% (benchmarks/cpu_bf16_agreement.py). OpenVINO also
    defaults to bf16 on such CPUs.
    """
    pinned = os.environ.get("FASTFCN_CPU_PRECISION", "").strip().lower()
    if pinned:
        if pinned not in ("fp32", "bf16"):
            raise ValueError(f"FASTFCN_CPU_PRECISION must be 'fp32' or 'bf16'; got {pinned!r}")
        return pinned
    from .cpu_fast import native_bf16

    return "bf16" if native_bf16() else "fp32"


@dataclass(frozen=True)
class ExecutionPlan:
    """How one Segmenter runs (``Segmenter.execution``).

    device: where it computes. backend: the registry name of its backend. precision: the one
    the backend runs at. input_dtype: the dtype preprocessing produces (the backend's).
    cuda_graphs: forwards are captured per (input kind, N, H, W, output) and replayed (CUDA,
    graph_cache > 0, a graph-safe backend). graph_cache: how many graphs are kept.
    serial: calls are serialised by the Segmenter's lock (CUDA, or a backend that is not
    thread-safe). tf32: the cuDNN / cuBLAS TF32 switches its forwards run with (fp32 on CUDA:
    False; tf32: True); None where they are left alone (the CPU, bf16, fp16).
    """

    device: torch.device
    backend: str
    precision: str
    input_dtype: torch.dtype
    cuda_graphs: bool
    graph_cache: int
    serial: bool
    tf32: bool | None

    @classmethod
    def of(cls, backend: Backend, name: str, graph_cache: int) -> ExecutionPlan:
        """The plan of a built backend (its device, precision and capabilities)."""
        cuda = backend.device.type == "cuda"
        precision = backend.precision
        return cls(
            device=backend.device,
            backend=name,
            precision=precision,
            input_dtype=backend.input_dtype,
            cuda_graphs=cuda and graph_cache > 0 and backend.graph_safe,
            graph_cache=graph_cache,
            # GPU work (flag toggling, graph replay) is serialised; on the CPU eager torch is reentrant.
            serial=cuda or not backend.thread_safe,
            tf32=(precision == "tf32") if cuda and precision in ("fp32", "tf32") else None,
        )
