"""fastfcn.Segmenter: images in, label maps (or logits, or probabilities) out."""

from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from ..errors import BackendUnavailableError, CheckpointError, InputError
from ..imageio import from_pil, read_image
from ..kernels.reference import OUTPUTS
from ..modalities import config_inputs, input_channels
from ..models import SegmentationModel, available
from ..names import DEFAULT_MAX_PIXELS
from ..zoo import resolve
from .backends import ONNX_BACKENDS, PRECISIONS, Backend, available_backends, create_backend
from .cuda_graphs import CapturedForward, is_oom
from .modal import parse_second
from .preprocess import Parsed, Preprocessor, check_finite, parse_batch
from .tiling import check_tiling, run_tiled

# The TF32 switches are process-wide: a Segmenter at fp32 or tf32 on CUDA holds this lock while
# its forward runs with its own setting, so Segmenters of different precisions in other threads
# never see each other's. bf16 / fp16 convolutions do not read them and never take it.
_TF32_LOCK = threading.Lock()


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


def _resolve_precision(precision: str, device: torch.device, backend: str = "auto") -> str:
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        if device.type == "cpu" and backend in ("auto", "fused"):
            return _cpu_auto_precision()
        return "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected 'auto' or one of {list(PRECISIONS)}")
    return precision


def _is_pil(obj) -> bool:
    # PIL is imported only if the caller already has PIL images: no import cost otherwise.
    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(obj, pil.Image)


def _decode_one(obj, max_pixels: int | None):
    if isinstance(obj, (str, os.PathLike)):
        return read_image(obj, max_pixels)
    if _is_pil(obj):
        try:
            return from_pil(obj, max_pixels)
        except InputError as e:
            raise InputError(f"the PIL image: {e}") from None
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise InputError(f"the PIL image cannot be decoded ({type(e).__name__}: {e})") from None
    return obj


def _decode(batch, max_pixels: int | None):
    """Image paths and PIL images (alone or in a list) -> (H, W, 3) uint8 arrays; other items unchanged."""
    if isinstance(batch, (list, tuple)):
        return [_decode_one(b, max_pixels) for b in batch]
    return _decode_one(batch, max_pixels)


def _cpu_auto_precision() -> str:
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


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


