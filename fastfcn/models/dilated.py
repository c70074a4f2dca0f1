"""The dilated-convolution front end and context module (Yu, Koltun).

Front end: VGG16 without pool4/pool5 and without padding; conv5_x dilation 2,
fc6 7x7 dilation 4, fc7 1x1, a final 1x1 to C ("final"); output stride 8. The
convolutions shrink the input by 372 px (2 x 186), so the input is
reflect-padded by 186 on each side as in the reference; H and W that are not
multiples of 8 get extra reflected rows/columns at the bottom/right up to the
next multiple of 8, and the x8 output is cropped back to H x W.

Context module (option context="basic" | "large"): 3x3 convs with dilations
1, 1, 2, 4, 8, 16, 1 and a 1x1, receptive field 67, on the front end's score
map reflect-padded by 33 (the layers themselves are unpadded), identity-initialised.
The final x8 upsampling is the bilinear grouped deconvolution k16 s8 pad 4.

Reflection needs a side of at least 2; a side of 1 is replicated instead, and
margins wider than the map are reflected repeatedly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..heads import HEADS, run_head
from .backbone import Conv, Pool, run_conv
from .common import FC_STEPS, SegmentationModel, make_upsampler, ops_impl, scaled
from .fcn import VGG_BLOCKS

MARGIN = 186
CONTEXT_MARGIN = 33
CONTEXT_DILATIONS = (1, 1, 2, 4, 8, 16, 1)
CONTEXT_NAMES = ("ctx_conv1_1", "ctx_conv1_2", "ctx_conv2_1", "ctx_conv3_1", "ctx_conv4_1", "ctx_conv5_1",
                 "ctx_fc1")  # fmt: skip
LARGE_MULT = (2, 2, 4, 8, 16, 32, 32)


# Symbolic pad widths (forward's bottom/right extra of < 8 rows) are assumed below this.
_SYMBOLIC_PAD_LIMIT = 4096


def _reflect_steps(top: int, bottom: int) -> int:
    """Reflections reflect_pad needs along one axis in the worst case (a side of 2, whose padded
    span grows slowest: 2 -> 4 -> 10 -> 28 ...)."""
    lo, hi, steps = 0, 1, 0
    while top or bottom:
        t, b = min(top, hi - lo), min(bottom, hi - lo)
        lo, hi, top, bottom, steps = lo - t, hi + b, top - t, bottom - b, steps + 1
    return steps


def _reflect_index(n, before, after, device) -> torch.Tensor:
    """Source rows of reflect_pad along one axis of length n: (before + n + after,) int64.

    The loop below, unrolled into tensor arithmetic so that n and after may be symbolic
    (torch.export): step i reflects the span [lo_i, hi_i] by min(remaining, hi_i - lo_i) on each
    side; an output position is mapped back through the steps in reverse. A side of 1 never
    grows (span 0) and the final clamp replicates it, as the loop does. Same values as the loop
    for symbolic pads up to _SYMBOLIC_PAD_LIMIT.
    """
    steps = _reflect_steps(*(v if isinstance(v, int) else _SYMBOLIC_PAD_LIMIT for v in (before, after)))
    zero = torch.zeros((), dtype=torch.long, device=device)
    lo, hi = zero, zero + (n - 1)
    t_rem, b_rem = zero + before, zero + after
    spans = []
    for _ in range(steps):
        spans.append((lo, hi))
        t, b = torch.minimum(t_rem, hi - lo), torch.minimum(b_rem, hi - lo)
        lo, hi, t_rem, b_rem = lo - t, hi + b, t_rem - t, b_rem - b
    p = torch.arange(before + n + after, device=device) - before
    for lo, hi in reversed(spans):
        p = torch.where(p < lo, 2 * lo - p, p)
        p = torch.where(p > hi, 2 * hi - p, p)
    return torch.minimum(p.clamp(min=0), zero + (n - 1))


def reflect_pad(x: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """Reflect padding of any width (repeated reflection); replicate for sides of length 1."""
    H, W = x.shape[-2:]
    if any(isinstance(v, torch.SymInt) for v in (H, W, top, bottom, left, right)):
        # Symbolic sizes (ONNX export): the loop's trip count depends on H and W, so gather the
        # same rows and columns by index instead.
        rows = _reflect_index(H, top, bottom, x.device)
        cols = _reflect_index(W, left, right, x.device)
        return x.index_select(-2, rows).index_select(-1, cols)
    while top or bottom or left or right:
        H, W = x.shape[-2:]
        mode_h = H > 1
        mode_w = W > 1
        t, b = (min(top, H - 1), min(bottom, H - 1)) if mode_h else (top, bottom)
        l, r = (min(left, W - 1), min(right, W - 1)) if mode_w else (left, right)
        if mode_h and mode_w:
            x = F.pad(x, (l, r, t, b), mode="reflect")
        else:
            if mode_w and (l or r):
                x = F.pad(x, (l, r, 0, 0), mode="reflect")
            elif l or r:
                x = F.pad(x, (l, r, 0, 0), mode="replicate")
            if mode_h and (t or b):
                x = F.pad(x, (0, 0, t, b), mode="reflect")
            elif t or b:
                x = F.pad(x, (0, 0, t, b), mode="replicate")
        top, bottom, left, right = top - t, bottom - b, left - l, right - r
    return x


def identity_init(conv: nn.Conv2d, generator: torch.Generator | None = None) -> None:
    """Identity initialisation of the context module (paper, eq. 4-5).

    k[b, a, centre] = C_out... : with c_in inputs and c_out outputs and C classes,
    k[b, a, t] = C / c_out where t is the centre tap and floor(a C / c_in) ==
    floor(b C / c_out); elsewhere a small noise (std 1e-3 * C / c_out) that
    breaks symmetry when channels are repeated.
    """
    c_out, c_in = conv.weight.shape[:2]
    C = min(c_in, c_out)
    with torch.no_grad():
        w = torch.zeros_like(conv.weight)
        if c_in != c_out:
            w.normal_(0, 1e-3 * C / c_out, generator=generator)
        a = torch.arange(c_in)
        b = torch.arange(c_out)
        match = (a.view(1, -1) * C // c_in) == (b.view(-1, 1) * C // c_out)
        kc = conv.weight.shape[-1] // 2
        w[:, :, kc, kc] = torch.where(match, torch.tensor(C / c_out), w[:, :, kc, kc])
        conv.weight.copy_(w)
        if conv.bias is not None:
            conv.bias.zero_()


class DilatedNet(SegmentationModel):
    """forward(x: (N, 3, H, W)) -> logits (N, C, H, W)."""

    def __init__(self, num_classes: int = 21, width: float = 1.0, context: str | None = None,
                 learnable_upsampling: bool = False, dropout: float = 0.5):  # fmt: skip
        if context not in (None, "basic", "large"):
            raise ValueError(f"context must be None, 'basic' or 'large'; got {context!r}")
        arch = "dilated-frontend" if context is None else "dilated-context"
        options = {"learnable_upsampling": learnable_upsampling, "dropout": dropout}
        if context is not None:
            options["context"] = context
        super().__init__(arch, num_classes, width, options)
        self.head = HEADS["dilated"]
        self.context = context
        c_in, steps = 3, []
        for b, (c, n) in enumerate(VGG_BLOCKS, 1):
            for i in range(1, n + 1):
                name = f"conv{b}_{i}"
                c_out = scaled(c, width)
                setattr(self, name, nn.Conv2d(c_in, c_out, 3, dilation=2 if b == 5 else 1))
                steps.append(Conv(name))
                c_in = c_out
            if b <= 3:  # no pool4 / pool5: output stride 8
                steps.append(Pool(2, 2))
        self.backbone = tuple(steps)
        c_fc = self._add_fc(c_in, 7, width, dropout, dilation=4)
        self.final = nn.Conv2d(c_fc, num_classes, 1)
        if context is not None:
            mult = (1,) * 7 if context == "basic" else LARGE_MULT
            c = num_classes
            for name, d, m in zip(CONTEXT_NAMES, CONTEXT_DILATIONS, mult):
                conv = nn.Conv2d(c, num_classes * m, 3, dilation=d)
                identity_init(conv)
                setattr(self, name, conv)
                c = num_classes * m
            self.ctx_final = nn.Conv2d(c, num_classes, 1)
            identity_init(self.ctx_final)
        self.upscore = make_upsampler(num_classes, 16, 8, learnable_upsampling, depthwise=True)
        ctx = tuple(Conv(n) for n in CONTEXT_NAMES) + (Conv("ctx_final", relu=False),) if context else ()
        self.extra_steps = FC_STEPS + (Conv("final", relu=False),) + ctx
        self.head_convs = frozenset({"ctx_final" if context else "final"})

    def forward(self, x: torch.Tensor, output: str = "logits") -> torch.Tensor:
        self._check_input(x)
        H, W = x.shape[-2:]
        eh, ew = -H % 8, -W % 8
        h = reflect_pad(x, MARGIN, MARGIN + eh, MARGIN, MARGIN + ew)
        h = self._fc(self.run_backbone(h, {}))
        score = run_conv(self, self.extra_steps[2], h)
        if self.context is not None:
            m = CONTEXT_MARGIN
            h = reflect_pad(score, m, m, m, m)
            for step in self.extra_steps[3:]:
                h = run_conv(self, step, h)
            score = h
        return run_head(self.head, self, score, {}, (H, W), output, ops_impl(self.impl))
