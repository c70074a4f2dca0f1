"""Training-only BatchNorm: added after every backbone convolution, folded away in every saved model.

The reference FCNs have no normalisation: they start from ImageNet VGG weights. From scratch,
a plain 15-layer stack learns slowly; BatchNorm during training, folded into the convolutions
afterwards (``fastfcn.models.fold_batchnorm``), gives back the exact reference architecture.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..models import fold_batchnorm


class ConvBN(nn.Module):
    """A convolution followed by a training-only BatchNorm (see ``add_batchnorm``)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv, self.bn = conv, nn.BatchNorm2d(conv.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    def bn_pairs(self) -> list[tuple[str, str]]:
        """The (conv, BatchNorm) pair ``fold_batchnorm`` merges."""
        return [("conv", "bn")]


def add_batchnorm(model: nn.Module) -> list[str]:
    """Put a BatchNorm after every backbone convolution (``conv*``, ``fc*``, FCN-GoogLeNet's
    ``inception_*``) for training; returns the wrapped module names."""
    backbone = ("conv", "fc", "inception_")
    names = [n for n, m in model.named_children() if isinstance(m, nn.Conv2d) and n.startswith(backbone)]
    for n in names:
        setattr(model, n, ConvBN(getattr(model, n)))
    return names


def fold_added_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every ConvBN back into a plain convolution with the BN's running statistics (exact in eval)."""
    for n, m in list(model.named_children()):
        if isinstance(m, ConvBN):
            setattr(model, n, fold_batchnorm(m).conv)
    return model


def plain_copy(model: nn.Module) -> nn.Module:
    """The model as the reference architecture: a deep copy with any training BatchNorm folded."""
    m = copy.deepcopy(model).cpu()
    if any(isinstance(c, ConvBN) for c in m.children()):
        m.eval()
        fold_added_batchnorm(m)
    return m
