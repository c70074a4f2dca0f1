"""fastfcn.Segmenter: images in, label maps (or logits, or probabilities) out."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from ..config import config_inputs
from ..errors import CheckpointError, InputError
from ..modalities import input_channels
from ..models import SegmentationModel, available
from ..models.multihead import head_entries, output_heads, split
from ..names import DEFAULT_MAX_PIXELS
from ..zoo import resolve
from .backends import Backend, check_precision_name, create_backend
from .cuda_graphs import CudaGraphRunner
from .dispatch import run_batch, run_postprocessed
from .execution import ExecutionPlan, resolve_backend, resolve_device, resolve_precision
from .preprocess import Preprocessor, check_finite
from .registry import available_backends

# The TF32 switches are process-wide: a Segmenter at fp32 or tf32 on CUDA holds this lock while
# its forward runs with its own setting, so Segmenters of different precisions in other threads
# never see each other's. bf16 / fp16 convolutions do not read them and never take it.
_TF32_LOCK = threading.Lock()


def _tf32_switches() -> tuple[bool, bool]:
    """(cuDNN, cuBLAS) TF32 switches. Their legacy getters raise RuntimeError (and so do torch's
    own fp32 convolutions and matmuls) in a process that set torch's fp32_precision API
    (torch >= 2.9) to something they disagree with: the new API's value is the switch then, and
    it is written back through the legacy setter, which sets both APIs alike."""
    try:
        cudnn = bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        cudnn = torch.backends.cudnn.conv.fp32_precision == "tf32"
        torch.backends.cudnn.allow_tf32 = cudnn
    try:
        cublas = bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:
        cublas = torch.backends.cuda.matmul.fp32_precision == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = cublas
    return cudnn, cublas


class Segmenter:
    """Semantic segmentation with a fastfcn model.

    Segmenter(checkpoint, *, arch=None, device="auto", backend="auto", precision="auto",
              max_pixels=4096*4096, graph_cache=8, check_finite=True, num_threads=None,
              skip_dead_zone=True, postprocess=None, crf=None)

    checkpoint: a path fastfcn.load reads (``arch=`` as there), a built-in model's name
        (``"demo"``, see fastfcn.zoo), a ``.onnx`` file exported by
        fastfcn (runs with backend "onnxruntime", which "auto" picks, or "openvino"), or a model from
        fastfcn.models (copied; the original is not changed).
    device: "auto" (CUDA when present, else CPU; the CPU for backend "openvino"), "cpu", "cuda",
        "cuda:N" or a torch.device.
    backend: "auto" (= "fused"; "onnxruntime" for a .onnx file), "fused", "torch", "compile",
        "onnxruntime", "openvino" (see fastfcn.runtime.backends).
    precision: "auto", "fp32", "tf32" (CUDA only), "bf16", "fp16". "auto" is bf16 on GPUs with
        native bf16 (Ampere or newer) and, for the fused backend, on CPUs with native bf16
        (AVX512-BF16 or AMX, detected here, when the Segmenter is built); fp32 otherwise. On the
        CPU, bf16 runs the convolutions in bf16 (channels_last, prepacked oneDNN with the ReLU
        fused) and the head's score layers and upsampling in fp32: on a Zen 4 it measured
        1.2-1.45x faster than fp32 and kept 99.986% of the shipped FCN-8s's labels (mean IU
        unchanged: 91.99 vs 91.98); see fastfcn.runtime.execution.cpu_auto_precision.
        FASTFCN_CPU_PRECISION=fp32 pins "auto" to fp32 on the CPU. A backend whose registry
        entry does not offer that choice on the device runs at fp32 (else the first it offers).
    max_pixels: the largest H * W accepted per image (larger ones raise InputError).
    graph_cache: how many CUDA graphs (one per batch size, H, W, input kind and output) are
        kept, least recently used dropped first; 0 disables graphs. CUDA + backend "fused" only.
    check_finite: refuse float input containing NaN/Inf (costs one device->host sync per
        float batch on CUDA; uint8 input needs no check).
    num_threads: if given, an int >= 1: torch.set_num_threads(num_threads) (process-wide).
    postprocess: None, or "crf": refine the probabilities with a fully connected CRF on the
        original image (fastfcn.runtime.crf; needs the extra ``pip install fastfcn[crf]``). Runs
        on the CPU, per image, after the backend; needs uint8 images (not preprocessed float).
        output "probs" are then the CRF's marginals, "logits" their log, "labels" their argmax.
    crf: the CRF's parameters with postprocess="crf": a fastfcn.runtime.crf.CRFParams, a dict
        of some of its fields, or None (DeepLab's: 10 iterations, Gaussian sxy 1 compat 3,
        bilateral sxy 67 srgb 3 compat 4).
    skip_dead_zone: backend "fused" computes only the positions whose receptive field
        reaches the image (FCN-VGG, FCN-AlexNet, DeconvNet's encoder; fastfcn.runtime.deadzone),
        taking the rest from maps cached per input size; False computes everything (ablation).
        The results agree to float32 rounding either way.

    Properties: device, backend, precision, config, num_classes, class_names, palette, plan,
    postprocess, crf.
    execution: how it runs, resolved once (fastfcn.runtime.execution.ExecutionPlan: device,
      backend, precision, input dtype, CUDA graphs, serialised calls, TF32 switches).
    plan: the convolution implementations chosen on this machine (fused backend on the CPU), per
      layer and input shape with the measured times; filled at the first run of each shape.

    run(batch, output="labels") returns torch tensors on ``self.device``:
      labels (N, H, W) uint8 class ids (int32 above 256 classes); logits / probs
      (N, C, H, W) float32. One (H, W, 3) image gives one unbatched result ((H, W) or
      (C, H, W)); a list gives a list. A net with several heads (``heads``: SIFT Flow's semantic
      and geometric) gives {head name: result} in place of each tensor, each head's result as
      above with its own C (labels: ids within that head); see models/multihead.py. On CUDA
      the results are produced asynchronously on the caller's current stream (no host sync);
      ``.cpu()`` waits for them.
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
        postprocess: str | None = None,
        crf=None,
    ):
        if arch is not None and arch not in available():
            raise CheckpointError(f"unknown arch {arch!r}; expected one of {available()}")
        if not isinstance(backend, str) or (backend != "auto" and backend not in available_backends()):
            raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {available_backends()}")
        check_precision_name(precision)
        if not isinstance(max_pixels, int) or max_pixels < 1:
            raise ValueError(f"max_pixels must be a positive int; got {max_pixels!r}")
        if not isinstance(graph_cache, int) or graph_cache < 0:
            raise ValueError(f"graph_cache must be an int >= 0; got {graph_cache!r}")
        if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                        or num_threads < 1):
            raise ValueError(f"num_threads must be None (torch's choice) or an int >= 1; got {num_threads!r}")
        from .crf import check_postprocess

        # Before the model loads: a missing pydensecrf2 or a bad parameter costs no load.
        self._crf = check_postprocess(postprocess, crf)
        self._postprocess = postprocess
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        # "auto" is the CPU for a backend whose registry entry has no CUDA (openvino).
        device = resolve_device(device, backend)
        requested = precision
        precision = resolve_precision(precision, device, backend)
        self.max_pixels = max_pixels
        self.check_finite = check_finite

        source, config = self._load(checkpoint, arch, backend)
        backend = resolve_backend(backend, graph=not isinstance(source, nn.Module))
        if backend == "onnxruntime" and requested == "auto":
            # ORT has no bf16 path: "auto" there is the precision the graph was exported at.
            precision = "auto"
        options = {"skip_dead_zone": bool(skip_dead_zone)} if backend == "fused" else {}
        self._backend: Backend = create_backend(backend, source, device, precision, **options)
        self.execution = ExecutionPlan.of(self._backend, backend, graph_cache)
        if config is None:
            config = self._backend.config
        if not isinstance(config, Mapping):
            raise CheckpointError(
                f"{checkpoint!r} carries no fastfcn config (mean, std, colour order, classes); "
                "export it with fastfcn.export_onnx"
            )
        self._config = dict(config)
        self._heads = output_heads(self._config)
        self._inputs = config_inputs(self._config)
        if self._crf is not None and self._heads is not None:
            raise ValueError(
                f"postprocess='crf' refines one class distribution per pixel; this "
                f"{self._config['arch']} has {len(self._heads)} heads. Run it without postprocess"
            )
        if self._crf is not None and len(self._inputs) > 1:
            raise ValueError(
                f"postprocess='crf' reads one colour image; this {self._config['arch']} takes "
                f"{' + '.join(self._inputs)}. Run it without postprocess"
            )
        self._pre = Preprocessor(self._config, device, self.execution.input_dtype)
        self._lock = threading.Lock()
        self._cuda = CudaGraphRunner(self._forward, self.execution) if device.type == "cuda" else None

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
            resolve_backend(backend, graph=True)  # refuses a backend that takes no graph, before reading it
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
        return self.execution.device

    @property
    def backend(self) -> str:
        return self.execution.backend

    @property
    def precision(self) -> str:
        return self.execution.precision

    @property
    def skip_dead_zone(self) -> bool:
        """Whether the forward computes only the positions the image reaches (the fused backend
        on a net with padding that reaches past the image; runtime/deadzone.py)."""
        return getattr(self._backend, "dead_zone", None) is not None

    @property
    def postprocess(self) -> str | None:
        return self._postprocess

    @property
    def crf(self):
        """The CRF's parameters (fastfcn.runtime.crf.CRFParams) with postprocess="crf", else None."""
        return self._crf

    @property
    def config(self) -> dict:
        return dict(self._config)

    @property
    def num_classes(self) -> int:
        """C: the number of classes (channels of logits / probs; labels are 0..C-1); for a net with
        several heads, all heads' together (each head's count: ``heads``)."""
        return int(self._config["num_classes"])

    @property
    def plan(self) -> list[dict]:
        """The convolution implementations the backend chose, one dict per (layer, input shape):
        layer, input, input_dtype, compute_dtype, chosen, source ("measured" or "cache") and
        times_ms per candidate; deferred_calls where a cached winner with a one-off set-up runs
        the runner-up that many calls first (see fastfcn.runtime.cpu_fast.Deferred). Filled at
        the first run of each input shape (fused backend on the CPU: see
        fastfcn.runtime.cpu_fast); [] for backends that do not choose.
        ``fastfcn.runtime.cpu_fast.format_plan(seg.plan)`` gives it as text."""
        return self._backend.plan()

    @property
    def heads(self) -> tuple[tuple[str, int], ...] | None:
        """((name, classes), ...) of a net with several heads (SIFT Flow: (("semantic", 33),
        ("geometric", 3))), whose run() returns {name: result}; None for one head."""
        return self._heads

    def head_palettes(self) -> dict:
        """{head name: its palette} for a net with several heads (``palette`` lists the heads'
        colours in order); {None: palette} for one head."""
        if self._heads is None:
            return {None: self.palette}
        return head_entries(self._config, "palette", self._heads)

    @property
    def class_names(self) -> list[str]:
        return list(self._config.get("class_names", []))

    @property
    def palette(self) -> list[list[int]]:
        return [list(c) for c in self._config.get("palette", [])]

    def __repr__(self) -> str:
        arch = self._config.get("arch", "?")
        post = f", postprocess={self._postprocess!r}" if self._postprocess else ""
        return (
            f"Segmenter(arch={arch!r}, device={str(self.device)!r}, backend={self.backend!r}, "
            f"precision={self.precision!r}{post})"
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
        depth / hha: the second input of the two-modality nets (fastfcn.config.ARCH_INPUTS):
        ``run(images, depth=depth_maps)`` for nyud-fcn32s-color-d (depth in millimetres, (H, W)
        per image, (N, H, W) for a batch, or 16-bit PNG paths), ``run(images, hha=hha_images)``
        for nyud-fcn32s-color-hha (HHA images as the colour ones); in the form of ``batch``, each
        of its image's size (fastfcn.runtime.modal). Tiling splits both alike. A model that
        takes one input refuses them; with ``preprocessed=True`` the float batch already holds
        every modality's channels.
        Returns a tensor on self.device ((H, W) / (C, H, W) for one image; a list for a list).
        """
        second = self._second_input(depth, hha, preprocessed)
        return run_batch(self, batch, output, preprocessed, tile, overlap, second)

    def split_heads(self, out: torch.Tensor, output: str, batched: bool = True):
        """A backend's result as run() returns it: unchanged for one head, {head name: result}
        for several (views of ``out``; models/multihead.split)."""
        return out if self._heads is None else split(out, output, self._heads, batched)

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

    def stream(self, frames, *, batch_size: int = 8, output: str = "labels", max_delay=None, queue_size=None):
        """Segment an iterable of frames: an iterator with one CPU tensor per frame, in order,
        each equal to ``run(frame, output).cpu()``. frames: (H, W, 3) uint8 RGB (numpy, torch,
        PIL) or PyAV VideoFrames, sizes may change. Batches of up to ``batch_size``; a partial
        batch is pushed after ``max_delay`` seconds; at most ``queue_size`` (default 2) batches
        wait between stages. See fastfcn.runtime.stream.

        A net of two inputs (NYUDv2 fusion: RGB-D streams) takes a pair ``(image, second)`` per
        frame (a tuple or list of two): ``second`` the frame's depth map (nyud-fcn32s-color-d:
        (H, W) millimetres, uint16 etc.; 8-bit is refused) or HHA image (nyud-fcn32s-color-hha:
        (H, W, 3) uint8), in any form ``run(image, depth=...)`` / ``run(image, hha=...)`` takes
        for one image, of its image's size; each result equals ``run(image, output,
        depth=second).cpu()`` (or ``hha=``). A bare frame for such a net, or a pair for a
        one-input net, raises StreamError naming the frame. On CUDA these nets skip the pinned
        ring of one-input streams (fastfcn.runtime.stream_cuda): each batch is uploaded and its
        results copied back in the worker thread."""
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
        """t: uint8 (N, H, W, 3) (kind "u8") or float (N, 3, H, W) (kind "float"), any device.
        The batch path of run() and stream(): inference, then the post-processing (if any)."""
        return run_postprocessed(self, t, kind, output)

    def _infer(self, t: torch.Tensor, kind: str, output: str) -> torch.Tensor:
        """The backend's result for ``t`` (as for _run), without post-processing."""
        h, w = (t.shape[1], t.shape[2]) if kind == "u8" else (t.shape[2], t.shape[3])
        self._check_size(h, w)
        device = self.execution.device
        if kind == "float" or device.type == "cpu":
            t = t.to(device)
        if kind == "float" and self.check_finite:
            check_finite(t)
        if self._cuda is not None:
            with self._lock:
                return self._cuda(t, kind, output)
        with self._lock if self.execution.serial else nullcontext(), torch.inference_mode():
            return self._forward(t, kind, output)

    def _forward(self, t: torch.Tensor, kind: str, output: str) -> torch.Tensor:
        """Preprocess (uint8), run the backend, results as float32 (floating outputs) or labels;
        t already on the device. What a CUDA graph captures."""
        x = self._pre(t) if kind == "u8" else t
        with self._precision_flags():
            out = self._backend(x, output)
        return out.float() if out.is_floating_point() and out.dtype != torch.float32 else out

    @contextmanager
    def _precision_flags(self):
        # fp32 means fp32 on CUDA: torch lets cuDNN use TF32 by default. The precision is fixed
        # per Segmenter; the flags are written only when they differ from it (with CUDA graphs
        # the forward runs in Python only while capturing), and only for fp32 / tf32.
        tf32 = self.execution.tf32
        if tf32 is None:
            yield
            return
        with _TF32_LOCK:
            old = _tf32_switches()
            if old != (tf32, tf32):
                torch.backends.cudnn.allow_tf32 = tf32
                torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                yield
            finally:
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
