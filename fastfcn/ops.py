"""The fused operations' public face.

Every op takes ``impl=None | "triton" | "cpu" | "reference"``. None picks Triton for CUDA
tensors and the C++ twin (``fastfcn.kernels.cpu``) for CPU tensors, falling back to the
reference, with one warning per process, where the twin is not built; "triton" on CPU
tensors runs Triton's interpreter (needs ``TRITON_INTERPRET=1`` before Triton is imported);
"reference" runs the plain-PyTorch definition in ``fastfcn.kernels.reference`` (the spec).

The fused ops are also registered as ``torch.ops.fastfcn.*`` custom ops with fake
implementations, so torch.compile and torch.export see through them; eager calls skip the
dispatcher and call the implementation directly.

Upsampling weights are classified once per weight tensor (``weight_kind``, cached by tensor
identity and version counter): "bilinear" (taps from the formula), "depthwise" (diagonal,
arbitrary) or "dense" (full C x C).
"""

import importlib
import os
import warnings
import weakref

import torch

from fastfcn.kernels import reference as ref
from fastfcn.kernels import structure as _structure
from fastfcn.kernels.structure import check_output, pool_out_size

IMPLS = (None, "triton", "cpu", "reference")
OUTPUTS = _structure.OUTPUTS
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

# ---------------------------------------------------------------- weight structure, cached

_kind_cache: dict = {}


def tensor_version(t: torch.Tensor) -> int:
    """t's version counter (bumped by in-place changes); -1 for an inference tensor, which has
    none and cannot change outside inference mode."""
    try:
        return t._version
    except RuntimeError:  # inference tensors carry no version counter and cannot change outside it
        return -1


def weight_kind(weight: torch.Tensor) -> str:
    """'bilinear', 'depthwise' or 'dense' for a (C, C, k, k) or (C, 1, k, k) upsampling weight.

    Detected once per tensor: the answer is cached by the tensor's identity and recomputed
    only after an in-place change (its version counter moved).
    """
    key = id(weight)
    hit = _kind_cache.get(key)
    version = tensor_version(weight)
    if hit is not None and hit[0]() is weight and hit[1] == version:
        return hit[2]
    kind = _structure.weight_kind(weight)

    def _forget(_ref, key=key):
        _kind_cache.pop(key, None)

    _kind_cache[key] = (weakref.ref(weight, _forget), version, kind)
    return kind


# ---------------------------------------------------------------- implementation choice

_cpu_state: dict = {}


def _cpu_twin():
    """The C++ module, or None with the reason in _cpu_state['why']."""
    if "mod" not in _cpu_state:
        mod, why = None, None
        try:
            mod = importlib.import_module("fastfcn.kernels.cpu")
            if not mod.available():
                mod, why = None, "fastfcn.kernels.cpu.available() is False (the extension is not built)"
        except Exception as e:  # any import failure means: no twin
            mod, why = None, f"fastfcn.kernels.cpu could not be imported ({type(e).__name__}: {e})"
        _cpu_state["mod"], _cpu_state["why"] = mod, why
    return _cpu_state["mod"]


def _triton_kernels(name: str):
    try:
        return importlib.import_module(f"fastfcn.kernels.{name}")
    except ModuleNotFoundError as e:
        if e.name != "triton":
            raise
        # triton is an extra (gpu, dev), not a runtime dependency: 999 MB that CPU machines never run.
        raise RuntimeError(
            "the Triton kernels need triton, which is not installed: pip install 'fastfcn[gpu]' "
            "(or use impl='cpu' / 'reference' on the CPU)"
        ) from None


def _warn_reference_fallback():
    if not _cpu_state.get("warned"):
        _cpu_state["warned"] = True
        warnings.warn(
            f"fastfcn.ops: the C++ kernels are unavailable, so CPU tensors run the plain-PyTorch "
            f"reference ops (slower, same results): {_cpu_state['why']}. Reinstall with "
            f"`pip install -e .` and a C++ compiler to build them.",
            RuntimeWarning,
            stacklevel=3,
        )


