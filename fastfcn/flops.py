"""Count the multiply-accumulates of a model's layers for a given input size.

    count = fastfcn.flops.count_macs(model, (1, 3, 500, 500))
    count.gmac, count.gflop              # FCN-8s width 1: 181.5 GMAC, 363 GFLOP
    print(count.table())                 # per layer

Counted from the layers, never typed in: forward hooks on Conv2d,
ConvTranspose2d and Linear read the shapes each call actually sees. The
FCN heads run their upsampling weights through functional ops
(``fastfcn.ops.fcn_head``), not through the ConvTranspose2d modules, so
functional conv / conv_transpose calls made outside any hooked module are
counted too and named after the parameter they use.

By default the forward runs on the ``meta`` device (shapes only: FCN-8s at
1080p costs no arithmetic); an op without a meta kernel falls back to one
real CPU forward at batch 1, scaled by N (every counted layer is linear in N).
The count is that of the reference forward (dense transposed convolutions):
the fused 4-tap bilinear path does less work (upscore8 at 500x500: 27 vs 553
MMAC), which the floor computed from this count deliberately ignores
(0.3% of FCN-8s' total).

Beside the nominal count, ``computed_macs`` is what the runtime computes with the
image-independent positions skipped (``fastfcn.runtime.deadzone``): each backbone conv
counted over the outputs it computes per call (the image-dependent ones, and before a pool
the few independent ones the pool's window reads). FCN-8s: 125.6 of 181.5 GMAC at 500x500
(56.0 skipped, 31%), 31.5 of 62.9 at 224x224 (50%), 936.5 of 1082.1 at 1920x1080 (13.5%).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

_CONV_FUNCS = {F.conv2d, torch.conv2d}
_DECONV_FUNCS = {F.conv_transpose2d, torch.conv_transpose2d}


@dataclass
class LayerCount:
    """One counted call: name (module or parameter path), kind, MACs, shapes."""

    name: str
    kind: str
    macs: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    computed_macs: int | None = None  # with the image-independent positions skipped; None: all

    @property
    def computed(self) -> int:
        return self.macs if self.computed_macs is None else self.computed_macs


@dataclass
class FlopCount:
    """MACs of one forward at ``input_size``; a FLOP is 2 MACs (multiply + add)."""

    input_size: tuple[int, ...]
    layers: list[LayerCount] = field(default_factory=list)
    method: str = "meta"

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def flops(self) -> int:
        return 2 * self.macs

    @property
    def computed_macs(self) -> int:
        """MACs actually computed when the runtime skips the image-independent positions."""
        return sum(layer.computed for layer in self.layers)

    @property
    def gmac(self) -> float:
        return self.macs / 1e9

    @property
    def computed_gmac(self) -> float:
        return self.computed_macs / 1e9

    @property
    def gflop(self) -> float:
        return self.flops / 1e9

    def by_group(self) -> dict[str, int]:
        """MACs summed per block: conv3_2 -> conv3, deconv4_1 -> deconv4; other layers by name."""
        out: dict[str, int] = {}
        for layer in self.layers:
            key = layer.name.removesuffix(".weight")
            key = re.sub(r"^((?:de)?conv\d+)_\d+$", r"\1", key)
            out[key] = out.get(key, 0) + layer.macs
        return out

    def table(self) -> str:
        lines = [f"{'layer':<24} {'kind':<16} {'output':<24} {'MMAC':>12} {'computed':>12}"]
        for layer in self.layers:
            lines.append(
                f"{layer.name:<24} {layer.kind:<16} {str(layer.output_shape):<24} {layer.macs / 1e6:>12.1f}"
                f" {layer.computed / 1e6:>12.1f}"
            )
        lines.append(
            f"{'total':<24} {'':<16} {'':<24} {self.macs / 1e6:>12.1f} {self.computed_macs / 1e6:>12.1f}"
        )
        return "\n".join(lines)


def _conv_macs(out: torch.Tensor, weight_shape) -> int:
    # Conv2d weight (out, in / groups, kh, kw): each output element costs in/groups * kh * kw MACs.
    return out.numel() * weight_shape[1] * weight_shape[2] * weight_shape[3]


def _deconv_macs(inp: torch.Tensor, weight_shape) -> int:
    # ConvTranspose2d weight (in, out / groups, kh, kw): each input element scatters into
    # out/groups * kh * kw outputs (FCN-8s upscore8, 21 classes, 70x70 in: 21*21*16*16*4900 = 553 MMAC).
    return inp.numel() * weight_shape[1] * weight_shape[2] * weight_shape[3]


class _FunctionalCounter(TorchFunctionMode):
    """Counts conv / conv_transpose calls that no hooked module is running."""

    def __init__(self, counter: _Counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.counter.depth == 0 and (func in _CONV_FUNCS or func in _DECONV_FUNCS):
            x = args[0] if args else kwargs["input"]
            w = args[1] if len(args) > 1 else kwargs["weight"]
            name = self.counter.param_names.get(id(w), f"functional{len(self.counter.layers)}")
            if func in _CONV_FUNCS:
                kind, macs = "conv2d", _conv_macs(out, w.shape)
            else:
                kind, macs = "conv_transpose2d", _deconv_macs(x, w.shape)
            self.counter.layers.append(LayerCount(name, kind, macs, tuple(x.shape), tuple(out.shape)))
        return out


class _Counter:
    def __init__(self):
        self.layers: list[LayerCount] = []
        self.depth = 0  # > 0 while a hooked module's forward runs
        self.param_names: dict[int, str] = {}

    def pre(self, module, inputs):
        self.depth += 1

    def post(self, name):
        def hook(module, inputs, out):
            self.depth -= 1
            x = inputs[0]
            if isinstance(module, nn.Conv2d):
                kind, macs = "Conv2d", _conv_macs(out, module.weight.shape)
            elif isinstance(module, nn.ConvTranspose2d):
                kind, macs = "ConvTranspose2d", _deconv_macs(x, module.weight.shape)
            else:
                kind, macs = "Linear", out.numel() * module.in_features
            self.layers.append(LayerCount(name, kind, macs, tuple(x.shape), tuple(out.shape)))

        return hook


_HOOKED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def _run(model: nn.Module, x: torch.Tensor, state: dict | None) -> list[LayerCount]:
    counter = _Counter()
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, _HOOKED):
            handles.append(m.register_forward_pre_hook(counter.pre))
            handles.append(m.register_forward_hook(counter.post(name)))
    try:
        with torch.no_grad(), _FunctionalCounter(counter):
            if state is None:
                counter.param_names = {id(p): n for n, p in model.named_parameters()}
                model(x)
            else:
                counter.param_names = {id(t): n for n, t in state.items()}
                torch.func.functional_call(model, state, (x,))
    finally:
        for h in handles:
            h.remove()
    return counter.layers


def _skip_dead_zone(model: nn.Module, size: tuple[int, ...], layers: list[LayerCount], conv_pool: bool):
    """Set ``computed_macs`` of the backbone convs to their image-dependent outputs' share."""
    if not getattr(model, "has_dead_zone", False):
        return  # the dilated nets reflect-pad: every position depends on the image
    streams = model.backbone_streams() if hasattr(model, "backbone_streams") else {"": model.backbone}
    for steps in streams.values():  # late fusion: one backbone per modality
        _skip_stream(model, steps, size, layers, conv_pool)


