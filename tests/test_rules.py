"""The small rules defined once and shared: pooled sizes, the switch window, the labels dtype, the
kind/output codes the C++ and Triton kernels take (kernels/structure.py), and the atomic write
(fastfcn/paths.py)."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import cpu_twin_available

import fastfcn.ops as ops
from fastfcn.kernels import reference as ref
from fastfcn.kernels import structure as st
from fastfcn.paths import TMP_TAG, atomic_path

HEADER = Path(__file__).resolve().parents[1] / "kernels" / "cpu" / "fcn_ops.h"


# ------------------------------------------------------------------------------ pooled sizes


@pytest.mark.parametrize("ceil_mode", [True, False])
def test_pool_out_size_matches_torch(ceil_mode):
    """Every size 1..70 against max_pool2d for kernels and strides 1..4 (padding 0)."""
    checked = 0
    for kernel in range(1, 5):
        for stride in range(1, 5):
            for size in range(kernel, 71):  # torch refuses inputs smaller than the kernel
                want = F.max_pool2d(torch.zeros(1, 1, 1, size), (1, kernel), (1, stride), ceil_mode=ceil_mode)
                got = st.pool_out_size(size, kernel, stride, ceil_mode)
                assert got == want.shape[-1], (size, kernel, stride)
                checked += 1
    assert checked == 16 * 71 - 4 * (1 + 2 + 3 + 4)  # the whole grid ran


def test_pool_out_size_ceil_drops_a_window_starting_past_the_input():
    # kernel 1, stride 2, size 4: Caffe's plain ceil gives 3 windows (0, 2, 4); torch drops the
    # one at 4, which starts past the input.
    assert st.pool_out_size(4, 1, 2, ceil_mode=True) == 2
    assert st.pool_out_size(5, 2, 2, ceil_mode=True) == 3 and st.pool_out_size(5, 2, 2, ceil_mode=False) == 2
    assert st.pool_out_size(1, 2, 2, ceil_mode=True) == 1  # the reference nets' 2x2/2 on a 1-pixel map
    assert st.pool_out_size(1, 3, 2, ceil_mode=False) < 1  # no output: the callers raise


def test_every_pooling_implementation_uses_the_rule():
    x = torch.randn(1, 2, 7, 13)
    values, switches = ops.max_pool2d_with_switches(x, 3, 2, True, impl="reference")
    assert values.shape[-2:] == (st.pool_out_size(7, 3, 2), st.pool_out_size(13, 3, 2)) == (3, 6)
    if cpu_twin_available():
        assert ops.max_pool2d_with_switches(x, 3, 2, True, impl="cpu")[0].shape == values.shape
    with pytest.raises(ValueError, match="too small for 3x3 pooling"):
        ops.max_pool2d_with_switches(torch.randn(1, 1, 1, 2), 3, 2, False, impl="reference")


@pytest.mark.parametrize(
    "kernel, stride, ok", [(16, 16, True), (17, 17, False), (2, 0, False), (0, 1, False)],
    ids=["16x16", "17x17", "stride0", "kernel0"],
)
def test_switch_window_fits_a_byte(kernel, stride, ok):
    x = torch.randn(1, 1, 40, 40, generator=torch.Generator().manual_seed(0))
    impls = ["reference"] + (["cpu"] if cpu_twin_available() else [])
    if ok:  # the largest window whose switch (dy * kernel + dx <= 255) fits a byte
        st.check_switch_window(kernel, stride)
        values, idx = F.max_pool2d(x, kernel, stride, ceil_mode=True, return_indices=True)
        for impl in impls:
            v, sw = ops.max_pool2d_with_switches(x, kernel, stride, impl=impl)
            assert torch.equal(v, values) and int(sw.max()) >= kernel  # rows past the first are stored
            assert torch.equal(ops.max_unpool2d(v, sw, (40, 40), kernel, stride, impl=impl),
                               F.max_unpool2d(values, idx, kernel, stride, output_size=(40, 40)))
        return
    with pytest.raises(ValueError, match=r"kernel\*kernel <= 256 \(one byte per switch\); got kernel"):
        st.check_switch_window(kernel, stride)
    for impl in impls:
        with pytest.raises(ValueError, match="one byte per switch"):
            ops.max_pool2d_with_switches(x, kernel, stride, impl=impl)


# ------------------------------------------------------------------------------ labels dtype


@pytest.mark.parametrize("c, dtype", [(1, torch.uint8), (256, torch.uint8), (257, torch.int32)])
def test_labels_dtype_at_the_byte_boundary(c, dtype):
    assert st.labels_dtype(c) == dtype
    y = torch.randn(1, c, 3, 4)
    y[0, c - 1] += 100  # the last class wins everywhere: 255 fits a byte, 256 does not
    labels = ref.finish(y, "labels")
    assert labels.dtype == dtype and bool((labels == c - 1).all())


@pytest.mark.parametrize("c", [256, 257])
def test_labels_dtype_is_what_every_implementation_returns(c):
    x = torch.randn(1, c, 2, 3)
    w = st.bilinear_weight(c, 4, depthwise=True)
    impls = ["reference"] + (["cpu"] if cpu_twin_available() else [])
    for impl in impls:
        out = ops.upsample_crop(x, w, 2, 1, (3, 5), "labels", impl=impl)
        assert out.dtype == st.labels_dtype(c), impl
    assert torch.equal(ops.upsample_crop(x, w, 2, 1, (3, 5), "labels", impl=impls[-1]),
                       ops.upsample_crop(x, w, 2, 1, (3, 5), "labels", impl="reference"))  # fmt: skip


# ------------------------------------------------------------------------------ kind and output codes


def _enum(name: str) -> dict[str, int]:
    body = re.search(r"enum " + name + r" : int \{([^}]*)\}", HEADER.read_text()).group(1)
    return {k.strip(): int(v) for k, v in (item.split("=") for item in body.split(","))}


def test_codes_match_the_cpp_header():
    assert _enum("Kind") == {f"KIND_{k.upper()}": v for k, v in st.KIND_CODES.items()}
    assert _enum("Output") == {"OUT_LOGITS": st.OUT_LOGITS, "OUT_LABELS_U8": st.OUT_LABELS_U8,
                               "OUT_LABELS_I32": st.OUT_LABELS_I32, "OUT_PROBS": st.OUT_PROBS}  # fmt: skip
    assert tuple(st.KIND_CODES) == st.KINDS


def test_output_code():
    assert st.output_code("logits", 21) == st.OUT_LOGITS
    assert st.output_code("labels", 256) == st.OUT_LABELS_U8
    assert st.output_code("labels", 257) == st.OUT_LABELS_I32
    assert st.output_code("probs", 300) == st.OUT_PROBS
    with pytest.raises(ValueError, match=r"one of \('logits', 'labels', 'probs'\); got 'argmax'"):
        st.output_code("argmax", 21)
    with pytest.raises(ValueError, match="got 'Labels'"):
        st.check_output("Labels")
    for out in st.OUTPUTS:
        st.check_output(out)


# ------------------------------------------------------------------------------ atomic write


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_path_replaces_on_success(tmp_path):
    path = tmp_path / "sub" / "out.png"  # the folder is created
    with atomic_path(path) as tmp:
        assert tmp.parent == path.parent and tmp.suffix == ".png" and TMP_TAG in tmp.name
        assert not path.exists()
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and _listing(path.parent) == ["out.png"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_atomic_path_keeps_the_old_file_on_failure(tmp_path, error):
    path = tmp_path / "out.json"
    path.write_text("old")
    with pytest.raises(type(error)):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise error
    assert path.read_text() == "old" and _listing(tmp_path) == ["out.json"]


def test_atomic_path_names_are_unique(tmp_path):
    with atomic_path(tmp_path / "a.bin") as t1, atomic_path(tmp_path / "a.bin") as t2:
        assert t1 != t2
        t1.write_bytes(b"1")
        t2.write_bytes(b"2")
    assert (tmp_path / "a.bin").read_bytes() == b"1"  # the outer block finishes last
    assert _listing(tmp_path) == ["a.bin"]


def test_atomic_path_durable_keeps_the_mode(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"old")
    os.chmod(path, 0o640)
    with atomic_path(path, durable=True) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)  # as mkstemp-based writers leave it
        os.write(fd, b"new")
        os.close(fd)
    assert path.read_bytes() == b"new" and stat.S_IMODE(path.stat().st_mode) == 0o640
    fresh = tmp_path / "fresh.pt"
    with atomic_path(fresh, durable=True) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask
