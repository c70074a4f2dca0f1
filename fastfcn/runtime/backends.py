"""Backends: one interface, one registry (docs/design.md, idea 6).

A backend is built from a model (or, for onnxruntime and openvino, an ``.onnx`` path) for
one device and precision, and answers

    backend(x, output) -> torch.Tensor on the device

with ``x``: preprocessed float ``(N, 3, H, W)`` on the device and ``output``
one of "logits" (N, C, H, W), "probs" (N, C, H, W) or "labels" (N, H, W)
(uint8 when C <= 256, else int32). Floating results may be in the compute
dtype; the Segmenter converts them to float32.

Each is an entry of the registry (fastfcn.runtime.registry: devices, precisions, agreement
tolerance, packages it needs); ``register_backend`` adds more. The built-in ones:

- ``torch``: the reference model in eager PyTorch at the requested precision;
  nothing folded, no channels_last, no CUDA graphs: the numerical spec.
- ``fused``: BatchNorm folded, the model's fused ops (Triton on CUDA, C++ on CPU),
  channels_last; on the CPU every conv step runs through the implementation timed fastest
  for its shape on this machine (prepacked oneDNN with the ReLU fused, NNPACK Winograd,
  torch's conv; ``cpu_fast``); on CUDA each backbone conv's bias + ReLU (and a block's pool)
  fused into the convolution and fc6 as a GEMM where measured faster (``cuda_fast``), cuDNN
  autotuning and CUDA graphs.
- ``compile``: ``torch.compile`` (inductor) of the reference with BatchNorm folded,
  channels_last and inductor freezing.
- ``onnxruntime``: ``fastfcn.runtime.ort.OnnxRuntimeBackend`` (imported when built).
- ``openvino``: ``fastfcn.runtime.openvino.OpenVinoBackend`` (imported when built): the exported
  graph in OpenVINO's CPU plugin at fp32 ("f32" hint) or bf16 (native-bf16 CPUs only).

A backend that cannot run raises BackendUnavailableError saying why.

On CUDA every backend runs with cuDNN's autotuning on (``cudnn.benchmark``, set once when
the first CUDA backend is built): a flag that only the fused backend set made torch
baselines measured before and after building it differ.
"""

from __future__ import annotations

import copy
import itertools
import shutil
import threading
import types

import torch
from torch import nn

from ..errors import BackendUnavailableError
from ..models import SegmentationModel, fold_batchnorm
from .registry import (  # noqa: F401 - the registry's public names, importable from here as before
    BackendSpec,
    Tolerance,
    available_backends,
    backend_spec,
    can_run,
    onnx_backends,
    register_backend,
)

PRECISIONS = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision_name(precision, error=ValueError) -> None:
    """``precision`` must be "auto" or one of PRECISIONS; else ``error`` saying so."""
    if not isinstance(precision, str) or (precision != "auto" and precision not in PRECISIONS):
        raise error(f"unknown precision {precision!r}; expected 'auto' or one of {list(PRECISIONS)}")


class Backend:
    """The interface every backend implements.

    ``Backend(source, device, precision)``: source is a SegmentationModel (the
    backend copies what it changes) or, for backends that say so, a file path.
    Attributes: ``name``; ``device``; ``precision`` (the one it runs at);
    ``graph_safe`` (its call may be captured in a CUDA graph: no host sync, no allocation
    outside torch's caching allocator); ``thread_safe`` (it may be called from several
    threads at once); ``input_dtype`` (the dtype it wants ``x`` in; the Segmenter
    preprocesses to it); ``config`` (the model's config when the source carries one the
    Segmenter cannot read itself, e.g. an ``.onnx`` file's metadata; else None).
    """

    name = "base"
    graph_safe = False
    thread_safe = True
    config: dict | None = None

    def __init__(self, source, device: torch.device, precision: str, input_dtype: torch.dtype | None = None):
        self.device = device
        self.precision = precision
        self.input_dtype = PRECISIONS[precision] if input_dtype is None else input_dtype
        if device.type == "cuda":
            _cuda_process_settings()

    def __call__(self, x: torch.Tensor, output: str) -> torch.Tensor:
        """x: float (N, 3, H, W) on the device -> logits/probs (N, C, H, W) or labels (N, H, W)."""
        raise NotImplementedError

    def plan(self) -> list[dict]:
        """The implementations it chose per layer and input shape (see Segmenter.plan); [] if none."""
        return []


def _cuda_process_settings() -> None:
    """The one cuDNN setting shared by every CUDA backend: autotune each (layer, input shape)
    once (during the CUDA graph's warm-up for the fused backend)."""
    torch.backends.cudnn.benchmark = True


def _prepared_copy(model: SegmentationModel, device: torch.device, precision: str, fold: bool):
    """An eval-mode copy of the model on the device in the precision's dtype (BatchNorm folded if fold)."""
    if not isinstance(model, SegmentationModel):
        raise TypeError(f"expected a model from fastfcn.models; got {type(model).__name__}")
    m = copy.deepcopy(model).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    if fold:
        fold_batchnorm(m)
    return m.to(device=device, dtype=PRECISIONS[precision])