def _skip_stream(model: nn.Module, steps, size: tuple[int, ...], layers: list[LayerCount], conv_pool: bool):
    by_name = {layer.name: layer for layer in layers}
    first = by_name.get(getattr(steps[0], "name", None)) if steps else None
    if first is None:
        return
    from .runtime.deadzone import DeadZonePlan, conv_pool_steps  # the planner's geometry is pure ints

    # The first step's input is the backbone's map (DeconvNet: the image zero-padded bottom-right).
    mh, mw = first.input_shape[-2:]
    pools = conv_pool_steps(steps) if conv_pool else ()
    plan = DeadZonePlan(model, steps, (mh, mw), (min(size[2], mh), min(size[3], mw)), conv_pools=pools)
    for sp in plan.steps:
        layer = by_name.get(getattr(sp.step, "name", None))
        if layer is not None and layer.kind == "Conv2d":
            # Every output position costs the same, so the share is exact in integers.
            (r0, r1), (c0, c1) = sp.comp
            layer.computed_macs = layer.macs * (r1 - r0) * (c1 - c0) // (sp.rows.out_size * sp.cols.out_size)


def count_macs(
    model: nn.Module, input_size, *, device: str = "meta", skip_dead_zone: bool = True,
    conv_pool: bool = False,
) -> FlopCount:
    """MACs of ``model``'s forward on an input of ``input_size`` = (N, 3, H, W).

    The model is run in eval mode (dropout off, BatchNorm on running stats) and,
    for fastfcn models, in reference mode; its own mode and impl are restored.
    device="meta" (default) needs no arithmetic; device="cpu" runs one real
    forward at batch 1 and scales by N. ``skip_dead_zone``: fill ``computed_macs``
    with the work of the image-dependent positions only (False: equal to ``macs``). ``conv_pool``:
    count the skip as it runs where every conv before a 2x2/2 pool has the pool in its epilogue
    (the fused CUDA backend; runtime/deadzone.py, DeadZonePlan's ``conv_pools``): a few more
    outputs of those convs (FCN-8s 500x500: 126.28 GMAC computed instead of 125.57).
    """
    size = tuple(int(s) for s in input_size)
    if len(size) != 4 or min(size) < 1:
        raise ValueError(f"input_size must be (N, C, H, W) with every entry >= 1; got {input_size!r}")
    was_training = model.training
    impl = getattr(model, "impl", None)
    model.eval()
    if impl is not None and hasattr(model, "set_impl"):
        model.set_impl("reference")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    try:
        if device == "meta":
            try:
                state = {
                    n: torch.empty_like(t, device="meta")
                    for n, t in [*model.named_parameters(), *model.named_buffers()]
                }
                layers = _run(model, torch.empty(size, device="meta", dtype=dtype), state)
                if skip_dead_zone:
                    _skip_dead_zone(model, size, layers, conv_pool)
                return FlopCount(size, layers, "meta")
            except (NotImplementedError, RuntimeError):
                pass  # an op without a meta kernel: count with a real forward instead
        ref = next(model.parameters())
        x = torch.zeros((1, *size[1:]), device=ref.device, dtype=dtype)
        layers = _run(model, x, None)
        n = size[0]
        scaled = [
            LayerCount(c.name, c.kind, c.macs * n, (n, *c.input_shape[1:]), (n, *c.output_shape[1:]))
            for c in layers
        ]
        if skip_dead_zone:
            _skip_dead_zone(model, size, scaled, conv_pool)
        return FlopCount(size, scaled, "real-batch1-scaled")
    finally:
        model.train(was_training)
        if impl is not None and hasattr(model, "set_impl"):
            model.set_impl(impl)


__all__ = ["FlopCount", "LayerCount", "count_macs"]
