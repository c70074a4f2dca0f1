"""The fused backend's CPU backbone: prepacked oneDNN convolutions with the ReLU fused.

Eager PyTorch on the CPU spends 84% of an FCN-8s forward in convolutions, 7% in
the separate ReLU passes and re-lays out every conv weight on every call (fc6
alone is 103 M weights, 411 MB in fp32). Here every Conv2d weight is reordered
once into oneDNN's blocked layout (``mkldnn._reorder_convolution_weight``) and
run by ``mkldnn._convolution_pointwise`` on channels_last activations with the
ReLU as a post-op, the same kernels inductor's freezing pass emits, without a
compile step and for any input size. The head runs through fastfcn.ops (the C++
twins on the CPU).

3x3 convolutions with >= 64 inputs and >= 128 outputs run through NNPACK (bundled
with PyTorch; Winograd F(6x6, 3x3) with AVX2 kernels), which needs fewer multiplies than
any direct convolution. Measured one layer at a time, 1 thread, CPU seconds, NNPACK vs
the prepacked oneDNN conv (500x500 FCN-8s shapes): 64->128 at 349x349 0.17 vs 0.27;
128->128 at 349x349 0.33-0.38 vs 0.58-0.77; 256->256 at 175x175 0.20 vs 0.57; 512->512 at
88x88 0.18 vs 0.61; but 64->64 at 698x698 0.52 vs 0.54 (no gain, and oneDNN fuses the
ReLU) and fc6 (7x7, 512->4096 at 22x22) 1.19 vs 0.81, hence the rule. NNPACK's error per
layer is ~2e-5 of the output's magnitude (vs ~1e-7 direct); end to end on FCN-8s it is
~4e-7 of the logit range. Should NNPACK refuse a call (it can for workspace reasons), that
call runs through torch's own conv2d instead.

``fast_forward(model)`` returns ``f(x, output)``: x float32 (N, 3, H, W) ->
the model's forward result. VGG-based FCNs get a dedicated forward with every
conv+ReLU fused; FCN-AlexNet keeps its forward with its Conv2d modules swapped
for prepacked ones (the ReLU stays separate there); DeconvNet and the dilated
nets keep torch's convolutions (see fast_forward for the measurements).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..heads import run_head
from ..models import FCN, FCNAlexNet, SegmentationModel


def mkldnn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class PackedConv2d(nn.Module):
    """A Conv2d whose weight is prepacked for oneDNN once; forward(x, relu=False).

    x: (N, C_in, H, W) float32, any layout (channels_last is the fast one) ->
    (N, C_out, H', W') channels_last.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"PackedConv2d needs numeric zero padding; got {conv.padding!r}")
        self.padding = list(conv.padding)
        self.stride = list(conv.stride)
        self.dilation = list(conv.dilation)
        self.groups = conv.groups
        w = conv.weight.detach()
        self.out_channels = w.shape[0]
        packed = torch.ops.mkldnn._reorder_convolution_weight(
            w, self.padding, self.stride, self.dilation, self.groups
        )
        self.register_buffer("weight", packed)
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())

    def forward(self, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
            "relu" if relu else "none", [], "",
        )  # fmt: skip


NNPACK_MIN_IN, NNPACK_MIN_OUT = 64, 128


def nnpack_available() -> bool:
    """Whether this torch build has NNPACK; the call also initialises it (required before use)."""
    return hasattr(torch, "_nnpack_available") and torch._nnpack_available()


class NNPackConv3x3(nn.Module):
    """A 3x3 stride-1 Conv2d through NNPACK; forward(x, relu=False).

    x: (N, C, H, W) (made contiguous NCHW, NNPACK's layout) -> (N, K, H', W') NCHW.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.padding = list(conv.padding)
        self.register_buffer("weight", conv.weight.detach().contiguous())
        b = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels, dtype=conv.weight.dtype)
        self.register_buffer("bias", b.detach().clone())

    def forward(self, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
        x = x.contiguous()
        try:
            # NNPACK's batched path is far slower than its batch-1 inference path: 256->256
            # at 128x128, batch 2, 2 threads: 0.74 s batched vs 2 x 0.086 s one image at a time.
            ys = [
                torch._nnpack_spatial_convolution(x[i : i + 1], self.weight, self.bias, self.padding, [1, 1])
                for i in range(x.shape[0])
            ]
            y = ys[0] if len(ys) == 1 else torch.cat(ys)
        except RuntimeError:
            y = F.conv2d(x, self.weight, self.bias, padding=self.padding)
        return y.relu_() if relu else y


def _nnpack_ok(conv: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
        and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str) and conv.weight.dtype == torch.float32
        and conv.in_channels >= NNPACK_MIN_IN and conv.out_channels >= NNPACK_MIN_OUT
    )  # fmt: skip


def _swap_convs(module: nn.Module) -> None:
    for name, child in module.named_children():
        if type(child) is nn.Conv2d:
            setattr(module, name, PackedConv2d(child))
        else:
            _swap_convs(child)


def _fcn_forward(m: FCN) -> Callable:
    blocks = [[getattr(m, n) for n in names] for names in m._convs]
    fc6, fc7, score_fr = m.fc6, m.fc7, m.score_fr

    def forward(x: torch.Tensor, output: str = "logits") -> torch.Tensor:
        m._check_input(x)
        size = (x.shape[-2], x.shape[-1])
        h = x.contiguous(memory_format=torch.channels_last)
        feats = {}
        for b, convs in enumerate(blocks, 1):
            for conv in convs:
                h = conv(h, relu=True)
            # Caffe ceil-mode pooling (FACTS.md); channels_last max pooling vectorises over C.
            h = F.max_pool2d(h, 2, 2, ceil_mode=True)
            feats[f"pool{b}"] = h
        h = fc7(fc6(h, relu=True), relu=True)  # dropout is the identity at inference
        return run_head(m.head, m, score_fr(h), feats, size, output, None)

    return forward


def fast_forward(model: SegmentationModel) -> Callable:
    """Prepack ``model`` (in place; fp32, eval, BatchNorm already folded) and return f(x, output).

    Other dtypes (bf16/fp16 have no fast oneDNN path on CPUs without AVX-512 BF16/FP16)
    and builds without oneDNN keep the model's own fused forward.
    """
    if not mkldnn_available() or next(model.parameters()).dtype != torch.float32:
        return model
    if isinstance(model, FCN):
        for names in model._convs:
            for name in names:
                if nnpack_available() and _nnpack_ok(getattr(model, name)):
                    setattr(model, name, NNPackConv3x3(getattr(model, name)))
        _swap_convs(model)
        return _fcn_forward(model)
    if isinstance(model, FCNAlexNet):
        _swap_convs(model)
    # DeconvNet and the dilated nets keep torch's own convolutions: with prepacked ones they
    # were slower (2 threads, fp32, median of 3: DeconvNet 224x224 b2 7.5 s vs 2.0 s unpacked,
    # eager reference 2.2 s; dilated-context 250x250 6.3 s vs 5.0 s, reference 5.0 s): their
    # pooling/unpooling and reflect padding hand NCHW maps to the next conv, and each layout
    # change costs a reorder inside oneDNN. FCN-AlexNet keeps channels_last throughout; there
    # prepacking measured 0.49-0.80 s vs 0.72-0.75 s unpacked at 500x500 (a noisy machine).
    return model
