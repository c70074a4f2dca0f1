"""Fused mode (heads and unpooling through fastfcn.ops) equals reference mode, for every arch.

The backbones run the same torch convolutions in both modes, so any difference comes from the
fused ops: their fp32 sums over at most C * ceil(k/s)^2 products per stage in another order.
"""

import pytest
import torch
from helpers import cpu_twin_available, randomize_batchnorm

import fastfcn.models as models

# "fused" lets fastfcn.ops pick (Triton on CUDA, C++ on CPU, else the reference with a warning)
IMPLS = [
    "fused",
    "triton",
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(not cpu_twin_available(), reason="fastfcn.kernels.cpu is not built here"),
    ),
]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# odd sizes: every ceil-mode border window and crop offset is exercised
SIZES = {"deconvnet": (35, 29)}
DEFAULT_SIZE = (19, 27)


def _model(arch):
    torch.manual_seed(0)
    m = models.build(arch, num_classes=5, width=0.125).eval()
    # random BatchNorm statistics, so the unpooled maps have both signs (the fused relu matters)
    return randomize_batchnorm(m, var=(0.5, 1.5), affine=False)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", models.available())
def test_fused_equals_reference(arch, impl):
    m = _model(arch)
    dev = "cpu" if impl == "cpu" else DEV
    m = m.to(dev)
    H, W = SIZES.get(arch, DEFAULT_SIZE)
    x = torch.randn(1, m.in_channels, H, W, generator=torch.Generator().manual_seed(1)).to(dev) * 50
    with torch.no_grad():
        want = m.set_impl("reference")(x).float()
        got = m.set_impl(impl)(x).float()
        labels = m(x, output="labels")
    assert got.shape == want.shape == (1, 5, H, W)
    # fp32 sums in another order: a few ulps of the largest logit per stage (<= 4 stages)
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=0, atol=64 * torch.finfo(torch.float32).eps * scale)
    # Per head for two-headed nets (SIFT Flow): labels (1, heads, H, W), ids within each head.
    heads = models.output_heads(m.config)
    parts = torch.split(want, [c for _, c in heads], 1) if heads else [want]
    labels = labels if heads else labels.unsqueeze(1)
    assert labels.shape == (1, len(parts), H, W)
    for i, part in enumerate(parts):
        top2 = part.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-4 * scale
        assert clear.float().mean() > 0.9
        assert torch.equal(labels[:, i].long()[clear], part.argmax(1)[clear])
