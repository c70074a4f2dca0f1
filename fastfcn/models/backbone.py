"""The backbone as data: the steps a family's encoder runs, and one runner.

Every family's backbone is a chain of a few kinds of step (conv [+ BatchNorm] + ReLU,
max pooling with Caffe's ceil rounding, LRN, GoogLeNet's Inception block of Conv steps).
Describing the chain as data lets the runtime swap the convolution behind every ``Conv``
step generically (prepacked oneDNN, NNPACK, bf16, ...: ``SegmentationModel.set_conv_impl``)
and lets the planner of image-independent positions read the geometry of the whole chain,
without a second forward per family. Module names stay the Caffe layer names, so state-dict
keys do not change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# A convolution implementation: impl(x, padding) -> conv(x) + bias (BatchNorm folded into both),
# followed by the step's ReLU when the step has one. ``padding`` (rows, cols) of zeros replaces the
# module's own padding, so a caller may run the same layer on a window that it padded itself.
# An impl may also have ``conv_pool(x, padding, kernel, stride)`` = Caffe's ceil max pooling of
# impl(x, padding): run_steps then hands it the Pool step that follows (one without switches), so
# the pooling can happen in the convolution's epilogue.
ConvImpl = Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]


@dataclass(frozen=True)
class Conv:
    """``name``: a Conv2d module (the Caffe layer name); ``bn``: the BatchNorm2d after it, or None;
    ``relu``: whether a ReLU follows."""

    name: str
    bn: str | None = None
    relu: bool = True


@dataclass(frozen=True)
class Pool:
    """Max pooling, kernel x kernel, stride, ceil rounding (Caffe), no padding.

    ``tap``: keep the output under this name (the head's skip sources, "pool3", "pool4");
    ``switches``: keep the argmax positions under this key (DeconvNet's unpooling levels).
    """

    kernel: int = 2
    stride: int = 2
    tap: str | None = None
    switches: int | None = None

    def __post_init__(self):
        if self.kernel < 1 or self.stride < 1:
            raise ValueError(f"pool kernel and stride must be >= 1; got {self.kernel}, {self.stride}")


@dataclass(frozen=True)
class LRN:
    """A LocalResponseNorm module (across channels: pointwise in space)."""

    name: str


@dataclass(frozen=True)
class Inception:
    """GoogLeNet's Inception module (Szegedy et al. 2015) ``name``: four branches on one input,
    concatenated along channels in this order: 1x1; 3x3_reduce -> 3x3 (pad 1); 5x5_reduce ->
    5x5 (pad 2); 3x3 stride-1 max pooling (pad 1) -> pool_proj. Every conv has a ReLU and is a
    Conv step of its own, named ``{name}_{branch}`` (Caffe's ``{name}/{branch}``: '/' is no
    valid module name), so a backend swaps the branch convolutions like any other.

    Every branch keeps the map's size and is centred (pad = (k - 1) / 2), so the block is a
    pointwise step for the geometry of the crop offsets."""

    name: str

    @property
    def branches(self) -> tuple[tuple[Conv, ...], ...]:
        """The Conv steps of each branch, in concatenation order (the last follows the pool)."""
        n = self.name
        return (
            (Conv(f"{n}_1x1"),), (Conv(f"{n}_3x3_reduce"), Conv(f"{n}_3x3")),
            (Conv(f"{n}_5x5_reduce"), Conv(f"{n}_5x5")), (Conv(f"{n}_pool_proj"),),
        )  # fmt: skip


Step = Conv | Pool | LRN | Inception


def step_convs(steps: Sequence[Step]) -> tuple[Conv, ...]:
    """Every Conv step of ``steps`` in forward order, an Inception block's branch convs included."""
    out: list[Conv] = []
    for s in steps:
        if isinstance(s, Conv):
            out.append(s)
        elif isinstance(s, Inception):
            out.extend(c for branch in s.branches for c in branch)
    return tuple(out)


Pair = tuple[int, int]


def conv_padding(module: nn.Module) -> tuple[int, int]:
    """The zero padding of the convolution a step computes: a Conv2d's own padding; for a
    stride-1 ConvTranspose2d (DeconvNet), the padding of the equivalent convolution,
    dilation * (k - 1) - padding (a transposed conv of stride 1 is a conv with the
    weight's in/out axes swapped and its taps flipped)."""
    if isinstance(module.padding, str):
        raise ValueError(f"string padding {module.padding!r} is not supported in a backbone step")
    if isinstance(module, nn.ConvTranspose2d):
        _check_transposed(module)
        return tuple(d * (k - 1) - p for k, p, d in zip(module.kernel_size, module.padding, module.dilation))
    return tuple(module.padding)


def _check_transposed(module: nn.ConvTranspose2d) -> None:
    if tuple(module.stride) != (1, 1) or module.groups != 1 or tuple(module.output_padding) != (0, 0):
        raise ValueError(
            "a ConvTranspose2d step must have stride 1, groups 1 and no output padding (it runs as the "
            f"equivalent convolution); got stride {module.stride}, groups {module.groups}, "
            f"output_padding {module.output_padding}"
        )


def conv_weight(module: nn.Module) -> torch.Tensor:
    """The (C_out, C_in / groups, kh, kw) weight of the convolution a step computes (for a
    stride-1 ConvTranspose2d, its weight with in/out swapped and the taps flipped)."""
    if isinstance(module, nn.ConvTranspose2d):
        _check_transposed(module)
        return module.weight.transpose(0, 1).flip(-2, -1)
    return module.weight


def conv_geometry(module: nn.Module) -> tuple[Pair, Pair, Pair, Pair]:
    """(kernel, stride, padding, dilation) of the convolution a step computes, each (rows, cols)."""
    return (
        tuple(module.kernel_size), tuple(module.stride), conv_padding(module), tuple(module.dilation)
    )  # fmt: skip


def reference_conv(model: nn.Module, step: Conv) -> ConvImpl:
    """The step's reference implementation: torch's conv (+ BatchNorm) (+ ReLU)."""
    conv = getattr(model, step.name)
    bn = getattr(model, step.bn) if step.bn is not None else None
    own = conv_padding(conv)

    def impl(x: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
        if tuple(padding) == own:
            y = conv(x)
        else:
            y = F.conv2d(x, conv_weight(conv), conv.bias, conv.stride, padding, conv.dilation, conv.groups)
        if bn is not None:
            y = bn(y)
        return F.relu(y, inplace=True) if step.relu else y

    return impl


def run_conv(model: nn.Module, step: Conv, h: torch.Tensor) -> torch.Tensor:
    """One Conv step on h at the layer's own padding: the ConvImpl set on the model, else the
    module itself (+ BatchNorm) (+ ReLU), whatever it is (training wraps convs, train.ConvBN)."""
    impl = getattr(model, "_conv_impls", {}).get(step.name)
    if impl is not None:
        return impl(h, conv_padding(getattr(model, step.name)))
    y = getattr(model, step.name)(h)
    if step.bn is not None:
        y = getattr(model, step.bn)(y)
    return F.relu(y, inplace=True) if step.relu else y


def local_response_norm(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """An LRN module on h; bf16/fp16 on the CPU run in fp32 (torch's CPU LRN pools with
    avg_pool3d, which has no BFloat16/Half kernel), the result cast back."""
    if h.device.type == "cpu" and h.dtype in (torch.bfloat16, torch.float16):
        return module(h.float()).to(h.dtype)
    return module(h)


def run_inception(model: nn.Module, step: Inception, h: torch.Tensor) -> torch.Tensor:
    """An Inception block on h (N, C, H, W) -> (N, sum of the branches' channels, H, W)."""
    outs = []
    for i, branch in enumerate(step.branches):
        # Caffe's max pooling skips the padded positions: torch pads with -inf, the same.
        y = F.max_pool2d(h, 3, 1, 1, ceil_mode=True) if i == len(step.branches) - 1 else h
        for conv in branch:
            y = run_conv(model, conv, y)
        outs.append(y)
    return torch.cat(outs, 1)


def max_pool(model, h: torch.Tensor, step: Pool) -> torch.Tensor:
    """A Pool step without switches: the model's ``pool_impl`` when the runtime set one, else
    torch's max_pool2d. Caffe rounds pooled sizes up; PyTorch's default floor breaks the crop offsets."""
    impl = getattr(model, "pool_impl", None)
    if impl is not None:
        return impl(h, step.kernel, step.stride)
    return F.max_pool2d(h, step.kernel, step.stride, ceil_mode=True)


def run_steps(
    model: nn.Module,
    steps: Sequence[Step],
    h: torch.Tensor,
    feats: dict,
    switches: dict | None = None,
    pool_with_switches: Callable | None = None,
) -> torch.Tensor:
    """Run ``steps`` on ``h`` (N, C, H, W); taps go to ``feats``, pooling switches to ``switches``
    as (switches, pre-pool size). ``pool_with_switches(h, k, s) -> (y, switches)`` defaults to
    torch's max_pool2d(return_indices=True)."""
    impls = getattr(model, "_conv_impls", {})
    steps = tuple(steps)
    fused_pool = None  # a Pool step already run by the conv before it
    for i, step in enumerate(steps):
        if step is fused_pool:
            fused_pool = None
            if step.tap is not None:
                feats[step.tap] = h
        elif isinstance(step, Conv):
            nxt = steps[i + 1] if i + 1 < len(steps) else None
            conv_pool = getattr(impls.get(step.name), "conv_pool", None)
            if conv_pool is not None and isinstance(nxt, Pool) and nxt.switches is None:
                h = conv_pool(h, conv_padding(getattr(model, step.name)), nxt.kernel, nxt.stride)
                fused_pool = nxt
            else:
                h = run_conv(model, step, h)
        elif isinstance(step, Pool):
            if step.switches is not None:
                size = (h.shape[-2], h.shape[-1])
                if pool_with_switches is None:
                    h, sw = F.max_pool2d(h, step.kernel, step.stride, ceil_mode=True, return_indices=True)
                else:
                    h, sw = pool_with_switches(h, step.kernel, step.stride)
                switches[step.switches] = (sw, size)
            else:
                h = max_pool(model, h, step)
            if step.tap is not None:
                feats[step.tap] = h
        elif isinstance(step, LRN):
            h = local_response_norm(getattr(model, step.name), h)
        elif isinstance(step, Inception):
            h = run_inception(model, step, h)
        else:
            raise TypeError(f"unknown backbone step {step!r}")
    return h