def _resolve(impl, t: torch.Tensor) -> str:
    """The concrete implementation ('triton', 'cpu' or 'reference') for tensors on t's device."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    if impl == "reference":
        return impl
    dev = t.device.type
    if impl is None:
        if dev == "cuda":
            return "triton"
        if dev == "cpu":
            if _cpu_twin() is not None:
                return "cpu"
            _warn_reference_fallback()
        return "reference"
    if impl == "cpu":
        if dev != "cpu":
            raise ValueError(f"impl='cpu' runs the C++ kernels on CPU tensors; got tensors on {t.device}")
        if _cpu_twin() is None:
            raise RuntimeError(f"impl='cpu' was requested but {_cpu_state['why']}")
        return impl
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "impl='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 before "
            "triton is imported, or move the tensors to a CUDA device"
        )
    if dev not in ("cpu", "cuda"):
        raise ValueError(f"impl='triton' needs CUDA (or CPU, interpreted) tensors; got {t.device}")
    return impl


# ---------------------------------------------------------------- validation


def _check_x(x, name="x"):
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{name} must be a (N, C, h, w) tensor; got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float32, float16 or bfloat16; got {x.dtype}")


def _stage_size(x_hw, weight, stride, c, device, name="weight"):
    """Validate one upsampling stage and return the transposed conv's (Ho, Wo)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[0] != c \
            or weight.shape[1] not in (1, c) or weight.shape[2] != weight.shape[3]:
        raise ValueError(
            f"{name} must be (C, C, k, k) or (C, 1, k, k) with C={c} the input's channels; "
            f"got {tuple(getattr(weight, 'shape', ()))}"
        )
    if weight.device != device:
        raise ValueError(f"{name} is on {weight.device} but the input is on {device}")
    if isinstance(stride, bool) or int(stride) != stride or stride < 1:
        raise ValueError(f"stride must be a positive integer; got {stride!r}")
    k = weight.shape[-1]
    return (x_hw[0] - 1) * int(stride) + k, (x_hw[1] - 1) * int(stride) + k


def _check_crop(offset, hw, size, what):
    if isinstance(offset, bool) or int(offset) != offset or offset < 0:
        raise ValueError(f"offset must be a non-negative integer; got {offset!r}")
    if offset + size[0] > hw[0] or offset + size[1] > hw[1]:
        raise ValueError(
            f"a {size[0]}x{size[1]} crop at offset {offset} does not fit {what} of {hw[0]}x{hw[1]}"
        )


def _check_skip(skip, n, c, offset, out_hw, device, name="skip"):
    if not isinstance(skip, torch.Tensor) or skip.dim() != 4 or tuple(skip.shape[:2]) != (n, c):
        raise ValueError(
            f"{name} must be (N, C, Hs, Ws) = ({n}, {c}, ...); got {tuple(getattr(skip, 'shape', ()))}"
        )
    if skip.device != device:
        raise ValueError(f"{name} is on {skip.device} but the input is on {device}")
    _check_crop(offset, tuple(skip.shape[-2:]), out_hw, f"{name}")


def _check_size(size):
    # Symbolic sizes (torch.export) pass through: int() would specialise them to the traced value.
    if len(size) != 2 or any(not isinstance(v, torch.SymInt) and (int(v) != v or v < 0) for v in size):
        raise ValueError(f"size must be (H, W) of non-negative integers; got {size!r}")
    return ref._side(size[0]), ref._side(size[1])


# ---------------------------------------------------------------- implementations
# impl is "triton" or "cpu" here: the public ops below run impl="reference" themselves.


def _kernels(impl: str, triton_module: str):
    return _triton_kernels(triton_module) if impl == "triton" else _cpu_twin()


def _upsample_add_impl(x, weight, stride, skip, offset, scale, impl):
    mod = _kernels(impl, "upsample")
    return mod.upsample_add(x, weight, stride, skip, offset, scale, weight_kind(weight))


def _upsample_crop_impl(x, weight, stride, offset, size, output, impl):
    mod = _kernels(impl, "upsample")
    return mod.upsample_crop(x, weight, stride, offset, tuple(size), output, weight_kind(weight))


def _fcn_head_impl(score, skips, weights, strides, offsets, scales, size, output, impl):
    kinds = [weight_kind(w) for w in weights]
    mod = _kernels(impl, "upsample")
    return mod.fcn_head(score, list(skips), list(weights), list(strides), list(offsets), list(scales),
                        tuple(size), output, kinds)


def _max_pool_impl(x, kernel, stride, ceil_mode, impl):
    return _kernels(impl, "unpool").max_pool2d_with_switches(x, kernel, stride, ceil_mode)


def _max_unpool_impl(x, indices, output_size, kernel, stride, relu, impl):
    if stride < kernel:
        warnings.warn(
            f"fastfcn.ops.max_unpool2d: kernel={kernel} with stride={stride} makes windows overlap, so an "
            f"output pixel can belong to several windows and the gather does not apply; running the "
            f"reference (torch's scatter) instead",
            RuntimeWarning,
            stacklevel=3,
        )
        return ref.max_unpool2d(x, indices, tuple(output_size), kernel, stride, relu)
    return _kernels(impl, "unpool").max_unpool2d(x, indices, tuple(output_size), kernel, stride, relu)


# ---------------------------------------------------------------- custom ops (torch.compile / export)


@torch.library.custom_op("fastfcn::upsample_add", mutates_args=())
def _upsample_add_op(
    x: torch.Tensor, weight: torch.Tensor, stride: int, skip: torch.Tensor | None, offset: int,
    scale: float, impl: str,
) -> torch.Tensor:
    return _upsample_add_impl(x, weight, stride, skip, offset, scale, impl)


@_upsample_add_op.register_fake
def _(x, weight, stride, skip, offset, scale, impl):
    n, c, h, w = x.shape
    k = weight.shape[-1]
    return x.new_empty((n, c, (h - 1) * stride + k, (w - 1) * stride + k))


@torch.library.custom_op("fastfcn::upsample_crop", mutates_args=())
def _upsample_crop_op(
    x: torch.Tensor, weight: torch.Tensor, stride: int, offset: int, size: list[int], output: str, impl: str
) -> torch.Tensor:
    return _upsample_crop_impl(x, weight, stride, offset, size, output, impl)


def _fake_output(x: torch.Tensor, size, output: str) -> torch.Tensor:
    """The shape and dtype of a final stage's result for x: (N, C, h, w): labels (N, H, W) or (N, C, H, W)."""
    n, c = x.shape[:2]
    if output == "labels":
        return x.new_empty((n, size[0], size[1]), dtype=_structure.labels_dtype(c))
    return x.new_empty((n, c, size[0], size[1]))


@_upsample_crop_op.register_fake
def _(x, weight, stride, offset, size, output, impl):
    return _fake_output(x, size, output)


@torch.library.custom_op("fastfcn::fcn_head", mutates_args=())
def _fcn_head_op(
    score: torch.Tensor, skips: list[torch.Tensor], weights: list[torch.Tensor], strides: list[int],
    offsets: list[int], scales: list[float], size: list[int], output: str, impl: str,
) -> torch.Tensor:
    return _fcn_head_impl(score, skips, weights, strides, offsets, scales, size, output, impl)


@_fcn_head_op.register_fake
def _(score, skips, weights, strides, offsets, scales, size, output, impl):
    return _fake_output(score, size, output)


@torch.library.custom_op("fastfcn::max_pool2d_with_switches", mutates_args=())
def _max_pool_op(
    x: torch.Tensor, kernel: int, stride: int, ceil_mode: bool, impl: str
) -> tuple[torch.Tensor, torch.Tensor]:
    values, switches = _max_pool_impl(x, kernel, stride, ceil_mode, impl)
    return values.contiguous(), switches.contiguous()


@_max_pool_op.register_fake
def _(x, kernel, stride, ceil_mode, impl):
    n, c, H, W = x.shape
    shape = (n, c, pool_out_size(H, kernel, stride, ceil_mode), pool_out_size(W, kernel, stride, ceil_mode))
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.uint8)


@torch.library.custom_op("fastfcn::max_unpool2d", mutates_args=())
def _max_unpool_op(
    x: torch.Tensor, indices: torch.Tensor, output_size: list[int], kernel: int, stride: int, relu: bool,
    impl: str,
) -> torch.Tensor:
    return _max_unpool_impl(x, indices, output_size, kernel, stride, relu, impl)


@_max_unpool_op.register_fake
def _(x, indices, output_size, kernel, stride, relu, impl):
    n, c = x.shape[:2]
    return x.new_empty((n, c, output_size[0], output_size[1]))


def _compiling() -> bool:
    return torch.compiler.is_compiling()


# ---------------------------------------------------------------- public ops


def upsample_add(x, weight, stride, skip=None, offset=0, scale=1.0, *, impl=None):
    """conv_transpose2d(x, weight, stride) + scale * skip[:, :, offset:offset+Ho, offset:offset+Wo].

    x: (N, C, h, w); weight: (C, C, k, k) or (C, 1, k, k); skip: (N, C, Hs, Ws) or None.
    Returns (N, C, Ho, Wo) in x.dtype, Ho = (h - 1) * stride + k (FCN's fuse_pool4 / fuse_pool3).
    """
    _check_x(x)
    n, c, h, w = x.shape
    out_hw = _stage_size((h, w), weight, stride, c, x.device)
    if skip is not None:
        _check_skip(skip, n, c, offset, out_hw, x.device)
    impl = _resolve(impl, x)
    if impl == "reference":
        return ref.upsample_add(x, weight, stride, skip, offset, scale)
    args = (x, weight, int(stride), skip, int(offset), float(scale), impl)
    return _upsample_add_op(*args) if _compiling() else _upsample_add_impl(*args)


def upsample_crop(x, weight, stride, offset, size, output="logits", *, impl=None):
    """conv_transpose2d(x, weight, stride) cropped to size = (H, W) from offset.

    x: (N, C, h, w) -> logits or probs (N, C, H, W) in x.dtype, or labels (N, H, W)
    (uint8 when C <= 256, else int32; ties to the lowest class index, as torch.argmax).
    """
    _check_x(x)
    check_output(output)
    size = _check_size(size)
    c = x.shape[1]
    full = _stage_size(tuple(x.shape[-2:]), weight, stride, c, x.device)
    _check_crop(offset, full, size, "the upsampled map")
    impl = _resolve(impl, x)
    if impl == "reference":
        return ref.upsample_crop(x, weight, stride, offset, size, output)
    args = (x, weight, int(stride), int(offset), list(size), output, impl)
    return _upsample_crop_op(*args) if _compiling() else _upsample_crop_impl(*args)


def fcn_head(score, skips, weights, strides, offsets, scales, size, output="logits", *, impl=None):
    """A whole FCN head from the coarsest score map to logits, labels or probs.

    score: (N, C, h, w); skips[i]: (N, C, Hi, Wi); weights, strides, offsets: len(skips) + 1
    (the last offset is the final crop); scales: len(skips). Equals upsample_add once per skip,
    then upsample_crop. Returns (N, C, H, W) logits/probs or (N, H, W) labels, size = (H, W).
    """
    _check_x(score, "score")
    check_output(output)
    size = _check_size(size)
    skips, weights, strides, offsets, scales = list(skips), list(weights), list(strides), list(offsets), \
        list(scales)
    ns = len(skips)
    if not (len(weights) == len(strides) == len(offsets) == ns + 1 and len(scales) == ns):
        raise ValueError(
            f"a head with {ns} skips needs {ns + 1} weights, strides and offsets and {ns} scales; got "
            f"{len(weights)}, {len(strides)}, {len(offsets)} and {len(scales)}"
        )
    n, c, h, w = score.shape
    hw = (h, w)
    for i in range(ns):
        hw = _stage_size(hw, weights[i], strides[i], c, score.device, f"weights[{i}]")
        _check_skip(skips[i], n, c, offsets[i], hw, score.device, f"skips[{i}]")
    full = _stage_size(hw, weights[ns], strides[ns], c, score.device, f"weights[{ns}]")
    _check_crop(offsets[ns], full, size, "the last upsampled map")
    impl = _resolve(impl, score)
    if impl == "reference":
        return ref.fcn_head(score, skips, weights, strides, offsets, scales, size, output)
    args = (score, skips, weights, [int(s) for s in strides], [int(o) for o in offsets],
            [float(s) for s in scales], list(size), output, impl)
    return _fcn_head_op(*args) if _compiling() else _fcn_head_impl(*args)


def max_pool2d_with_switches(x, kernel=2, stride=2, ceil_mode=True, *, impl=None):
    """Max pooling that also returns each window's switch as one byte.

    x: (N, C, H, W) -> values (N, C, h, w) in x.dtype and switches (N, C, h, w) uint8 holding
    dy * kernel + dx of the window's first maximum (torch's choice on ties).
    """
    _check_x(x)
    kernel, stride = int(kernel), int(stride)
    _structure.check_switch_window(kernel, stride)
    H, W = x.shape[-2:]
    if pool_out_size(H, kernel, stride, ceil_mode) < 1 or pool_out_size(W, kernel, stride, ceil_mode) < 1:
        raise ValueError(
            f"a {H}x{W} input is too small for {kernel}x{kernel} pooling with stride {stride} "
            f"(ceil_mode={ceil_mode}): the output would be empty"
        )
    impl = _resolve(impl, x)
    if impl == "reference":
        return ref.max_pool2d_with_switches(x, kernel, stride, ceil_mode)
    args = (x, kernel, stride, bool(ceil_mode), impl)
    return _max_pool_op(*args) if _compiling() else _max_pool_impl(*args)


def max_unpool2d(x, indices, output_size, kernel=2, stride=2, relu=False, *, impl=None):
    """torch.nn.functional.max_unpool2d(relu(x) if relu else x, indices, kernel, stride, output_size=...).

    x: (N, C, h, w); indices: (N, C, h, w), int64 flat within each (N, C) plane (from
    max_pool2d(return_indices=True) on an input of size output_size) or uint8 switches from
    max_pool2d_with_switches; output_size: (H, W). Returns (N, C, H, W). Overlapping windows
    (stride < kernel) run the reference, with a warning.
    """
    _check_x(x)
    if not isinstance(indices, torch.Tensor) or indices.shape != x.shape:
        raise ValueError(
            f"indices must have the shape of x {tuple(x.shape)}; got {tuple(getattr(indices, 'shape', ()))}"
        )
    if indices.dtype not in (torch.int64, torch.uint8):
        raise ValueError(f"indices must be int64 (PyTorch's) or uint8 (switches); got {indices.dtype}")
    if indices.device != x.device:
        raise ValueError(f"indices are on {indices.device} but x is on {x.device}")
    kernel, stride = int(kernel), int(stride)
    if kernel < 1 or stride < 1:
        raise ValueError(f"kernel and stride must be >= 1; got kernel={kernel}, stride={stride}")
    size = _check_size(tuple(output_size)[-2:])
    for d in range(2):
        default = (x.shape[2 + d] - 1) * stride + kernel
        if not default - stride < size[d] < default + stride:
            raise ValueError(
                f"output_size {size} is invalid for a {x.shape[2]}x{x.shape[3]} input with kernel {kernel} "
                f"and stride {stride}: each side must lie strictly between {default - stride} and "
                f"{default + stride} (torch's rule)"
            )
    impl = _resolve(impl, x)
    if impl == "reference":
        return ref.max_unpool2d(x, indices, size, kernel, stride, relu)
    args = (x, indices, list(size), kernel, stride, bool(relu), impl)
    return _max_unpool_op(*args) if _compiling() else _max_unpool_impl(*args)


__all__ = [
    "IMPLS",
    "OUTPUTS",
    "fcn_head",
    "max_pool2d_with_switches",
    "max_unpool2d",
    "upsample_add",
    "upsample_crop",
    "weight_kind",
]