def _check_precision(device: torch.device, precision: str, backend: str) -> None:
    if precision == "tf32" and device.type != "cuda":
        raise BackendUnavailableError(
            f"precision 'tf32' is a CUDA mode (Ampere or newer); on {device.type} use 'fp32' or 'bf16'"
        )
    if precision == "tf32" and torch.cuda.get_device_capability(device)[0] < 8:
        raise BackendUnavailableError(
            f"precision 'tf32' needs an Ampere or newer GPU; {torch.cuda.get_device_name(device)} has none"
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise BackendUnavailableError(
            f"precision 'bf16' is not supported on {torch.cuda.get_device_name(device)}; use 'fp16' or 'fp32'"
        )


class TorchBackend(Backend):
    """The reference model, eager, at the requested precision (weights cast to its dtype)."""

    name = "torch"

    def __init__(self, source, device, precision):
        super().__init__(source, device, precision)
        _check_precision(device, precision, self.name)
        self.model = _prepared_copy(source, device, precision, fold=False).set_impl("reference")

    def __call__(self, x, output):
        # NCHW on purpose: a channels_last input would switch eager convs to channels_last.
        return self.model(x.to(self.input_dtype).contiguous(), output)


class FusedBackend(Backend):
    """fastfcn's fast path: folded BatchNorm, fused ops, channels_last. On the CPU every conv step
    of every family runs through the implementation measured fastest for its shape (cpu_fast:
    prepacked oneDNN + fused ReLU, NNPACK Winograd, torch's conv), at bf16 with bf16
    channels_last activations and the head's score layers and upsampling in fp32; on CUDA
    graph-capturable with cuDNN autotuning.

    FCN-8s, width 1, 500x500, one image (labels), AMD EPYC Zen 4 with AVX512-BF16, 2 threads,
    medians of 5 interleaved rounds (benchmarks/results/peers/, r2): fused fp32 0.89 s (OpenVINO
    f32 1.68, ONNX Runtime 1.71; torch 2.34 in the first run), fused bf16 0.59 s (OpenVINO bf16 0.86).

    ``plan()``: the CPU convolution choices so far (cpu_fast.ConvPlanner.plan); [] on CUDA.
    """

    name = "fused"

    def __init__(self, source, device, precision, *, planner_options: dict | None = None,
                 skip_dead_zone: bool = True):
        super().__init__(source, device, precision)
        _check_precision(device, precision, self.name)
        cpu = device.type == "cpu"
        # On the CPU the weights stay fp32: each conv step casts its own (bf16 backbone, fp32 head).
        model = _prepared_copy(source, device, "fp32" if cpu else precision, fold=True).set_impl("fused")
        # On the CPU every conv runs through a planned ConvImpl that keeps its own weights, so the
        # modules keep theirs as they are (a channels_last copy would only cost memory).
        self.model = model if cpu else model.to(memory_format=torch.channels_last)
        self.graph_safe = device.type == "cuda"
        self.planner = None
        if not cpu:
            # conv + bias + ReLU fused by cuDNN and fc6 as a split-K GEMM, where measured faster
            from .cuda_fast import install

            install(self.model)
        else:
            from .cpu_fast import plan_model
            from .memory import keep_freed_memory

            # activations reuse freed heap blocks instead of fresh pages each forward (memory.py)
            self.keeps_freed_memory = keep_freed_memory()

            self.native_bf16 = None
            if precision == "bf16":
                from .cpu_fast import native_bf16

                self.native_bf16 = native_bf16()
            self.planner = plan_model(self.model, PRECISIONS[precision], **(planner_options or {}))
        self.dead_zone = None
        if skip_dead_zone and self.model.has_dead_zone:
            # Compute only what the image reaches (runtime/deadzone.py): FCN-8s 500x500 computes
            # 125.6 of 181.5 GMAC (1.34x faster at fp32, 1.39x at bf16 on the CPU). A CUDA graph
            # keeps the cache entries its capture read (cuda_graphs.CapturedForward.held).
            from .deadzone import DeadZoneForward

            # One planner per backbone stream (late fusion's colour and HHA VGGs pad 100 each).
            # On CUDA each input shape runs both ways once (device time) and keeps the faster: on
            # an H200 the whole maps won at batch 1 (0.919 against 0.960 ms), the skip at batch 8
            # (4.67 against 5.96) and 32. On the CPU the skip is kept (1.34x at fp32, 1.39x at
            # bf16, above).
            pool = getattr(self.model, "pool_with_switches", None)
            timer = None
            if not cpu:
                from .cuda_fast import backbone_timer as timer
            runners = {name: DeadZoneForward(self.model, steps, pool_with_switches=pool, timer=timer)
                       for name, steps in self.model.backbone_streams().items()}  # fmt: skip
            self.dead_zone = runners[""] if list(runners) == [""] else runners
            self.model.backbone_runner = self.dead_zone

    def plan(self) -> list[dict]:
        return self.planner.plan() if self.planner is not None else []

    def __call__(self, x, output):
        return self.model(x.to(self.input_dtype).contiguous(memory_format=torch.channels_last), output)


def _cpp_compiler() -> str | None:
    for cc in ("g++", "c++", "clang++"):
        if shutil.which(cc):
            return cc
    return None


class CompileBackend(Backend):
    """torch.compile (inductor) of the reference model: BatchNorm folded, channels_last,
    freezing (weights become constants, convs prepacked; measured best on the CPU).
    Compiles once per input shape on first use; calls are serialised (dynamo state)."""

    name = "compile"
    thread_safe = False

    def __init__(self, source, device, precision):
        super().__init__(source, device, precision)
        _check_precision(device, precision, self.name)
        if device.type == "cpu" and _cpp_compiler() is None:
            raise BackendUnavailableError(
                "backend 'compile' needs a C++ compiler for inductor's CPU code; none of g++, c++, "
                "clang++ is on PATH"
            )
        if device.type == "cuda":
            try:
                import triton  # noqa: F401
            except ImportError as e:
                raise BackendUnavailableError(f"backend 'compile' on CUDA needs triton: {e}") from None
        model = _prepared_copy(source, device, precision, fold=True).set_impl("reference")
        self.model = model.to(memory_format=torch.channels_last)
        self._lock = threading.Lock()
        self._compiled = {}
        self._codes = []
        for output in ("logits", "labels", "probs"):
            fn = _own_code(_forward_for(self.model, output), f"fastfcn_compile_{output}_{next(_COMPILE_IDS)}")
            self._codes.append(fn.__code__)
            # dynamic=False: one specialised graph per (N, H, W); sizes are few in practice
            # (video), and dynamic shapes defeat the freezing pass's prepacking.
            self._compiled[output] = torch.compile(
                fn, backend=self.dynamo_backend, dynamic=False,
                options={"freezing": True} if self.dynamo_backend == "inductor" else None,
            )  # fmt: skip

    dynamo_backend = "inductor"

    def __call__(self, x, output):
        x = x.to(self.input_dtype).contiguous(memory_format=torch.channels_last)
        with self._lock:
            if self._compiled is None:
                raise RuntimeError("this compile backend was closed")
            try:
                return self._compiled[output](x)
            except (RuntimeError, OSError, AssertionError) as e:
                if "OutOfMemory" in type(e).__name__:
                    raise
                raise BackendUnavailableError(
                    f"backend 'compile' could not compile the model for input {tuple(x.shape)}: "
                    f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                ) from e

    def close(self) -> None:
        """Drop the compiled graphs (and inductor's frozen copies of the weights) now."""
        with self._lock:
            reset = getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None)
            for code in self._codes:
                if reset is not None and hasattr(reset, "reset_code"):
                    reset.reset_code(code)
            self._codes, self._compiled, self.model = [], None, None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to free
            pass


