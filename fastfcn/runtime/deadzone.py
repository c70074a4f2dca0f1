"""Compute only what the image reaches: the backbone planner ("dead zone" skip).

conv1_1's padding of 100 (FCN-VGG, FCN-AlexNet) and DeconvNet's zero padding to >= 224 and a
multiple of 32 surround the image with positions whose receptive field never reaches it: their
values depend only on (H, W) and the weights. For FCN-8s at 500x500 that is 56 of 181.5 GMAC
(31%), about 50% at 224x224 and 14% at 1920x1080 (docs/facts.md, "Image-independent positions";
``fastfcn.flops.count_macs(...).computed_macs`` reports what this plan computes: 125.6 GMAC).

Two parts:

- geometry (pure ints, ``DeadZonePlan``): per step, the interval of outputs (per dimension)
  whose window meets the image-dependent input interval, the outputs computed per call (those,
  and before a pool the few the pool's window reads around them), and the input window they
  read, with the zero padding it needs where it leaves the map;
- the executor (``DeadZoneForward``): per call, each step runs only on its window, assembled
  from the previous step's computed outputs and a thin cached ring of image-independent values
  around them (2 px for a 3x3 conv after a conv). Taps (the head's pool3/pool4), pooling
  switches and the final map are whole: the computed part is pasted into the cached rest. The
  cache is filled by one ordinary forward of the steps per (H, W, dtype, device, memory
  format, autocast, conv impls, weights) and kept in a bounded LRU (``DeadZoneCache``). A
  conv whose impl has ``conv_pool`` (the fused CUDA backend's) runs with the 2x2/2 pool after
  it as one call, the pool in the conv's epilogue, on a window the plan aligns to the pool.

Exact: each computed value is the same conv / pool of the same inputs as in the plain forward
(the zero padding a window needs where it is clipped is the padding the layer has anyway), so
results agree to float32 rounding (the convolution may pick another blocking for another
shape). Built from torch ops only, so it runs wherever the steps do (CPU, CUDA, meta).

Measured (FCN-8s width 1, 500x500, fp32, batch 1, torch's own convs, logits; AMD EPYC Zen 4,
2 cores shared with other jobs at load 8-10, so absolute times are inflated; medians of 7
interleaved rounds, benchmarks/deadzone_ablation.py): 2 threads 13.9 s with the skip vs
18.2 s without (0.77), 1 thread 9.8 vs 12.9 s (0.76); the MACs computed are 0.69 of the
nominal (125.6 of 181.5 G). Filling the cache costs one plain backbone forward per shape.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..heads import model_heads
from ..kernels import structure
from ..models.backbone import (
    LRN,
    Conv,
    Pool,
    conv_geometry,
    local_response_norm,
    max_pool,
    reference_conv,
    run_steps,
)
from ..ops import tensor_version

# The module-level switch for ablations: DeadZoneForward(enabled=None) reads it at every call.
ENABLED = True

# (kernel, stride) of the one pooling a conv impl's conv_pool does in its epilogue
# (kernels/conv_epilogue.py, POOL); other pools after a conv (FCN-AlexNet's 3x3/2) run as steps.
FUSED_POOL = (2, 2)

_held = threading.local()


@contextmanager
def hold_entries():
    """Collect the cache entries that the calls in this block (in this thread) read.

    A CUDA graph captured in the block replays reads of those entries' tensors without going
    through the cache, so the LRU may drop an entry while the graph lives; whoever keeps the
    graph keeps the list as well, and a dropped entry stays allocated until the graph goes."""
    prev = getattr(_held, "entries", None)
    _held.entries = held = []
    try:
        yield held
    finally:
        _held.entries = prev

Span = tuple[int, int]  # half-open [lo, hi)


def _cdiv(a: int, b: int) -> int:
    return -((-a) // b)


# (kind, kernel, stride, padding, dilation) of a step along one dimension; kind: conv, pool, point.
Geom = tuple[str, int, int, int, int]


@dataclass(frozen=True)
class DimPlan:
    """One step along one dimension. ``size`` / ``out_size``: the map sizes; ``dep`` /
    ``out_dep``: the image-dependent interval of input / output; ``out_comp`` (contains
    ``out_dep``): the outputs computed per call; ``avail``: the input interval a call has
    computed (the whole map where the previous output is kept whole); ``window``: the input
    interval the computed outputs read, before clipping to [0, size) (it may start below 0 or
    end past ``size`` where the layer's own padding supplies zeros)."""

    size: int
    dep: Span
    out_size: int
    out_dep: Span
    geom: Geom
    avail: Span
    out_comp: Span

    @property
    def window(self) -> Span:
        kind, k, s, p, d = self.geom
        lo, hi = self.out_comp
        if lo >= hi:
            return 0, 0
        if kind == "point":
            return lo, hi
        last = (hi - 1) * s - p + d * (k - 1) + 1
        # torch clips a ceil-mode pooling window at the border: no padding there.
        return lo * s - p, (min(last, self.size) if kind == "pool" else last)

    @property
    def clipped(self) -> Span:
        lo, hi = self.window
        return max(lo, 0), min(hi, self.size)

    @property
    def pad(self) -> Span:
        """Zeros needed before / after the clipped window."""
        lo, hi = self.window
        return max(0, -lo), max(0, hi - self.size)


def _dim(size: int, dep: Span, out: int, lo: int, hi: int, geom: Geom) -> DimPlan:
    out_dep = (lo, hi) if dep[0] < dep[1] and lo < hi else (0, 0)
    return DimPlan(size, dep, out, out_dep, geom, dep, out_dep)


def conv_dim(size: int, dep: Span, kernel: int, stride: int, padding: int, dilation: int) -> DimPlan:
    """A convolution along one dimension: output o reads inputs [o*stride - padding, ... + extent).

    With dilation > 1 the dependent outputs are taken as the interval hull (a superset: the few
    extra outputs are computed, not wrong)."""
    extent = dilation * (kernel - 1) + 1
    out = (size + 2 * padding - extent) // stride + 1
    if out < 1:
        raise ValueError(
            f"convolution of a size-{size} map (kernel {kernel}, stride {stride}, padding {padding}, "
            f"dilation {dilation}) has no output; the input is too small for this layer"
        )
    lo = max(0, _cdiv(dep[0] + padding - extent + 1, stride))
    hi = min(out, (dep[1] - 1 + padding) // stride + 1)
    return _dim(size, dep, out, lo, hi, ("conv", kernel, stride, padding, dilation))


def pool_out_size(size: int, kernel: int, stride: int) -> int:
    """torch's max_pool2d output size with ceil_mode=True and no padding (Caffe's rounding);
    raises where there is none."""
    out = structure.pool_out_size(size, kernel, stride, ceil_mode=True)
    if out < 1:
        raise ValueError(f"max pooling {kernel}/{stride} of a size-{size} map has no output")
    return out


def pool_dim(size: int, dep: Span, kernel: int, stride: int) -> DimPlan:
    """Max pooling, ceil rounding: output o reads [o*stride, min(o*stride + kernel, size)) (torch
    clips the last window at the border; the window is clipped the same way)."""
    out = pool_out_size(size, kernel, stride)
    lo = max(0, _cdiv(dep[0] - kernel + 1, stride))
    hi = min(out, (dep[1] - 1) // stride + 1)
    return _dim(size, dep, out, lo, hi, ("pool", kernel, stride, 0, 1))


def point_dim(size: int, dep: Span) -> DimPlan:
    return _dim(size, dep, size, dep[0], dep[1], ("point", 1, 1, 0, 1))


Rect = tuple[Span, Span]


@dataclass(frozen=True)
class StepPlan:
    """One backbone step over both dimensions (rows, cols)."""

    step: object
    rows: DimPlan
    cols: DimPlan

    @property
    def out_size(self) -> tuple[int, int]:
        return self.rows.out_size, self.cols.out_size

    @property
    def whole(self) -> Rect:
        return (0, self.rows.out_size), (0, self.cols.out_size)

    @property
    def avail(self) -> Rect:
        return self.rows.avail, self.cols.avail

    @property
    def window(self) -> Rect:
        return self.rows.clipped, self.cols.clipped

    @property
    def comp(self) -> Rect:
        return self.rows.out_comp, self.cols.out_comp

    @property
    def empty(self) -> bool:
        return self.rows.out_dep[0] >= self.rows.out_dep[1] or self.cols.out_dep[0] >= self.cols.out_dep[1]

    @property
    def full(self) -> bool:
        """Every output is computed (the plain step)."""
        return self.comp == self.whole

    @property
    def dependent_fraction(self) -> float:
        return _area((self.rows.out_dep, self.cols.out_dep)) / _area(self.whole)


def _area(rect: Rect) -> int:
    return max(0, rect[0][1] - rect[0][0]) * max(0, rect[1][1] - rect[1][0])


class DeadZonePlan:
    """The geometry of ``steps`` on an input map of ``size`` = (H, W) whose image-dependent part
    is the top-left ``image_size`` (default: all of it; DeconvNet: the image inside its zero
    padding). Pure ints: ``plan.steps[k]`` is a StepPlan.

    ``whole``: indices of steps whose output a caller needs whole (taps); the last step's and
    those with no dependent output are added. ``align``: a conv followed by a pool also
    computes the few independent outputs the pool's window reads around its dependent core,
    where they are at most this fraction more outputs: the pool then reads a view of the
    conv's output instead of a copy with a cached ring pasted around. FCN-8s 500x500: conv1_2
    computes 506^2 instead of 504^2 outputs (+0.8%, 75 MMAC) and pool1 copies no 65 MB window;
    conv2_2 and conv3_3 likewise; conv4_3 would need +5.5% and does not. Backbone, 1 thread,
    this shared machine: 6.90 s with it, 7.72 s without (minima of 5 interleaved rounds; the
    plain steps 12.56 s). 0 turns it off.

    ``conv_pools``: indices of Conv steps whose impl has ``conv_pool`` (``conv_pool_steps``).
    Each of them followed by a 2x2/2 Pool without switches computes the pool's whole input window
    whatever ``align`` says (at most 2 more rows and 2 more columns of outputs: the ceil-mode
    pool reads one position beyond the dependent ones on each side), so the two run as one call
    with the pool in the conv's epilogue (``fused``); the pool reads no copy either. FCN-8s
    500x500 (counted from this plan): the one conv this grows beyond ``align`` is conv4_3, 76^2
    instead of 74^2 outputs (+5.5% of conv4_3, 0.71 GMAC at width 1, 0.75% of the backbone's
    94.3 computed), i.e. 1.4 GFLOP against the copy of the 76^2 x 512 window pool4 would read
    otherwise, 5.9 MB bf16 written and read back: 120 FLOP per byte, under the H200's ~206 (the
    datasheet's dense bf16 peak over its memory bandwidth, 989 TFLOP/s / 4.8 TB/s). 1920x1080
    grows nothing; 224x224 0.19 GMAC (of 23.6).
    """

    def __init__(
        self, model, steps: Sequence, size: tuple[int, int], image_size: tuple[int, int] | None = None,
        whole: Collection[int] = (), align: float = 0.02, conv_pools: Collection[int] = (),
    ):  # fmt: skip
        size = (int(size[0]), int(size[1]))
        image = size if image_size is None else (int(image_size[0]), int(image_size[1]))
        if min(size) < 1 or not (1 <= image[0] <= size[0] and 1 <= image[1] <= size[1]):
            raise ValueError(
                f"the image ({image}) must be a non-empty top-left part of the input map ({size})"
            )
        self.size, self.image_size = size, image
        dep: Rect = ((0, image[0]), (0, image[1]))
        dims = []
        for step in steps:
            rows, cols = _step_dims(model, step, size, dep)
            dims.append((step, rows, cols))
            size, dep = (rows.out_size, cols.out_size), (rows.out_dep, cols.out_dep)
        n = len(dims)
        plans = [StepPlan(*d) for d in dims]
        self.whole = frozenset(k for k in range(n) if k in whole or k == n - 1 or plans[k].empty)
        comp = [p.comp for p in plans]
        for k in range(n - 2, -1, -1):  # backwards: a step's computed outputs follow the next window
            if (
                isinstance(plans[k].step, Conv)
                and isinstance(plans[k + 1].step, Pool)
                and k not in self.whole
            ):
                win = plans[k + 1].window  # pools compute their dependent outputs only
                grown = tuple(
                    (min(comp[k][i][0], win[i][0]), max(comp[k][i][1], win[i][1])) for i in range(2)
                )
                if _fusable(plans[k + 1].step) and k in conv_pools:
                    comp[k] = grown  # the pool's window: aligned to its stride (see _pair)
                elif _area(grown) <= (1 + align) * _area(comp[k]):
                    comp[k] = grown
        self.steps: tuple[StepPlan, ...] = tuple(
            StepPlan(p.step, _with(p.rows, avail[0], c[0]), _with(p.cols, avail[1], c[1]))
            for p, avail, c in zip(plans, self._avail(plans, comp), comp)
        )
        self.fused = frozenset(k for k in conv_pools if k < n - 1 and self._pair(k))

    def _pair(self, k: int) -> bool:
        """Whether Conv step k and the Pool after it can run as one ``conv_pool`` call: a 2x2/2
        pool without switches whose input window is exactly what the conv computes. That window
        starts at a multiple of the stride (pooled output lo reads from 2 * lo) and ends 2 x (the
        pooled outputs) later or at the map's edge, so the ceil-mode pooling of the conv's
        computed outputs alone gives the pool's computed outputs, a last window cut short only
        where the map's is."""
        conv, pool = self.steps[k], self.steps[k + 1]
        return (
            isinstance(conv.step, Conv) and _fusable(pool.step) and k not in self.whole
            and not conv.empty and conv.comp == pool.window
        )  # fmt: skip

    def _avail(self, plans, comp) -> list[Rect]:
        """What each step's input holds per call: the whole map (the input itself, or a kept-whole
        output) or the previous step's computed outputs."""
        out = [((0, self.size[0]), (0, self.size[1]))]
        for k in range(len(plans) - 1):
            out.append(plans[k].whole if k in self.whole else comp[k])
        return out


def _fusable(step) -> bool:
    """A Pool step that a conv impl's conv_pool may run in its epilogue."""
    return isinstance(step, Pool) and step.switches is None and (step.kernel, step.stride) == FUSED_POOL


def conv_pool_steps(steps: Sequence, impls: dict | None = None) -> frozenset[int]:
    """DeadZonePlan's ``conv_pools``: indices of the Conv steps of ``steps`` that a 2x2/2 Pool
    without switches follows and whose impl in ``impls`` (a model's ``_conv_impls``) has
    ``conv_pool``; impls None: every such conv (as the fused CUDA backend sets them)."""
    return frozenset(
        k for k in range(len(steps) - 1)
        if isinstance(steps[k], Conv) and _fusable(steps[k + 1])
        and (impls is None or hasattr(impls.get(steps[k].name), "conv_pool"))
    )  # fmt: skip


def _with(d: DimPlan, avail: Span, out_comp: Span) -> DimPlan:
    return DimPlan(d.size, d.dep, d.out_size, d.out_dep, d.geom, avail, out_comp)


def _step_dims(model, step, size, dep) -> tuple[DimPlan, DimPlan]:
    if isinstance(step, Conv):
        k, s, p, d = conv_geometry(getattr(model, step.name))
        return tuple(conv_dim(size[i], dep[i], k[i], s[i], p[i], d[i]) for i in range(2))
    if isinstance(step, Pool):
        return tuple(pool_dim(size[i], dep[i], step.kernel, step.stride) for i in range(2))
    if isinstance(step, LRN):
        return tuple(point_dim(size[i], dep[i]) for i in range(2))
    raise TypeError(f"unknown backbone step {step!r}; expected Conv, Pool or LRN")


def _ring(window: Rect, core: Rect) -> list[Rect]:
    """The window minus the core, as up to 4 rectangles (top, bottom, left, right) in map coords."""
    (r0, r1), (c0, c1) = window
    cr0, cr1 = min(max(core[0][0], r0), r1), max(min(core[0][1], r1), r0)
    cc0, cc1 = min(max(core[1][0], c0), c1), max(min(core[1][1], c1), c0)
    if cr0 >= cr1 or cc0 >= cc1:  # no overlap: the whole window is independent
        return [((r0, r1), (c0, c1))]
    rects = [((r0, cr0), (c0, c1)), ((cr1, r1), (c0, c1)), ((cr0, cr1), (c0, cc0)), ((cr0, cr1), (cc1, c1))]
    return [r for r in rects if r[0][0] < r[0][1] and r[1][0] < r[1][1]]


def _crop(t: torch.Tensor, rect: Rect, origin: tuple[int, int] = (0, 0)) -> torch.Tensor:
    (r0, r1), (c0, c1) = rect
    return t[..., r0 - origin[0] : r1 - origin[0], c0 - origin[1] : c1 - origin[1]]


def _inside(inner: Rect, outer: Rect) -> bool:
    return all(outer[i][0] <= inner[i][0] and inner[i][1] <= outer[i][1] for i in range(2))


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    """channels_last for channels_last maps and windows of them (channel stride 1), else NCHW."""
    if t.dim() == 4 and not t.is_contiguous() and (
        t.is_contiguous(memory_format=torch.channels_last) or (t.shape[1] > 1 and t.stride(1) == 1)
    ):
        return torch.channels_last
    return torch.contiguous_format


def _paste(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(src)`` (src broadcast over dst's batch), bit for bit. Where both are
    channels_last the copy moves each pixel's channels as 8-byte (else 4-byte) words: torch's
    strided CUDA copy handles an element per lane, and on the H200 the per-conv window copies of
    bf16 maps took 0.25 of 1.12 ms at batch 1 and 1.25 of 5.9 ms at batch 8 (75-80 copies,
    ~30% of the 4.25 TB/s measured there; benchmarks/results/h200-2026-12-04.json), where
    one word per lane moves 4x the bytes per instruction. On the CPU both copies run at the
    memory's speed (8 x 64 x 505^2 bf16 into a window: 16.2 ms either way, 2 threads)."""
    if (
        dst.dim() == 4 and src.dim() == 4 and dst.dtype == src.dtype and dst.shape[1] == src.shape[1] > 1
        and dst.stride(1) == 1 and src.stride(1) == 1
    ):  # fmt: skip
        for word in (torch.int64, torch.int32):
            if dst.shape[1] * dst.element_size() % word.itemsize:
                continue
            try:  # view(dtype) refuses offsets or strides that are no multiple of the word
                d, s = dst.permute(0, 2, 3, 1).view(word), src.permute(0, 2, 3, 1).view(word)
            except RuntimeError:
                continue
            d.copy_(s)
            return dst
    return dst.copy_(src)


def _dense(win: torch.Tensor) -> torch.Tensor:
    """A window (a view into a larger map) made contiguous in its own memory format by _paste,
    on CUDA, where a convolution would otherwise copy it with torch's per-element copy; the
    window itself elsewhere (the CPU's convolutions read it as it is)."""
    fmt = _memory_format(win)
    if not win.is_cuda or win.is_contiguous(memory_format=fmt):
        return win
    return _paste(torch.empty(win.shape, dtype=win.dtype, device=win.device, memory_format=fmt), win)


@dataclass
class _Entry:
    """The image-independent values for one key, as rings of (rect, (1, C, h, w) tensor) in map
    coordinates: ``rings[k]``, step k's input window minus what the previous step computes;
    ``outs[k]`` / ``switches[k]``, step k's whole output / switches minus what it computes,
    where they must be whole (None elsewhere)."""

    rings: list
    outs: list
    switches: list

    @property
    def nbytes(self) -> int:
        rings = [r for r in self.rings + self.outs + self.switches if r]
        return sum(t.numel() * t.element_size() for ring in rings for _, t in ring)


class DeadZoneCache:
    """A bounded, thread-safe LRU of image-independent values: at most ``maxsize`` entries and
    ``max_bytes`` bytes (the newest entry is always kept); ``nbytes`` is what it holds.

    One entry (``_Entry.nbytes``) for FCN-8s width 1, fp32: 14.0 MiB at 500x500 (10.0 MiB of
    1-2 px rings around the conv / pool windows, 4.0 MiB of pool3 and pool4 outside their
    dependent cores), 7.1 MiB at 224x224, 37.7 MiB at 1920x1080; bf16 halves these. The
    default bound (8 entries, 512 MiB) holds 8 shapes up to 1080p.
    """

    def __init__(self, maxsize: int = 8, max_bytes: int | None = 512 * 2**20):
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1; got {maxsize!r}")
        self.maxsize, self.max_bytes = maxsize, max_bytes
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def get(self, key, build: Callable[[], _Entry]) -> _Entry:
        """The entry for ``key``, built once by ``build()`` (concurrent callers of one key wait
        for the one build; other keys are not blocked)."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            key_lock = self._building.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._entries:
                    self._entries.move_to_end(key)
                    return self._entries[key]
            try:
                entry = build()
            finally:
                with self._lock:
                    self._building.pop(key, None)
            with self._lock:
                self._entries[key] = entry
                self._evict()
        return entry

    def _evict(self) -> None:
        while len(self._entries) > 1 and (
            len(self._entries) > self.maxsize
            or (self.max_bytes is not None and sum(e.nbytes for e in self._entries.values()) > self.max_bytes)
        ):
            self._entries.popitem(last=False)


class DeadZoneForward:
    """Runs a model's backbone steps computing only the image-dependent positions.

    ``fwd(x, feats, switches=None, image_size=None) -> h`` is a drop-in for
    ``run_steps(model, steps, x, feats, switches, pool_with_switches)``: x (N, C, H, W) is the
    backbone's input map, of which the top-left ``image_size`` (default: all) holds the image
    and the rest zeros (DeconvNet's padding); taps go to ``feats`` and switches to ``switches``
    as full maps, as run_steps puts them. Only the ``taps`` a caller reads are made whole
    (default: the sources of the taps of the model's heads where it has any, FCN-8s's pool3
    and pool4; else every tap of the steps): FCN-VGG's steps tap pool1 and pool2 too, which
    cached whole would cost 47 MB at 500x500. Convolutions run through the model's
    ``_conv_impls`` (``set_conv_impl``), else torch's own.

    ``enabled``: False runs the plain steps (ablation); None follows the module's ``ENABLED``.
    ``timer``: ``timer(fn, cuda) -> seconds``; with one, each new input is run both ways on its
    first call and the faster kept (``choice``): the fused CUDA backend passes its device timer.
    ``cache``: a DeadZoneCache to share (default: one per instance); ``align``: see
    DeadZonePlan. The convolutions run on windows of other shapes than the whole maps, plus
    once on the whole map per shape to fill the cache.
    """

    def __init__(
        self,
        model,
        steps: Sequence | None = None,
        *,
        pool_with_switches: Callable | None = None,
        enabled: bool | None = None,
        cache: DeadZoneCache | None = None,
        taps: Collection[str] | None = None,
        align: float = 0.02,
        timer: Callable[[Callable[[], object], bool], float] | None = None,
    ):
        self.model = model
        self.steps = tuple(model.backbone if steps is None else steps)
        if not self.steps:
            raise ValueError(f"{type(model).__name__} has no backbone steps to plan")
        other = [s for s in self.steps if not isinstance(s, (Conv, Pool, LRN))]
        if other:
            # FCN-GoogLeNet's Inception blocks: its image-independent work is 1.3% of its MACs at
            # 500x500, so it runs without the skip (has_dead_zone = False; models/googlenet.py).
            raise ValueError(
                f"{type(model).__name__}: the dead-zone planner runs chains of Conv, Pool and LRN "
                f"steps; {other[0]!r} is none of them"
            )
        self.pool_with_switches = pool_with_switches
        if taps is None:
            heads = model_heads(model)
            taps = {t.source for head in heads for t in head.taps} if heads else None
        step_taps = {s.tap for s in self.steps if isinstance(s, Pool) and s.tap is not None}
        self.taps = frozenset(step_taps if taps is None else taps)
        if not self.taps <= step_taps:
            raise ValueError(
                f"taps {sorted(self.taps - step_taps)} are not taps of these steps {sorted(step_taps)}"
            )
        self.enabled = enabled
        # timer(fn, cuda) -> seconds: each new input (shape, dtype, device, image size) is then
        # run both ways once and the faster kept (``choice``; ``times`` keeps the measurements).
        self.timer = timer
        self.choice: dict = {}
        self.times: dict = {}
        self.align = align
        self.cache = DeadZoneCache() if cache is None else cache
        names = [n for st in self.steps for n in (getattr(st, "name", None), getattr(st, "bn", None)) if n]
        self._step_modules = [getattr(model, n) for n in names]
        self._plans: dict = {}

    def plan(self, size: tuple[int, int], image_size: tuple[int, int] | None = None) -> DeadZonePlan:
        """The plan for an input map of ``size`` with the image at its top-left ``image_size``,
        for the conv impls set now (a conv_pool impl grows its conv's outputs: DeadZonePlan)."""
        conv_pools = conv_pool_steps(self.steps, getattr(self.model, "_conv_impls", {}))
        key = (tuple(size), tuple(image_size or size), conv_pools)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= 256:  # a stream of ever new sizes: plans are cheap to redo
                self._plans.clear()
            taps = [k for k, st in enumerate(self.steps) if isinstance(st, Pool) and st.tap in self.taps]
            plan = DeadZonePlan(
                self.model, self.steps, size, image_size, whole=taps, align=self.align, conv_pools=conv_pools
            )  # fmt: skip
            self._plans[key] = plan
        return plan

    def __call__(
        self, x: torch.Tensor, feats: dict, switches: dict | None = None, image_size=None
    ) -> torch.Tensor:
        enabled = ENABLED if self.enabled is None else self.enabled
        if not enabled:
            return run_steps(self.model, self.steps, x, feats, switches, self.pool_with_switches)
        if x.dim() != 4:
            raise ValueError(f"input must be a 4-d tensor (N, C, H, W); got shape {tuple(x.shape)}")
        if switches is None and any(isinstance(s, Pool) and s.switches is not None for s in self.steps):
            raise ValueError("these steps keep pooling switches: pass a dict as `switches`")
        if self.timer is not None and self._chosen(x, switches, image_size) == "whole":
            return run_steps(self.model, self.steps, x, feats, switches, self.pool_with_switches)
        return self._skip(x, feats, switches, image_size)

    def _chosen(self, x: torch.Tensor, switches, image_size) -> str:
        """"skip" or "whole" for this input, measured on its first call (``timer``).

        On an H200 (FCN-8s 500x500 bf16, benchmarks/results/h200-2026-12-04-r2.json) the whole
        maps were 4% faster at batch 1 (0.919 against 0.960 ms: the skip's window copies cost
        more there than the 31% of MACs it saves) and the skip 1.27x faster at batch 8 (4.67
        against 5.96 ms), so the faster way depends on the batch and the GPU, and is measured.
        A CUDA-graph capture never measures (it would synchronise): it takes the skip until a
        call outside a capture has measured. A whole-map run out of memory leaves the skip."""
        key = (tuple(x.shape), x.dtype, x.device, _memory_format(x),
               None if image_size is None else tuple(image_size))  # fmt: skip
        how = self.choice.get(key)
        if how is not None:
            return how
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return "skip"

        def scratch():
            return {} if switches is not None else None

        def skip():
            return self._skip(x, {}, scratch(), image_size)

        def whole():
            return run_steps(self.model, self.steps, x, {}, scratch(), self.pool_with_switches)

        times = {"skip": self.timer(skip, x.is_cuda)}
        try:
            times["whole"] = self.timer(whole, x.is_cuda)
        except torch.OutOfMemoryError:
            if x.is_cuda:
                torch.cuda.empty_cache()
        how = min(times, key=times.get)  # a tie keeps the skip (first)
        self.times[key], self.choice[key] = times, how
        return how

    def _skip(self, x: torch.Tensor, feats: dict, switches, image_size) -> torch.Tensor:
        plan = self.plan((x.shape[-2], x.shape[-1]), image_size)
        entry = self.cache.get(self._key(x, plan), lambda: self._build(x, plan))
        held = getattr(_held, "entries", None)
        if held is not None:
            held.append(entry)
        return self._run(x, plan, entry, feats, switches)

    @property
    def _step_tensors(self) -> list[torch.Tensor]:
        return [t for m in self._step_modules for t in (*m.parameters(), *m.buffers())]

    def _key(self, x: torch.Tensor, plan: DeadZonePlan) -> tuple:
        impls = getattr(self.model, "_conv_impls", {})
        # Weights and BatchNorm statistics changed in place (load_state_dict) bump _version;
        # replaced ones (fold_batchnorm) change data_ptr.
        weights = tuple((t.data_ptr(), tensor_version(t)) for t in self._step_tensors)
        autocast = torch.is_autocast_enabled(x.device.type) if x.device.type in ("cpu", "cuda") else False
        return (
            plan.size, plan.image_size, x.dtype, x.device, _memory_format(x), autocast,
            tuple(sorted((k, id(v)) for k, v in impls.items())), weights,
        )  # fmt: skip

    # -- the cache: one plain forward of the steps, keeping only what later calls need ---------

    def _build(self, x: torch.Tensor, plan: DeadZonePlan) -> _Entry:
        n = len(plan.steps)
        rings, outs, sws = [[] for _ in range(n)], [None] * n, [None] * n
        with torch.no_grad():
            h = torch.zeros_like(x[:1])
            for k, sp in enumerate(plan.steps):
                if not sp.empty and not _inside(sp.window, sp.avail):
                    rings[k] = _take(h, _ring(sp.window, sp.avail))
                sw: dict = {}
                h = run_steps(self.model, [sp.step], h, {}, sw, self.pool_with_switches)
                if k in plan.whole and not sp.full:
                    outs[k] = _take(h, _ring(sp.whole, sp.comp))
                if sw and not sp.full:
                    sws[k] = _take(next(iter(sw.values()))[0], _ring(sp.whole, sp.comp))
        return _Entry(rings, outs, sws)

    # -- the per-call forward ------------------------------------------------------------------

    def _run(self, x, plan, entry, feats, switches) -> torch.Tensor:
        n, h = x.shape[0], x
        fused = plan.fused
        for k, sp in enumerate(plan.steps):
            step = sp.step
            keeps_switches = isinstance(step, Pool) and step.switches is not None
            if sp.empty:
                out = _assemble(None, None, entry.outs[k], sp.whole, n)
                sw = _assemble(None, None, entry.switches[k], sp.whole, n) if keeps_switches else None
            else:
                if k - 1 in fused:
                    out, sw = h, None  # the conv before pooled its outputs: this pool's, at sp.comp
                else:
                    # h holds sp.avail: the whole map, or the previous step's computed outputs.
                    win = _assemble(h, sp.avail, entry.rings[k], sp.window, n)
                    out, sw = self._apply(step, win, sp, plan.steps[k + 1].step if k in fused else None)
                if sw is not None and not sp.full:
                    sw = _switches_to_map(sw, (sp.window[0][0], sp.window[1][0]), sp)
                    sw = _assemble(sw, sp.comp, entry.switches[k], sp.whole, n)
                if k in plan.whole and not sp.full:
                    out = _assemble(out, sp.comp, entry.outs[k], sp.whole, n)
            if keeps_switches:
                switches[step.switches] = (sw, (sp.rows.size, sp.cols.size))
            if isinstance(step, Pool) and step.tap in self.taps:
                feats[step.tap] = out
            h = out
        return h

    def _apply(self, step, win: torch.Tensor, sp: StepPlan, pool: Pool | None = None):
        """The step on its window: (computed outputs, their switches in window coords or None).
        ``pool``: the Pool step after a Conv step of ``DeadZonePlan.fused``, run in the conv
        impl's ``conv_pool``: the outputs are then the pool's computed ones."""
        if isinstance(step, Conv):
            (rlo, rhi), (clo, chi) = sp.rows.pad, sp.cols.pad
            sym = (min(rlo, rhi), min(clo, chi))
            extra = (clo - sym[1], chi - sym[1], rlo - sym[0], rhi - sym[0])
            if any(extra):
                win = F.pad(win, extra)
            win = _dense(win)
            impl = getattr(self.model, "_conv_impls", {}).get(step.name) or reference_conv(self.model, step)
            if pool is not None:
                return impl.conv_pool(win, sym, pool.kernel, pool.stride), None
            return impl(win, sym), None
        if isinstance(step, Pool):
            if step.switches is None:
                return max_pool(self.model, win, step), None
            if self.pool_with_switches is None:
                return F.max_pool2d(win, step.kernel, step.stride, ceil_mode=True, return_indices=True)
            return self.pool_with_switches(win, step.kernel, step.stride)
        return local_response_norm(getattr(self.model, step.name), win), None


def _switches_to_map(sw: torch.Tensor, origin: tuple[int, int], sp: StepPlan) -> torch.Tensor:
    """Switches computed on a window -> switches of the full pre-pool map. torch's are flat
    indices into the (pre-pool) plane: shift them by the window's corner. fastfcn's one-byte
    switches (dy * kernel + dx within the window) do not depend on where the window is: every
    window starts at a multiple of the stride, as in the full map."""
    if sw.dtype == torch.uint8:
        return sw
    width = sp.cols.clipped[1] - sp.cols.clipped[0]
    return (sw // width + origin[0]) * sp.cols.size + (sw % width + origin[1])


def _take(t: torch.Tensor, rects) -> list:
    """The cached values of ``rects`` of ``t`` (1, C, H, W): copies, so the map can be freed."""
    return [(r, _crop(t, r).clone()) for r in rects]


def _assemble(core, core_rect, ring, rect, n: int) -> torch.Tensor:
    """The values of ``rect`` (N, C, h, w): the cached ``ring`` (broadcast over the batch) with
    the dependent ``core`` (N, C, ...) at ``core_rect`` pasted in; a view where the core covers
    the rect."""
    if core is not None and _inside(rect, core_rect):
        return _crop(core, rect, (core_rect[0][0], core_rect[1][0]))
    like = core if core is not None else ring[0][1]
    (r0, r1), (c0, c1) = rect
    buf = torch.empty(
        (n, like.shape[1], r1 - r0, c1 - c0), dtype=like.dtype, device=like.device,
        memory_format=_memory_format(like),
    )  # fmt: skip
    origin = (r0, c0)
    for r, values in ring or ():
        _paste(_crop(buf, r, origin), values)
    if core is not None:
        inter = tuple((max(core_rect[i][0], rect[i][0]), min(core_rect[i][1], rect[i][1])) for i in range(2))
        if inter[0][0] < inter[0][1] and inter[1][0] < inter[1][1]:
            _paste(_crop(buf, inter, origin), _crop(core, inter, (core_rect[0][0], core_rect[1][0])))
    return buf


def deadzone_forward(model, steps: Sequence | None = None, **kwargs) -> DeadZoneForward:
    """``run = deadzone_forward(model)``; ``h = run(x, feats, switches)``: see DeadZoneForward."""
    return DeadZoneForward(model, steps, **kwargs)


__all__ = [
    "ENABLED", "FUSED_POOL", "DeadZoneCache", "DeadZoneForward", "DeadZonePlan", "DimPlan", "StepPlan",
    "conv_dim", "conv_pool_steps", "deadzone_forward", "pool_dim", "pool_out_size",
]  # fmt: skip
