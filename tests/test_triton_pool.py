"""kernels/pool.py: max pooling without switches (the fused CUDA backbone's pool after a conv).

Exact: the maximum of bf16 / fp16 / fp32 values is one of them, so the kernel must equal
torch's max_pool2d(ceil_mode=True) bit for bit, NaN where torch has NaN. Runs in Triton's
interpreter without a GPU; shapes are small for it (~1 ms per tl op).
"""

import pytest
import torch
import torch.nn.functional as F

from fastfcn.kernels import pool

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _ref(x, k, s):
    return F.max_pool2d(x.float(), k, s, ceil_mode=True).to(x.dtype)


def _same(a, b):
    """Equal bit for bit where finite, infinite alike, NaN at the same places."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(
    "shape,k,s",
    [
        ((2, 64, 9, 11), 2, 2),  # odd sizes: the ceil-mode border windows are clipped
        ((1, 3, 7, 5), 3, 2),  # FCN-AlexNet's 3x3/2, channels below one vector
        ((2, 130, 6, 6), 2, 2),  # channels past one tile of 128
        ((1, 16, 4, 4), 2, 1),  # overlapping windows
        ((3, 8, 1, 1), 2, 2),  # a 1x1 map: one clipped window
    ],
)
@pytest.mark.parametrize("channels_last", [True, False])
def test_equals_torch(dtype, shape, k, s, channels_last):
    g = torch.Generator().manual_seed(sum(shape) + k)
    x = (torch.randn(shape, generator=g) * 10).to(dtype).to(DEV)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    got = pool.max_pool2d(x, k, s)
    _same(got, _ref(x, k, s))
    # the output keeps the input's layout (the next conv reads channels_last without a copy)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert got.is_contiguous(memory_format=fmt)


def test_window_of_a_larger_map_without_a_copy():
    """A strided view (the dead-zone skip's window of a conv output) pools as its copy would,
    with NaN winning and -inf kept (torch's rule)."""
    g = torch.Generator().manual_seed(3)
    big = (
        torch.randn(2, 32, 20, 20, generator=g)
        .bfloat16()
        .to(DEV)
        .contiguous(memory_format=torch.channels_last)
    )
    big[0, 3, 4, 6] = float("nan")
    big[1, :, 3:5, 5:7] = float("-inf")
    view = big[:, :, 3:14, 5:17]
    assert not view.is_contiguous(memory_format=torch.channels_last)
    got = pool.max_pool2d(view, 2, 2)
    want = _ref(view, 2, 2)
    assert int(got.isnan().sum()) == 1 and bool(torch.isneginf(got).any())
    _same(got, want)


def test_int64_indexing_path(monkeypatch):
    """Past int32 offsets the kernel indexes in int64 (a map that large does not fit a test:
    the limit is lowered so this small map takes the int64 path, which must give the same)."""
    x = torch.randn(2, 24, 9, 7, generator=torch.Generator().manual_seed(5)).to(DEV)
    x = x.contiguous(memory_format=torch.channels_last)
    seen = []
    launch = pool.max_pool_kernel

    class Spy:
        def __getitem__(self, grid):
            def run(*args, **kw):
                seen.append(kw["INT64"])
                return launch[grid](*args, **kw)

            return run

    monkeypatch.setattr(pool, "max_pool_kernel", Spy())
    a = pool.max_pool2d(x, 2, 2)
    monkeypatch.setattr(pool, "INT32_LIMIT", 1000)
    b = pool.max_pool2d(x, 2, 2)
    assert seen == [False, True]
    _same(a, _ref(x, 2, 2))
    _same(b, a)


def test_bad_input_is_refused_with_the_reason():
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        pool.max_pool2d(x[0], 2, 2)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        pool.max_pool2d(x.double(), 2, 2)
    with pytest.raises(ValueError, match="kernel and stride"):
        pool.max_pool2d(x, 0, 2)
    with pytest.raises(ValueError, match="too small"):
        pool.max_pool2d(x[..., :0, :], 2, 2)
    assert pool.max_pool2d(x[:0], 2, 2).shape == (0, 4, 3, 3)  # an empty batch is no error