# Dynamo keeps its compiled graphs per code object and recompiles a code object at most
# cache_size_limit (8) times, then runs it eagerly without a word. A function defined once and
# compiled by every backend shares one code object: the ninth (backend, output, shape) ran
# eager, and the cache kept every backend's frozen weights alive. Each compiled function
# therefore gets a code object of its own, dropped with its backend.
_COMPILE_IDS = itertools.count()


def _forward_for(model: nn.Module, output: str):
    def forward(x):
        return model(x, output)

    return forward


def _own_code(fn, name: str):
    """A copy of fn with a fresh code object named ``name`` (same closure and globals)."""
    names = {"co_name": name}
    if hasattr(fn.__code__, "co_qualname"):  # Python >= 3.11
        names["co_qualname"] = name
    code = fn.__code__.replace(**names)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def create_backend(name: str, source, device: torch.device, precision: str, **options) -> Backend:
    """Build backend ``name`` from its registry entry; ``options`` are that backend's keyword
    options (e.g. the fused backend's ``skip_dead_zone``)."""
    spec = backend_spec(name)
    check_precision_name(precision)
    if precision == "auto" and name != "onnxruntime":  # ORT's "auto": the graph's own precision
        raise ValueError(f"backend {name!r} needs a resolved precision; got 'auto' (resolve_precision)")
    if device.type not in spec.devices:
        raise BackendUnavailableError(
            f"backend {name!r} runs on {' and '.join(spec.devices)} only; got device {device}"
        )
    offered = spec.precisions[device.type]
    if precision != "auto" and precision not in offered:
        listed = " or ".join(offered) if len(offered) < 3 else ", ".join(offered[:-1]) + " or " + offered[-1]
        raise BackendUnavailableError(
            f"backend {name!r} runs at precision {listed} on {device.type}; got {precision!r}"
            + (" (a CUDA mode: Ampere or newer GPUs)" if precision == "tf32" else "")
        )
    try:
        backend = spec.build(source, device, precision, **options)
    except ImportError as e:
        why = spec.can_run(device.type)[1] or f"backend {name!r} is not available"
        raise BackendUnavailableError(f"{why} ({e})") from None
    if not isinstance(backend, Backend):
        raise TypeError(f"backend {name!r}: its factory returned a {type(backend).__name__}, not a "
                        "fastfcn.runtime.Backend; subclass Backend")
    return backend