class Segmenter:
    """Semantic segmentation with a fastfcn model.

    Segmenter(checkpoint, *, arch=None, device="auto", backend="auto", precision="auto",
              max_pixels=4096*4096, graph_cache=8, check_finite=True, num_threads=None,
              skip_dead_zone=True)

    checkpoint: a path fastfcn.load reads (``arch=`` as there), a built-in model's name
        (``"demo"``, see fastfcn.zoo), a ``.onnx`` file exported by
        fastfcn (runs with backend "onnxruntime", which "auto" picks, or "openvino"), or a model from
        fastfcn.models (copied; the original is not changed).
    device: "auto" (CUDA when present, else CPU; the CPU for backend "openvino"), "cpu", "cuda",
        "cuda:N" or a torch.device.
    backend: "auto" (= "fused"; "onnxruntime" for a .onnx file), "fused", "torch", "compile",
        "onnxruntime", "openvino" (see fastfcn.runtime.backends).
    precision: "auto", "fp32", "tf32" (CUDA only), "bf16", "fp16". "auto" is bf16 on GPUs that
        support it and, for the fused backend, on CPUs with native bf16 (AVX512-BF16 or AMX,
        detected here, when the Segmenter is built); fp32 otherwise. On the CPU, bf16 runs the
        convolutions in bf16 (channels_last, prepacked oneDNN with the ReLU fused) and the head's
        score layers and upsampling in fp32: on a Zen 4 it measured 1.2-1.45x faster than fp32 and
        kept 99.986% of the shipped FCN-8s's labels (mean IU unchanged: 91.99 vs 91.98); see
        _cpu_auto_precision. FASTFCN_CPU_PRECISION=fp32 pins "auto" to fp32 on the CPU.
    max_pixels: the largest H * W accepted per image (larger ones raise InputError).
    graph_cache: how many CUDA graphs (one per batch size, H, W, input kind and output) are
        kept, least recently used dropped first; 0 disables graphs. CUDA + backend "fused" only.
    check_finite: refuse float input containing NaN/Inf (costs one device->host sync per
        float batch on CUDA; uint8 input needs no check).
    num_threads: if given, an int >= 1: torch.set_num_threads(num_threads) (process-wide).
    skip_dead_zone: backend "fused" computes only the positions whose receptive field
        reaches the image (FCN-VGG, FCN-AlexNet, DeconvNet's encoder; fastfcn.runtime.deadzone),
        taking the rest from maps cached per input size; False computes everything (ablation).
        The results agree to float32 rounding either way.

    Properties: device, backend, precision, config, num_classes, class_names, palette, plan.
    plan: the convolution implementations chosen on this machine (fused backend on the CPU), per
      layer and input shape with the measured times; filled at the first run of each shape.

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
        skip_dead_zone: bool = True,
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
        if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                        or num_threads < 1):
            raise ValueError(f"num_threads must be None (torch's choice) or an int >= 1; got {num_threads!r}")
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        # OpenVINO runs on the CPU only: "auto" means the CPU for it, even where CUDA is present.
        cpu_only = backend == "openvino" and (device is None or device == "auto")
        self._device = _resolve_device("cpu" if cpu_only else device)
        self._precision = _resolve_precision(precision, self._device, backend)
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
            options = {"skip_dead_zone": bool(skip_dead_zone)} if backend == "fused" else {}
            self._backend = create_backend(backend, source, self._device, self._precision, **options)
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
        self._inputs = config_inputs(self._config)
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
        path = Path(resolve(checkpoint))
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
        # The Path, not str(path): "./demo" would print as "demo", a built-in name.
        model = load(path, arch=arch) if arch is not None else load(path)
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
    def num_classes(self) -> int:
        """C: the number of classes (channels of logits / probs; labels are 0..C-1)."""
        return int(self._config["num_classes"])

    @property
    def plan(self) -> list[dict]:
        """The convolution implementations the backend chose, one dict per (layer, input shape):
        layer, input, input_dtype, compute_dtype, chosen, source ("measured" or "cache") and
        times_ms per candidate. Filled at the first run of each input shape (fused backend on the
        CPU: see fastfcn.runtime.cpu_fast); [] for backends that do not choose.
        ``fastfcn.runtime.cpu_fast.format_plan(seg.plan)`` gives it as text."""
        plan = getattr(self._backend, "plan", None)
        return plan() if callable(plan) else []

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
    def run(self, batch, output: str = "labels", *, preprocessed: bool = False, tile=None,
            overlap: int | None = None, depth=None, hha=None):
        """Segment ``batch``.

        batch: (H, W, 3) uint8 RGB image | (N, H, W, 3) uint8 | an image file path (str or
        os.PathLike) | a PIL image of any mode | a list of any of these (sizes may differ) |
        float (N, 3, H, W) already preprocessed for the model, with ``preprocessed=True``.
        numpy or torch. Files and PIL images are decoded as fastfcn.imageio.read_image does
        (EXIF orientation applied; greyscale, 16-bit, palette, alpha modes converted to RGB); a
        path that does not exist or is not an image raises InputError naming it. Float input
        without ``preprocessed=True`` is range-checked: one that looks like an image in [0, 1]
        or [0, 255] raises InputError.
        output: "labels" -> (N, H, W) uint8 ids; "logits" / "probs" -> (N, C, H, W) float32.
        tile: (h, w) (or one int): segment each image in overlapping tiles of that size
        (fastfcn.runtime.tiling), for images over ``max_pixels`` (which then applies per tile)
        or to bound memory; overlap: pixels shared by neighbouring tiles (< the tile's sides;
        None: 64, at most half the tile's smaller side).
        depth / hha: the second input of the two-modality nets (``inputs`` of the config):
        ``run(images, depth=depth_maps)`` for nyud-fcn32s-color-d (depth in millimetres, (H, W)
        per image, (N, H, W) for a batch, or 16-bit PNG paths), ``run(images, hha=hha_images)``
        for nyud-fcn32s-color-hha (HHA images as the colour ones); in the form of ``batch``, each
        of its image's size (fastfcn.runtime.modal). Tiling splits both alike. A model that
        takes one input refuses them; with ``preprocessed=True`` the float batch already holds
        every modality's channels.
        Returns a tensor on self.device ((H, W) / (C, H, W) for one image; a list for a list).
        """
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}; got {output!r}")
        second = self._second_input(depth, hha, preprocessed)
        run = self._run
        if tile is None and overlap is not None:
            raise InputError(f"overlap={overlap!r} is for tiled runs; pass tile=(h, w) too")
        if tile is not None:
            tile, overlap = check_tiling(tile, overlap)
            run = lambda t, kind, out: self._run_tiles(t, kind, out, tile, overlap)  # noqa: E731
        # Tiled, an image file may exceed max_pixels (the limit is per tile); Pillow's own
        # decompression-bomb limit (179 M pixels) still holds.
        max_pixels = None if tile is not None else self.max_pixels
        batch = _decode(batch, max_pixels)
        p: Parsed = parse_batch(batch, preprocessed, input_channels(self._inputs))
        seconds = None
        if second is not None:
            if p.form == "float":
                raise InputError(
                    f"a float batch is preprocessed input, all {input_channels(self._inputs)} channels "
                    f"({' + '.join(self._inputs)}): pass it with preprocessed=True and no "
                    f"{self._inputs[1]}=, or pass uint8 images with {self._inputs[1]}="
                )
            seconds = parse_second(second, self._inputs[1], p, max_pixels)
            # Both modalities become one preprocessed float batch: one input tensor for every backend.
            run = self._two_input_runner(run, check_size=tile is None)
        if p.form == "list":
            groups: dict[tuple[int, int], list[int]] = {}
            for i, t in enumerate(p.tensors):
                groups.setdefault((t.shape[1], t.shape[2]), []).append(i)
            results: list = [None] * len(p.tensors)
            for idx in groups.values():
                t = _cat([p.tensors[i] for i in idx])
                t = t if seconds is None else (t, _cat([seconds[i] for i in idx]))
                out = run(t, "u8", output)
                for j, i in enumerate(idx):
                    results[i] = out[j]
            return results
        t = p.tensors[0] if seconds is None else (p.tensors[0], seconds[0])
        out = run(t, "float" if p.form == "float" else "u8", output)
        return out[0] if p.form == "image" else out

    def __call__(self, batch, output: str = "labels", *, preprocessed: bool = False, tile=None,
                 overlap: int | None = None, depth=None, hha=None):
        return self.run(batch, output, preprocessed=preprocessed, tile=tile, overlap=overlap, depth=depth,
                        hha=hha)  # fmt: skip

    def _second_input(self, depth, hha, preprocessed: bool):
        """The second modality given to run, checked against the model's inputs (or None)."""
        given = {k: v for k, v in (("depth", depth), ("hha", hha)) if v is not None}
        arch = self._config.get("arch", "this model")
        if len(self._inputs) == 1:
            if given:
                raise InputError(
                    f"{arch} takes one input ({self._inputs[0]} images); {'/'.join(given)}= is for the "
                    "two-modality nets (nyud-fcn32s-color-d: depth=, nyud-fcn32s-color-hha: hha=)"
                )
            return None
        want = self._inputs[1]
        if preprocessed:
            if given:
                raise InputError(
                    f"with preprocessed=True the float batch holds every modality of {arch} "
                    f"({' + '.join(self._inputs)}, {input_channels(self._inputs)} channels); drop "
                    f"{'/'.join(given)}="
                )
            return None
        if want not in given:
            other = f" (got {'/'.join(given)}=)" if given else ""
            example = f"{want}={want}_maps" if want == "depth" else f"{want}={want}_images"
            raise InputError(f"{arch} takes a second input, {want}: run(images, {example}){other}")
        if len(given) > 1:
            raise InputError(f"{arch} takes {want}= only; got {', '.join(k + '=' for k in given)}")
        return given[want]

    def _two_input_runner(self, run, check_size: bool):
        """run(t, kind, output) taking t = (images uint8 (N, H, W, 3), second (N, H, W[, 3])):
        both preprocessed on the device into one float (N, C, H, W), then ``run`` of kind
        "float" (tiled runs split that one tensor; untiled ones check max_pixels first)."""

        def two(t, kind, output):
            u8, sec = t
            if check_size:
                self._check_size(u8.shape[1], u8.shape[2])
            with torch.inference_mode():
                x = self._pre(u8.to(self._device), sec.to(self._device))
            return run(x, "float", output)

        return two

    def _run_tiles(self, t: torch.Tensor, kind: str, output: str, tile, overlap) -> torch.Tensor:
        """Each image of ``t`` (as for _run) in tiles; results stacked to (N, ...)."""
        if t.shape[0] == 1:  # no stacking copy (100 MB of labels at 10,000 x 10,000)
            return run_tiled(self._run, t, kind, output, tile, overlap).unsqueeze(0)
        return torch.stack([run_tiled(self._run, t[i:i + 1], kind, output, tile, overlap)
                            for i in range(t.shape[0])])

    def stream(self, frames, *, batch_size: int = 8, output: str = "labels", max_delay=None, queue_size=None):
        """Segment an iterable of frames: an iterator with one CPU tensor per frame, in order,
        each equal to ``run(frame, output).cpu()``. frames: (H, W, 3) uint8 RGB (numpy, torch,
        PIL) or PyAV VideoFrames, sizes may change. Batches of up to ``batch_size``; a partial
        batch is pushed after ``max_delay`` seconds; at most ``queue_size`` (default 2) batches
        wait between stages. See fastfcn.runtime.stream. Models of two inputs (NYUDv2 fusion)
        are refused: a frame carries one image; use run(images, depth=... / hha=...)."""
        if len(self._inputs) > 1:
            raise InputError(
                f"{self._config.get('arch')} takes two inputs ({' + '.join(self._inputs)}); stream() and "
                f"video take one image per frame: use run(images, {self._inputs[1]}=...)"
            )
        from .stream import stream

        return stream(self, frames, batch_size=batch_size, output=output, max_delay=max_delay,
                      queue_size=queue_size)  # fmt: skip

    def _check_size(self, h: int, w: int) -> None:
        if h * w > self.max_pixels:
            raise InputError(
                f"image size {h}x{w} = {h * w} pixels exceeds max_pixels={self.max_pixels}; "
                "resize the image, segment it in tiles (run(..., tile=(h, w))) or raise max_pixels"
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
        # fp32 means fp32 on CUDA: torch lets cuDNN use TF32 by default. The precision is fixed
        # per Segmenter; the flags are written only when they differ from it (with CUDA graphs
        # the forward runs in Python only while capturing), and only for fp32 / tf32.
        if self._device.type != "cuda" or self._precision not in ("fp32", "tf32"):
            yield
            return
        tf32 = self._precision == "tf32"
        with _TF32_LOCK:
            old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
            if old != (tf32, tf32):
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
        except RuntimeError as e:  # OutOfMemoryError, or an untyped one from a graph capture
            if not is_oom(e):
                raise
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

            def forward(static_in):
                return self._finish(self._compute(static_in, kind, output))

            g = CapturedForward(forward, tuple(t.shape), dtype, self._device, self._stream, self._pool)
            self._graphs[key] = g
        else:
            self._graphs.move_to_end(key)
        return g.run(t)
