"""fastfcn.Segmenter: images in, label maps (or logits, or probabilities) out."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from ..errors import BackendUnavailableError, CheckpointError, InputError
from ..kernels.reference import OUTPUTS
from ..models import SegmentationModel, available
from .backends import ONNX_BACKENDS, PRECISIONS, Backend, available_backends, create_backend
from .preprocess import Parsed, Preprocessor, check_finite, parse_batch

DEFAULT_MAX_PIXELS = 4096 * 4096


def _resolve_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
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


def _resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected 'auto' or one of {list(PRECISIONS)}")
    return precision


class _Graph:
    """One captured CUDA graph: preprocessing + forward for one (kind, N, H, W, output),
    with its static input, pinned host staging buffer and static output."""

    def __init__(self, seg: Segmenter, kind: str, shape: tuple, dtype: torch.dtype, output: str, pool):
        dev = seg.device
        self.static_in = torch.zeros(shape, dtype=dtype, device=dev)
        self.pinned = torch.empty(shape, dtype=dtype, pin_memory=True)
        self.copied = torch.cuda.Event()
        self.copied.record(seg._stream)
        side = torch.cuda.Stream(dev)
        side.wait_stream(seg._stream)
        with torch.cuda.stream(side), torch.inference_mode():
            # Warm-up outside the capture: cuDNN autotuning (benchmark mode) and lazy inits.
            for _ in range(2):
                seg._compute(self.static_in, kind, output)
        seg._stream.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph, pool=pool, stream=side):
            self.static_out = seg._finish(seg._compute(self.static_in, kind, output))


class Segmenter:
    """Semantic segmentation with a fastfcn model.

    Segmenter(checkpoint, *, arch=None, device="auto", backend="auto", precision="auto",
              max_pixels=4096*4096, graph_cache=8, check_finite=True, num_threads=None)

    checkpoint: a path fastfcn.load reads (``arch=`` as there), a ``.onnx`` file exported by
        fastfcn (runs with backend "onnxruntime", which "auto" picks, or "openvino"), or a model from
        fastfcn.models (copied; the original is not changed).
    device: "auto" (CUDA when present, else CPU; the CPU for backend "openvino"), "cpu", "cuda",
        "cuda:N" or a torch.device.
    backend: "auto" (= "fused"; "onnxruntime" for a .onnx file), "fused", "torch", "compile",
        "onnxruntime", "openvino" (see fastfcn.runtime.backends).
    precision: "auto" (bf16 on GPUs that support it, else fp32), "fp32", "tf32" (CUDA only),
        "bf16", "fp16".
    max_pixels: the largest H * W accepted per image (larger ones raise InputError).
    graph_cache: how many CUDA graphs (one per batch size, H, W, input kind and output) are
        kept, least recently used dropped first; 0 disables graphs. CUDA + backend "fused" only.
    check_finite: refuse float input containing NaN/Inf (costs one device->host sync per
        float batch on CUDA; uint8 input needs no check).
    num_threads: if given, torch.set_num_threads(num_threads) (process-wide).

    run(batch, output="labels") returns torch tensors on ``self.device``:
      labels (N, H, W) uint8 class ids (int32 above 256 classes); logits / probs
      (N, C, H, W) float32. One (H, W, 3) image gives one unbatched result ((H, W) or
      (C, H, W)); a list gives a list. On CUDA the results are produced asynchronously
      on the caller's current stream (no host sync); ``.cpu()`` waits for them.
    """

    def __init__(
        self,
        checkpoint,
        *,
        arch: str | None = None,
        device="auto",
        backend: str = "auto",
        precision: str = "auto",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        graph_cache: int = 8,
        check_finite: bool = True,
        num_threads: int | None = None,
    ):
        if arch is not None and arch not in available():
            raise CheckpointError(f"unknown arch {arch!r}; expected one of {available()}")
        if not isinstance(backend, str) or (backend != "auto" and backend not in available_backends()):
            raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {available_backends()}")
        if not isinstance(precision, str) or (precision != "auto" and precision not in PRECISIONS):
            raise ValueError(f"unknown precision {precision!r}; expected 'auto' or one of {list(PRECISIONS)}")
        if not isinstance(max_pixels, int) or max_pixels < 1:
            raise ValueError(f"max_pixels must be a positive int; got {max_pixels!r}")
        if not isinstance(graph_cache, int) or graph_cache < 0:
            raise ValueError(f"graph_cache must be an int >= 0; got {graph_cache!r}")
        if num_threads is not None:
            torch.set_num_threads(int(num_threads))
        # OpenVINO runs on the CPU only: "auto" means the CPU for it, even where CUDA is present.
        cpu_only = backend == "openvino" and (device is None or device == "auto")
        self._device = _resolve_device("cpu" if cpu_only else device)
        self._precision = _resolve_precision(precision, self._device)
        self.max_pixels = max_pixels
        self.check_finite = check_finite

        source, config = self._load(checkpoint, arch, backend)
        if backend == "auto":
            backend = "onnxruntime" if not isinstance(source, nn.Module) else "fused"
        elif not isinstance(source, nn.Module) and backend not in ONNX_BACKENDS:
            raise BackendUnavailableError(
                f"a .onnx file runs only with backend {' or '.join(map(repr, ONNX_BACKENDS))} (or 'auto'); "
                f"got backend {backend!r}. Load the checkpoint (.safetensors/.pt) to use the other backends."
            )
        self._backend_name = backend
        if backend == "onnxruntime" and precision == "auto":
            # ORT has no bf16 path: "auto" there is the precision the graph was exported at.
            self._backend: Backend = create_backend(backend, source, self._device, "auto")
            self._precision = getattr(self._backend, "precision", "fp32")
        else:
            self._backend = create_backend(backend, source, self._device, self._precision)
        if config is None:
            config = getattr(self._backend, "config", None)
        if not isinstance(config, dict):
            raise CheckpointError(
                f"{checkpoint!r} carries no fastfcn config (mean, std, colour order, classes); "
                "export it with fastfcn.export_onnx"
            )
        self._config = dict(config)
        in_dtype = getattr(self._backend, "input_dtype", torch.float32)
        self._pre = Preprocessor(self._config, self._device, in_dtype)
        self._in_dtype = in_dtype

        self._lock = threading.Lock()
        self._graph_cache = graph_cache
        self._graphs: OrderedDict = OrderedDict()
        cuda = self._device.type == "cuda"
        self._use_graphs = cuda and graph_cache > 0 and getattr(self._backend, "graph_safe", False)
        self._stream = torch.cuda.Stream(self._device) if cuda else None
        self._pool = torch.cuda.graph_pool_handle() if self._use_graphs else None
        # GPU work (flag toggling, graph replay) is serialised; on CPU, eager torch is reentrant.
        self._serial = cuda or not getattr(self._backend, "thread_safe", True)

    # ------------------------------------------------------------------ loading
    def _load(self, checkpoint, arch, backend):
        if isinstance(checkpoint, nn.Module):
            if not isinstance(checkpoint, SegmentationModel):
                raise TypeError(
                    f"checkpoint module must be a model from fastfcn.models; got {type(checkpoint).__name__}"
                )
            return checkpoint, checkpoint.config
        if not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError(
                "checkpoint must be a path (.safetensors, .pt, .onnx) or a fastfcn.models module; "
                f"got {type(checkpoint).__name__}"
            )
        path = Path(checkpoint)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
        if path.suffix.lower() == ".onnx":
            if backend != "auto" and backend not in ONNX_BACKENDS:
                raise BackendUnavailableError(
                    f"a .onnx file runs only with backend {' or '.join(map(repr, ONNX_BACKENDS))} "
                    f"(or 'auto'); got backend {backend!r}"
                )
            from ..export import read_onnx_metadata

            # Raises CheckpointError for a file that is not ONNX or carries no fastfcn metadata.
            config = read_onnx_metadata(path)
            config.pop("export", None)
            return str(path), config
        try:
            from ..checkpoint import load
        except ImportError as e:
            raise CheckpointError(f"checkpoint loading is not available: {e}") from None
        model = load(str(path), arch=arch) if arch is not None else load(str(path))
        return model, model.config

    # --------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def backend(self) -> str:
        return self._backend_name

    @property
    def precision(self) -> str:
        return self._precision

    @property
    def config(self) -> dict:
        return dict(self._config)

    @property
    def class_names(self) -> list[str]:
        return list(self._config.get("class_names", []))

    @property
    def palette(self) -> list[list[int]]:
        return [list(c) for c in self._config.get("palette", [])]

    def __repr__(self) -> str:
        arch = self._config.get("arch", "?")
        return (
            f"Segmenter(arch={arch!r}, device={str(self._device)!r}, backend={self.backend!r}, "
            f"precision={self.precision!r})"
        )

    # ---------------------------------------------------------------------- run
    def run(self, batch, output: str = "labels"):
        """Segment ``batch``.

        batch: (H, W, 3) uint8 RGB image | (N, H, W, 3) uint8 | list of (H, W, 3) uint8
        images (sizes may differ) | preprocessed float (N, 3, H, W). numpy or torch.
        output: "labels" -> (N, H, W) uint8 ids; "logits" / "probs" -> (N, C, H, W) float32.
        Returns a tensor on self.device ((H, W) / (C, H, W) for one image; a list for a list).
        """
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}; got {output!r}")
        p: Parsed = parse_batch(batch)
        if p.form == "list":
            groups: dict[tuple[int, int], list[int]] = {}
            for i, t in enumerate(p.tensors):
                groups.setdefault((t.shape[1], t.shape[2]), []).append(i)
            results: list = [None] * len(p.tensors)
            for idx in groups.values():
                t = p.tensors[idx[0]] if len(idx) == 1 else torch.cat([p.tensors[i] for i in idx])
                out = self._run(t, "u8", output)
                for j, i in enumerate(idx):
                    results[i] = out[j]
            return results
        out = self._run(p.tensors[0], "float" if p.form == "float" else "u8", output)
        return out[0] if p.form == "image" else out

    def __call__(self, batch, output: str = "labels"):
        return self.run(batch, output)

    def _check_size(self, h: int, w: int) -> None:
        if h * w > self.max_pixels:
            raise InputError(
                f"image size {h}x{w} = {h * w} pixels exceeds max_pixels={self.max_pixels}; "
                "resize or tile the image, or raise max_pixels"
            )

    def _run(self, t: torch.Tensor, kind: str, output: str) -> torch.Tensor:
        """t: uint8 (N, H, W, 3) (kind "u8") or float (N, 3, H, W) (kind "float"), any device."""
        h, w = (t.shape[1], t.shape[2]) if kind == "u8" else (t.shape[2], t.shape[3])
        self._check_size(h, w)
        if kind == "float" or self._device.type == "cpu":
            t = t.to(self._device)
        if kind == "float" and self.check_finite:
            check_finite(t)
        if self._device.type == "cuda":
            with self._lock:
                return self._run_cuda(t, kind, output)
        with self._lock if self._serial else nullcontext(), torch.inference_mode():
            return self._finish(self._compute(t, kind, output))

    def _compute(self, t: torch.Tensor, kind: str, output: str) -> torch.Tensor:
        """Preprocess (uint8) and run the backend; t already on the device (or CPU for CPU)."""
        x = self._pre(t) if kind == "u8" else t
        with self._precision_flags():
            return self._backend(x, output)

    @staticmethod
    def _finish(out: torch.Tensor) -> torch.Tensor:
        return out.float() if out.is_floating_point() and out.dtype != torch.float32 else out

    @contextmanager
    def _precision_flags(self):
        # fp32 means fp32 on CUDA: torch lets cuDNN use TF32 by default, so the flags are
        # set for the call (under the lock) and restored afterwards.
        if self._device.type != "cuda":
            yield
            return
        tf32 = self._precision == "tf32"
        old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old

    # --------------------------------------------------------------------- CUDA
    def _run_cuda(self, t: torch.Tensor, kind: str, output: str) -> torch.Tensor:
        caller = torch.cuda.current_stream(self._device)
        stream = self._stream
        stream.wait_stream(caller)  # device input may have been produced on the caller's stream
        try:
            with torch.cuda.stream(stream), torch.inference_mode():
                out = self._run_split(t, kind, output)
        finally:
            caller.wait_stream(stream)
        out.record_stream(caller)
        return out

    def _run_split(self, t: torch.Tensor, kind: str, output: str) -> torch.Tensor:
        """Run on self._stream; on CUDA out-of-memory, halve the batch and retry."""
        try:
            if self._use_graphs:
                return self._replay(t, kind, output)
            x = t.to(self._device, non_blocking=False)
            return self._finish(self._compute(x, kind, output))
        except torch.cuda.OutOfMemoryError:
            self._graphs.clear()
            torch.cuda.empty_cache()
            n = t.shape[0]
            if n == 1:
                shape = tuple(t.shape)
                raise InputError(
                    f"one image of shape {shape} does not fit in the memory of {self._device} "
                    f"with backend {self.backend!r} at {self.precision}; use smaller images or set max_pixels"
                ) from None
            half = n // 2
            a = self._run_split(t[:half], kind, output)
            b = self._run_split(t[half:], kind, output)
            return torch.cat([a, b])

    def _replay(self, t: torch.Tensor, kind: str, output: str) -> torch.Tensor:
        dtype = torch.uint8 if kind == "u8" else self._in_dtype
        key = (kind, tuple(t.shape), output)
        g = self._graphs.get(key)
        if g is None:
            while len(self._graphs) >= self._graph_cache:
                self._graphs.popitem(last=False)
            g = _Graph(self, kind, tuple(t.shape), dtype, output, self._pool)
            self._graphs[key] = g
        else:
            self._graphs.move_to_end(key)
        if t.device.type == "cpu":
            # Pinned staging: wait only for this buffer's previous upload, then copy asynchronously.
            g.copied.synchronize()
            g.pinned.copy_(t)
            g.static_in.copy_(g.pinned, non_blocking=True)
            g.copied.record(self._stream)
        else:
            g.static_in.copy_(t)
        g.graph.replay()
        return g.static_out.clone()
