"""The CUDA-side runtime logic, tested without a GPU: CUDA-graph capture (thread-local, one
process-wide lock, out-of-memory during capture), precision flags per Segmenter, one cuDNN
setting for every backend, independent compile backends, and the CUDA conv epilogues
(which implementation is chosen, fallbacks when cuDNN's fused op is missing or refuses)."""

import dataclasses
import gc
import types
import weakref
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

import fastfcn
from fastfcn.models import build
from fastfcn.runtime import backends, cuda_fast, cuda_graphs, segmenter
from fastfcn.runtime.execution import ExecutionPlan


def _images(n, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), generator=g, dtype=torch.uint8)


# ------------------------------------------------------------------ CUDA graphs


def test_is_oom_recognises_untyped_capture_errors():
    assert cuda_graphs.is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert cuda_graphs.is_oom(RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be ..."))
    assert cuda_graphs.is_oom(RuntimeError("operation failed: cudaErrorMemoryAllocation"))
    assert not cuda_graphs.is_oom(RuntimeError("operation not permitted when stream is capturing"))
    assert not cuda_graphs.is_oom(ValueError("out of memory"))


def _fake_graph_cm(calls, end_error=None):
    @contextmanager
    def graph(g, pool=None, stream=None, capture_error_mode="global"):
        calls.append({"mode": capture_error_mode, "locked": cuda_graphs.CAPTURE_LOCK.locked()})
        yield
        if end_error is not None:
            raise end_error  # as capture_end does

    return graph


def test_capture_is_thread_local_under_the_process_lock(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "graph", _fake_graph_cm(calls))
    seen = []
    out = cuda_graphs.capture(object(), lambda: seen.append(cuda_graphs.CAPTURE_LOCK.locked()) or 7, 0, 0)
    assert out == 7 and seen == [True]
    assert calls == [{"mode": "thread_local", "locked": True}]
    assert not cuda_graphs.CAPTURE_LOCK.locked()


def test_oom_at_capture_end_becomes_out_of_memory_error(monkeypatch):
    calls = []
    err = RuntimeError("CUDA error: out of memory")
    monkeypatch.setattr(torch.cuda, "graph", _fake_graph_cm(calls, err))
    with pytest.raises(torch.cuda.OutOfMemoryError, match="during CUDA graph capture"):
        cuda_graphs.capture(object(), lambda: 1, None, None)
    assert not cuda_graphs.CAPTURE_LOCK.locked()
    other = RuntimeError("CUDA error: operation not permitted when stream is capturing")
    monkeypatch.setattr(torch.cuda, "graph", _fake_graph_cm(calls, other))
    with pytest.raises(RuntimeError, match="not permitted") as ei:
        cuda_graphs.capture(object(), lambda: 1, None, None)
    assert not isinstance(ei.value, torch.cuda.OutOfMemoryError)


def test_oom_hidden_by_capture_ends_own_error_is_still_out_of_memory(monkeypatch):
    """torch.cuda.graph's __exit__ runs capture_end after the captured code raised; capture_end's
    error (capture invalidated) then carries the out-of-memory only as its __context__."""

    @contextmanager
    def graph(g, pool=None, stream=None, capture_error_mode="global"):
        try:
            yield
        finally:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    def body():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    monkeypatch.setattr(torch.cuda, "graph", graph)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="during CUDA graph capture"):
        cuda_graphs.capture(object(), body, None, None)

    def other():
        raise RuntimeError("an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="previous error") as ei:
        cuda_graphs.capture(object(), other, None, None)
    assert not isinstance(ei.value, torch.cuda.OutOfMemoryError)


def test_untyped_oom_from_a_capture_halves_the_batch(monkeypatch):
    """CudaGraphRunner.split treats capture_end's untyped out-of-memory like any other: halve and retry."""
    seg = fastfcn.Segmenter(build("fcn32s", 21, 0.0625).eval(), device="cpu", backend="torch")
    # The CUDA runner's logic on the CPU: graphs on, replay faked.
    runner = cuda_graphs.CudaGraphRunner(seg._forward, dataclasses.replace(seg.execution, cuda_graphs=True))
    sizes = []

    def replay(t, kind, output):
        sizes.append(t.shape[0])
        if t.shape[0] > 1:
            raise RuntimeError("CUDA error: out of memory")  # as capture_end raises it
        return seg._forward(t, kind, output)

    monkeypatch.setattr(runner, "replay", replay)
    batch = _images(4, 20, 24)
    with torch.inference_mode():
        got = runner.split(batch, "u8", "labels")
    assert sizes == [4, 2, 1, 1, 2, 1, 1]
    assert torch.equal(got, seg.run(batch))

    def one_too_big(t, kind, output):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    monkeypatch.setattr(runner, "replay", one_too_big)
    with pytest.raises(fastfcn.InputError, match="does not fit in the memory of cpu with backend 'torch' at"):
        runner.split(batch[:1], "u8", "labels")

    def broken(*args):
        raise RuntimeError("illegal memory access")

    monkeypatch.setattr(runner, "replay", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"), torch.inference_mode():
        runner.split(batch, "u8", "labels")


# ------------------------------------------------------------------ precision, cuDNN setting


@pytest.fixture
def tf32_flags():
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _flags():
    return (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)


@pytest.mark.parametrize("precision,inside", [("fp32", (False,) * 2), ("tf32", (True,) * 2), ("bf16", None)])
def test_precision_flags_are_per_segmenter(precision, inside, tf32_flags):
    seg = fastfcn.Segmenter(build("fcn32s", 21, 0.0625).eval(), device="cpu", backend="torch")
    # The CUDA logic, on the CPU: the plan of a CUDA backend at this precision.
    cuda_backend = types.SimpleNamespace(device=torch.device("cuda", 0), precision=precision,
                                         input_dtype=torch.float32, graph_safe=False, thread_safe=True)
    seg.execution = ExecutionPlan.of(cuda_backend, "torch", graph_cache=8)
    assert seg.execution.serial and not seg.execution.cuda_graphs
    for before in ((True, True), (False, True)):
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
        with seg._precision_flags():
            assert _flags() == (inside or before)
            # fp32 / tf32 hold the process-wide lock while they run; bf16 never takes it
            assert segmenter._TF32_LOCK.locked() == (inside is not None)
        assert _flags() == before


def test_precision_flags_survive_torchs_mixed_tf32_apis(tf32_flags):
    """torch >= 2.9: after fp32_precision (the new API) is set to disagree with the legacy
    switches, reading allow_tf32 raises; an fp32 Segmenter on CUDA must still run."""
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    seg = fastfcn.Segmenter(build("fcn32s", 21, 0.0625).eval(), device="cpu", backend="torch")
    cuda_backend = types.SimpleNamespace(device=torch.device("cuda", 0), precision="fp32",
                                         input_dtype=torch.float32, graph_safe=False, thread_safe=True)
    seg.execution = ExecutionPlan.of(cuda_backend, "torch", graph_cache=8)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    with pytest.raises(RuntimeError, match="mix of the legacy and new"):
        torch.backends.cuda.matmul.allow_tf32  # noqa: B018 - torch's own check, the reason for the fix
    with seg._precision_flags():
        assert _flags() == (False, False)
    # the switch the new API held, now consistent in both APIs
    assert torch.backends.cuda.matmul.allow_tf32 is True
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"


def test_auto_precision_is_bf16_only_where_the_device_computes_it(monkeypatch):
    """"auto" asks the Segmenter's own device, and a V100 / T4 (bf16 only emulated, slower than
    fp32) gets fp32 although torch.cuda.is_bf16_supported() says True there."""
    from fastfcn.runtime.execution import resolve_precision

    caps = {0: (9, 0), 1: (7, 0)}  # an H100 as the current device, a V100 as cuda:1
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: caps[torch.device(d).index])
    assert resolve_precision("auto", torch.device("cuda", 0)) == "bf16"
    assert resolve_precision("auto", torch.device("cuda", 1)) == "fp32"
    assert resolve_precision("bf16", torch.device("cuda", 1)) == "bf16"  # asked for: emulated is allowed


def test_every_cuda_backend_sets_the_same_cudnn_mode(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    backends.Backend(None, torch.device("cpu"), "fp32")
    assert torch.backends.cudnn.benchmark is False  # the CPU leaves cuDNN alone
    backends.Backend(None, torch.device("cuda"), "bf16")  # the base class: torch, fused, compile
    assert torch.backends.cudnn.benchmark is True


# ------------------------------------------------------------------ compile backends


def test_compile_backends_are_independent_and_freed(monkeypatch):
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list as entries

    # dynamo's own eager backend: the same caching as inductor without inductor's compile time
    monkeypatch.setattr(backends.CompileBackend, "dynamo_backend", "eager")
    m = build("fcn32s", 21, 0.0625).eval()
    a = backends.CompileBackend(m, torch.device("cpu"), "fp32")
    b = backends.CompileBackend(m, torch.device("cpu"), "fp32")
    codes = a._codes + b._codes
    assert len({id(c) for c in codes}) == 6  # one code object per (backend, output)
    x = torch.randn(1, 3, 16, 16)
    want = m(x)
    torch.testing.assert_close(a(x, "logits"), want)
    assert torch.equal(b(x, "labels"), want.argmax(1).to(torch.uint8))
    assert [len(entries(c)) for c in codes] == [1, 0, 0, 0, 1, 0]
    model_ref = weakref.ref(a.model)
    del a
    gc.collect()
    assert model_ref() is None  # its graphs and weights go with it
    assert len(entries(codes[0])) == 0 and len(entries(codes[4])) == 1
    b.close()
    assert len(entries(codes[4])) == 0
    with pytest.raises(RuntimeError, match="closed"):
        b(x, "labels")


# ------------------------------------------------------------------ CUDA conv epilogues


DEV = "cuda" if torch.cuda.is_available() else "cpu"
# The Triton conv runs compiled at bf16 on a GPU, in Triton's interpreter at fp32 without one.
EPI_DTYPE = torch.bfloat16 if DEV == "cuda" else torch.float32
EPI_TOL = {"rtol": 2**-7, "atol": 1e-2} if DEV == "cuda" else {"rtol": 1e-5, "atol": 1e-5}


def _conv(cin=4, cout=6, k=3, pad=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(cin, cout, k, padding=pad)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.3)
        conv.bias.copy_(torch.randn(cout, generator=g))
    return conv.requires_grad_(False)


def _fake_timer(order):
    """A timer under which candidates are 'measured' in the given order of speed."""
    calls = []

    def timer(fn, cuda):
        fn()
        calls.append(cuda)
        timer.n += 1
        return order[(timer.n - 1) % len(order)]

    timer.n = 0
    timer.calls = calls
    return timer


def test_fused_epilogue_chosen_when_fastest_and_agrees(monkeypatch):
    conv = _conv()
    fused_calls = []

    def fake_cudnn_relu(x, w, b, stride, padding, dilation, groups):
        fused_calls.append(tuple(padding))
        return torch.relu(F.conv2d(x, w, b, stride, padding, dilation, groups))

    monkeypatch.setattr(torch, "cudnn_convolution_relu", fake_cudnn_relu, raising=False)
    impl = cuda_fast.EpilogueConv(conv, relu=True, timer=_fake_timer([1.0, 2.0, 3.0]))
    assert list(impl.chooser.candidates) == ["cudnn_relu", "triton", "eager"]
    x = torch.randn(2, 4, 9, 11)
    want = torch.relu(conv(x))
    assert torch.equal(impl(x, (1, 1)), want)
    assert impl.chooser.choice == {cuda_fast._key(x, (1, 1)): "cudnn_relu"}
    n = len(fused_calls)
    assert torch.equal(impl(x, (1, 1)), want) and len(fused_calls) == n + 1  # cached, not re-measured
    # a padding other than the module's (a caller's window) is honoured and measured separately
    assert torch.equal(impl(x, (0, 2)), torch.relu(F.conv2d(x, conv.weight, conv.bias, 1, (0, 2))))


def test_fused_epilogue_falls_back_when_missing_or_refused(monkeypatch):
    conv = _conv()
    x = torch.randn(1, 4, 8, 8)
    want = torch.relu(conv(x))
    monkeypatch.delattr(torch, "cudnn_convolution_relu", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors without the interpreter: no Triton conv
    impl = cuda_fast.EpilogueConv(conv, relu=True)
    assert list(impl.chooser.candidates) == ["triton", "eager"]
    assert torch.equal(impl(x, (1, 1)), want)
    assert "CUDA tensors" in next(iter(impl.chooser.failed.values()))

    def refuses(*args):
        raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED")

    monkeypatch.setattr(torch, "cudnn_convolution_relu", refuses, raising=False)
    impl = cuda_fast.EpilogueConv(conv, relu=True)
    assert torch.equal(impl(x, (1, 1)), want)  # eager took over
    assert "NOT_SUPPORTED" in next(iter(impl.chooser.failed.values()))
    assert torch.equal(impl.conv_pool(x, (1, 1), 2, 2), F.max_pool2d(want, 2, 2, ceil_mode=True))
    no_relu = cuda_fast.EpilogueConv(conv, relu=False)  # the fused op is conv+bias+ReLU only
    assert list(no_relu.chooser.candidates) == ["eager"]
    assert torch.equal(no_relu(x, (1, 1)), conv(x))


def test_triton_errors_and_refused_sizes_drop_the_candidate():
    """Triton's CompilationError / OutOfResources are no RuntimeError, nor is a launcher's
    ValueError: each must drop its candidate, not end the Segmenter's run."""
    from triton.runtime.errors import OutOfResources

    def no_shared_memory(x):
        raise OutOfResources(262144, 232448, "shared memory")

    def too_big(x):
        raise ValueError("input (64, 3, 8192, 8192) has too many pixels for one launch; split the batch")

    chooser = cuda_fast.Chooser({"triton": no_shared_memory, "triton_big": too_big, "eager": torch.relu},
                                timer=_fake_timer([1.0, 2.0, 3.0]))  # fmt: skip
    x = torch.randn(5) - 0.5
    assert torch.equal(chooser("k", x), torch.relu(x))
    assert chooser.choice == {"k": "eager"}
    assert "OutOfResources" in chooser.failed[("k", "triton")]
    assert "too many pixels" in chooser.failed[("k", "triton_big")]


def test_weights_made_in_inference_mode_keep_every_candidate(monkeypatch, tf32_flags):
    """A Segmenter built inside torch.inference_mode() has inference-tensor weights, which carry
    no version counter: the dead-zone cache key and the Triton conv's packed-weight key must
    not read one (the run failed; the Triton candidate was dropped). bf16 input must not read
    the TF32 switch either (it raises in a process that mixed torch's two TF32 APIs)."""
    monkeypatch.delattr(torch, "cudnn_convolution_relu", raising=False)
    with torch.inference_mode():
        conv = _conv(4, 6, 3, 1).to(DEV, torch.bfloat16)
    assert torch.is_inference(conv.weight)
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cuda.matmul.fp32_precision = "tf32"  # mixed: allow_tf32 raises if read
    impl = cuda_fast.EpilogueConv(conv, relu=True, timer=_fake_timer([1.0, 2.0]))
    x = torch.randn(1, 4, 9, 7).to(DEV, torch.bfloat16)
    got = impl(x, (1, 1))
    assert impl.chooser.failed == {} and list(impl.chooser.choice.values()) == ["triton"]
    want = torch.relu(F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1))
    torch.testing.assert_close(got.double(), want, rtol=2**-7, atol=1e-2)

    m = build("fcn8s", 21, 0.0625).eval()
    img = _images(1, 40, 36, seed=2)
    want = fastfcn.Segmenter(m, device="cpu", backend="fused", precision="fp32").run(img, "logits")
    with torch.inference_mode():
        seg = fastfcn.Segmenter(m, device="cpu", backend="fused", precision="fp32")
    assert seg._backend.dead_zone is not None
    torch.testing.assert_close(seg.run(img, "logits"), want, rtol=1e-5, atol=1e-5)


def test_device_timer_times_gpu_work_not_launches(monkeypatch):
    """Each timed call is queued behind a spin kernel, so the events bracket the candidate's GPU
    work and not the host's launches (which a CUDA graph replay does not have)."""
    log = []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.name = f"event{sum(e[0] == 'new' for e in log)}"
            log.append(("new", self.name))

        def record(self, stream=None):
            log.append(("record", self.name))

        def synchronize(self):
            log.append(("sync", self.name))

        def elapsed_time(self, other):
            return {"event0": 4.0, "event2": 2.0, "event4": 3.0}[self.name]

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: log.append(("spin", cycles)))
    seconds = cuda_fast.device_timer(lambda: log.append(("fn",)), cuda=True, reps=3)
    assert seconds == 0.003  # the median of 4, 2 and 3 ms
    rep = [("spin", cuda_fast.SPIN_CYCLES), ("record", "a"), ("fn",), ("record", "b"), ("sync", "b")]
    want = [("fn",)]
    for i in range(3):
        names = {"a": f"event{2 * i}", "b": f"event{2 * i + 1}"}
        want += [("new", names["a"]), ("new", names["b"])]
        want += [(e[0], names[e[1]]) if e[0] in ("record", "sync") else e for e in rep]
    assert log == want


def test_out_of_memory_while_measuring_is_not_a_fallback(monkeypatch):
    def oom(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch, "cudnn_convolution_relu", oom, raising=False)
    impl = cuda_fast.EpilogueConv(_conv(), relu=True)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        impl(torch.randn(1, 4, 8, 8), (1, 1))
    assert impl.chooser.choice == {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fc6_gemm_path_agrees_and_is_chosen_by_measurement(dtype):
    conv = _conv(16, 24, 7, 0).to(dtype)
    x = torch.randn(2, 16, 12, 13).to(dtype).contiguous(memory_format=torch.channels_last)
    want = conv(x)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for split in (1, 4, 8):  # cuBLAS's own choice, and explicit split-K over 4 and 8 slices of K
        got = cuda_fast.gemm_conv(conv, relu=False, split=split)(x, (0, 0))
        assert got.shape == want.shape and got.dtype == dtype
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * float(want.abs().max()))
    fc6 = cuda_fast.ChosenConv2d.wrap(conv, timer=_fake_timer([1.0, 2.0, 3.0, 4.0]))
    assert list(fc6.chooser.candidates) == ["gemm", "gemm_splitk4", "gemm_splitk8", "eager"]
    assert fc6.weight is conv.weight and set(fc6.state_dict()) == {"weight", "bias"}
    fc6(x)
    assert list(fc6.chooser.choice.values()) == ["gemm"]
    split = cuda_fast.ChosenConv2d.wrap(conv, timer=_fake_timer([3.0, 2.0, 1.0, 4.0]))
    got = split(x)
    assert list(split.chooser.choice.values()) == ["gemm_splitk8"]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * float(want.abs().max()))
    slow = cuda_fast.ChosenConv2d.wrap(conv, timer=_fake_timer([2.0, 2.0, 2.0, 1.0]))
    assert torch.equal(slow(x), want) and list(slow.chooser.choice.values()) == ["eager"]


def test_splitk_matmul():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(6, 40, generator=g), torch.randn(40, 3, generator=g)
    for split in (1, 2, 4, 8):
        torch.testing.assert_close(cuda_fast.splitk_matmul(a, b, split), a @ b, rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="multiple of split"):
        cuda_fast.splitk_matmul(a, b, 3)


def test_gemm_path_refuses_large_outputs():
    conv = _conv(4, 4, 3, 1)
    x = torch.randn(1, 4, 50, 50)  # 2500 output rows > GEMM_MAX_ROWS
    with pytest.raises(NotImplementedError, match="GEMM_MAX_ROWS"):
        cuda_fast.gemm_conv(conv, relu=True)(x, (1, 1))
    fc = cuda_fast.ChosenConv2d.wrap(conv)
    assert torch.equal(fc(x), conv(x)) and list(fc.chooser.choice.values()) == ["eager"]


def test_cuda_only_calls_exist_in_this_torch_and_triton():
    """What the CUDA paths call that no CPU test runs (cuda_fast, cuda_graphs, the Triton
    kernels' launches, benchmarks/gpu_first_contact.py), checked against this torch and Triton
    without a GPU: the names, the keyword arguments used, the fp32-output GEMMs of splitk_matmul
    on the meta device, and on a CUDA build of torch that those ops have CUDA kernels. The other
    tests replace torch.cuda.graph and friends by fakes, which would hide a renamed argument."""
    import inspect

    for name in ("_sleep", "is_current_stream_capturing", "graph_pool_handle", "CUDAGraph", "Stream"):
        assert callable(getattr(torch.cuda, name, None)), f"torch.cuda.{name}"
    assert {"pool", "stream", "capture_error_mode"} <= set(inspect.signature(torch.cuda.graph).parameters)
    assert "enable_timing" in inspect.signature(torch.cuda.Event.__new__).parameters
    m, k, n, split = 4, 24, 3, 4  # splitk_matmul's CUDA branch, shapes and views as it makes them
    a = torch.empty(m, k, device="meta", dtype=torch.bfloat16)
    b = torch.empty(k, n, device="meta", dtype=torch.bfloat16)
    assert torch.mm(a, b, out_dtype=torch.float32).dtype == torch.float32
    a3, b3 = a.view(m, split, k // split).transpose(0, 1), b.reshape(split, k // split, n)
    parts = torch.bmm(a3, b3, out_dtype=torch.float32)
    assert parts.dtype == torch.float32 and parts.shape == (split, m, n)
    if torch.version.cuda is not None:  # a CUDA build (the GPU image's): the kernels are there
        for op in ("aten::mm.dtype", "aten::bmm.dtype", "aten::cudnn_convolution_relu"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
    pytest.importorskip("triton")
    import triton
    import triton.language as tl
    import triton.testing  # noqa: F401 - a submodule, not imported by triton itself

    from fastfcn.kernels import conv_epilogue

    assert "input_precision" in inspect.signature(tl.dot).parameters  # conv_epilogue's IEEE dot
    assert "return_mode" in inspect.signature(triton.testing.do_bench).parameters
    # gpu_first_contact reads the compiled conv specialisations' registers from this cache (a
    # compiled kernel's; the interpreter's InterpretedFunction has none, so build one here)
    kernel = conv_epilogue.conv_bias_relu_kernel
    jit = triton.runtime.jit.JITFunction(getattr(kernel, "fn", kernel))
    assert isinstance(jit.device_caches, dict), triton.__version__


def test_install_on_fcn_keeps_keys_and_results(monkeypatch):
    monkeypatch.delattr(torch, "cudnn_convolution_relu", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # eager only: the interpreter is too slow at 238x234
    m = build("fcn8s", 21, 0.0625).eval().requires_grad_(False)
    keys = list(m.state_dict())
    x = torch.randn(1, 3, 40, 36)
    with torch.inference_mode():
        want = m(x)
        done = cuda_fast.install(m)
        got = m(x)
    assert list(m.state_dict()) == keys
    assert "fc6" in done and sum(n.startswith("conv") for n in done) == 13
    assert isinstance(m.fc6, cuda_fast.ChosenConv2d)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


# ------------------------------------------------------------------ Triton conv with the epilogue


CONV_CASES = [
    # (N, C_in, H, W, C_out, k, pad, stride, dilation, pool)
    (2, 3, 9, 11, 20, 3, 1, 1, 1, False),  # conv1_1-like: 3 input channels
    (1, 5, 7, 13, 17, 3, 1, 1, 1, True),  # odd sizes: ceil-mode windows hang over the edge
    (2, 4, 8, 9, 8, 7, 0, 1, 1, False),  # fc6-like 7x7 without padding
    (1, 16, 12, 10, 24, 3, 2, 1, 2, True),  # dilated (conv5 of the dilated net)
    (1, 3, 19, 17, 16, 5, 3, 2, 1, False),  # strided
]


def _conv_id(c):
    return "x".join(map(str, c[:5])) + f"-k{c[5]}-pool{int(c[9])}"


@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_id)
def test_triton_conv_bias_relu_pool_matches_reference(case):
    from fastfcn.kernels import conv_epilogue as ce

    n, c, h, w, co, k, pad, stride, dil, pool = case
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(sum(case[:6]))
    x = torch.randn(n, c, h, w, generator=g)
    wt = torch.randn(co, c, k, k, generator=g) / (c * k * k) ** 0.5
    b = torch.randn(co, generator=g)
    want = F.relu(F.conv2d(x.double(), wt.double(), b.double(), stride, pad, dil))
    if pool:
        want = F.max_pool2d(want, 2, 2, ceil_mode=True)
    packed = ce.pack_weight(wt).to(dev)
    got = ce.conv_bias_relu(x.to(dev), packed, b.to(dev), (k, k), (pad, pad), stride, dil, pool)
    assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
    # fp32 sums of c*k*k products: within a few eps of the float64 value
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5)
    assert bool((got == 0).any()) and bool((got > 0).any())  # the ReLU both clipped and passed


def test_triton_conv_bf16_and_bad_input():
    from fastfcn.kernels import conv_epilogue as ce

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 16, 10, 9, generator=g).bfloat16()
    wt = (torch.randn(32, 16, 3, 3, generator=g) * 0.2).bfloat16()
    b = torch.randn(32, generator=g)
    got = ce.conv_bias_relu(x.to(dev), ce.pack_weight(wt).to(dev), b.to(dev), (3, 3), (1, 1), pool=True)
    want = F.relu(F.conv2d(x.double(), wt.double(), b.double(), padding=1))
    want = F.max_pool2d(want, 2, 2, ceil_mode=True)
    assert got.dtype == torch.bfloat16
    # the output is cast to bf16: relative error <= 2**-8 when rounded (CUDA), <= 2**-7 when
    # truncated, as Triton's interpreter does (measured: every |cast| <= |value|; max 0.0077 here)
    torch.testing.assert_close(got.double().cpu(), want, rtol=2**-7, atol=1e-3)
    with pytest.raises(ValueError, match="packed weight"):
        ce.conv_bias_relu(x, ce.pack_weight(wt).float(), b, (3, 3), (1, 1))
    with pytest.raises(ValueError, match="bias must be float32"):
        ce.conv_bias_relu(x, ce.pack_weight(wt), b.bfloat16(), (3, 3), (1, 1))
    with pytest.raises(ValueError, match="too small"):
        ce.conv_bias_relu(x[..., :2, :2], ce.pack_weight(wt), b, (3, 3), (0, 0))
    big = torch.empty(1, 1, 46341, 46341, device="meta")  # 2**31 pixels: past int32 pixel indices
    with pytest.raises(ValueError, match="too many pixels"):
        meta = {"device": "meta"}
        ce.conv_bias_relu(big, torch.empty(9, 4, **meta), torch.empty(4, **meta), (3, 3), (1, 1))


def test_triton_conv_and_pool_epilogue_chosen_by_measurement(monkeypatch):
    monkeypatch.delattr(torch, "cudnn_convolution_relu", raising=False)
    conv = _conv(4, 6, 3, 1).to(DEV, EPI_DTYPE)
    x = torch.randn(1, 4, 9, 7).to(DEV, EPI_DTYPE)
    impl = cuda_fast.EpilogueConv(conv, relu=True, timer=_fake_timer([1.0, 2.0]))
    assert list(impl.chooser.candidates) == ["triton", "eager"]
    want = torch.relu(F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1))
    torch.testing.assert_close(impl(x, (1, 1)).double(), want, **EPI_TOL)
    assert list(impl.chooser.choice.values()) == ["triton"]
    pooled = impl.conv_pool(x, (1, 1), 2, 2)
    torch.testing.assert_close(pooled.double(), F.max_pool2d(want, 2, 2, ceil_mode=True), **EPI_TOL)
    assert list(impl._pool_choosers[(2, 2)].choice.values()) == ["triton_pool"]
    assert list(impl._pool_choosers[(2, 2)].candidates) == ["triton_pool", "triton_maxpool", "separate"]
    # a 3x3/2 pool has no fused kernel: the conv's choice, then Triton's pool or torch's
    impl.timer = _fake_timer([1.0, 2.0])  # the Triton pool measured faster
    got = impl.conv_pool(x, (1, 1), 3, 2)
    assert list(impl._pool_choosers[(3, 2)].candidates) == ["triton_maxpool", "separate"]
    assert list(impl._pool_choosers[(3, 2)].choice.values()) == ["triton_maxpool"]
    assert not impl._pool_choosers[(3, 2)].failed
    torch.testing.assert_close(got.double(), F.max_pool2d(want, 3, 2, ceil_mode=True), **EPI_TOL)


def test_triton_conv_multiplies_in_fp32_unless_tf32_was_asked_for(tf32_flags, monkeypatch):
    """fp32 input on CUDA: fp32 products (the IEEE kernel) unless the Segmenter allowed TF32;
    bf16 never reads the flag. The launch is intercepted: only the ieee argument is checked."""
    from fastfcn.kernels import conv_epilogue as ce

    seen = []
    monkeypatch.setattr(ce, "conv_bias_relu", lambda x, w, b, *geom: seen.append(geom[-1]))
    run = cuda_fast.triton_conv(_conv())
    for dtype, tf32 in ((torch.float32, False), (torch.float32, True), (torch.bfloat16, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        x = torch.randn(1, 4, 6, 6, dtype=dtype)
        monkeypatch.setattr(cuda_fast, "_triton_here", lambda x: None)  # as if x were on CUDA
        run(x, (1, 1))
    assert seen == [True, False, False]


def test_backbone_runner_hands_the_pool_to_conv_pool():
    """run_steps gives a conv's conv_pool the Pool step after it (taps kept); other convs run plainly."""
    m = build("fcn8s", 21, 0.0625).eval().requires_grad_(False)
    x = torch.randn(1, 3, 30, 26)
    with torch.inference_mode():
        want = m(x, "logits")
    calls = []

    class Recording:
        def __init__(self, conv):
            self.conv = conv

        def __call__(self, x, padding):
            calls.append(("conv", self.conv))
            return F.relu(F.conv2d(x, self.conv.weight, self.conv.bias, 1, padding))

        def conv_pool(self, x, padding, kernel, stride):
            calls.append(("conv_pool", kernel, stride))
            return F.max_pool2d(self(x, padding), kernel, stride, ceil_mode=True)

    for step in m.backbone:
        if hasattr(step, "name"):
            m.set_conv_impl(step.name, Recording(getattr(m, step.name)))
    with torch.inference_mode():
        got = m(x, "logits")
    assert torch.equal(got, want)
    assert [c for c in calls if c[0] == "conv_pool"] == [("conv_pool", 2, 2)] * 5  # conv1_2 .. conv5_3
    assert sum(c[0] == "conv" for c in calls) == 13


@pytest.mark.gpu
@pytest.mark.parametrize("skip_dead_zone", [True, False])
def test_fused_cuda_backend_chooses_an_epilogue_for_every_conv(skip_dead_zone):
    """On a GPU: every backbone conv of the fused backend has measured its candidates (during
    the graph warm-up), and the result agrees with the fp32 reference. With the dead-zone skip
    (the default) the runner measures the skip against whole maps for the input (one choice,
    both timed), so each conv has at least two shapes (its window, the whole map at batch 1 that
    fills the cache, the whole map at batch 2 where they differ) and each conv_pool one or two
    (the window the plan aligned to the pool, the whole map); on whole maps one each."""
    m = build("fcn8s", 21, 0.25).eval()
    seg = fastfcn.Segmenter(m, device="cuda", precision="bf16", skip_dead_zone=skip_dead_zone)
    ref = fastfcn.Segmenter(m, device="cuda", backend="torch", precision="fp32")
    batch = _images(2, 64, 80, seed=1)
    got, want = seg.run(batch, "logits").cpu(), ref.run(batch, "logits").cpu()
    impls = seg._backend.model._conv_impls
    failed = {name: i.chooser.failed for name, i in impls.items() if i.chooser.failed}
    assert len(impls) == 13, failed
    if skip_dead_zone:
        assert all(len(i.chooser.choice) >= 2 for i in impls.values()), failed
        dz = seg._backend.dead_zone
        assert len(dz.choice) == 1 and set(next(iter(dz.times.values()))) == {"skip", "whole"}
    else:
        assert all(len(i.chooser.choice) == 1 for i in impls.values()), failed
    assert len(seg._backend.model.fc6.chooser.choice) == 1
    pooled = {name for name, i in impls.items() if i._pool_choosers}
    assert pooled == {"conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3"}
    if skip_dead_zone:
        (dz_plan,) = seg._backend.dead_zone._plans.values()
        assert {dz_plan.steps[k].step.name for k in dz_plan.fused} == pooled
    pooled = [impls[name] for name in pooled]
    keys = (1, 2) if skip_dead_zone else (1,)
    assert all(len(c.choice) in keys for i in pooled for c in i._pool_choosers.values())
    assert float((got - want).abs().max() / (want.max() - want.min())) < 0.03
    assert float((got.argmax(1) == want.argmax(1)).float().mean()) > 0.98


def test_chooser_drops_candidates_that_disagree_with_the_reference():
    """A kernel that compiled wrong must not win by being fast: the last candidate's output is
    the reference, and a candidate off by more than AGREE_TOL, with NaNs the reference lacks, or
    of another shape is dropped (the fake timer calls the wrong ones fastest)."""
    cands = {
        "scaled": lambda x: torch.relu(x) * 1.1,
        "nan": lambda x: torch.where(x > 2, float("nan"), torch.relu(x)),
        "shape": lambda x: torch.relu(x)[:-1],
        "close": lambda x: torch.relu(x) * (1 + 2**-9),  # within bf16 rounding of the reference
        "eager": torch.relu,
    }
    chooser = cuda_fast.Chooser(cands, timer=_fake_timer([2.0, 1.0]))
    x = torch.randn(64, 64, dtype=torch.bfloat16) * 3
    out = chooser("k", x)
    assert chooser.choice == {"k": "eager"}  # 'close' timed 2.0, eager 1.0
    assert torch.equal(out, torch.relu(x))
    assert set(chooser.failed) == {("k", "scaled"), ("k", "nan"), ("k", "shape")}
    assert "disagrees" in chooser.failed[("k", "scaled")]
    assert "non-finite" in chooser.failed[("k", "nan")]
    assert "(63, 64)" in chooser.failed[("k", "shape")]
    assert cuda_fast.disagreement(torch.relu(x) * (1 + 2**-9), torch.relu(x)) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chooser_admits_the_real_candidates_and_catches_a_shift(dtype):
    """AGREE_TOL's bound against the real candidates: fc6-like GEMM / split-K and the Triton conv
    (interpreter here, compiled on a GPU) agree with eager within it at fp32 and bf16, while an
    output shifted by one pixel (what a wrong index in a kernel gives) does not."""
    g = torch.Generator().manual_seed(3)
    fc6 = torch.nn.Conv2d(64, 256, 7).requires_grad_(False)
    conv = torch.nn.Conv2d(16, 32, 3, padding=1).requires_grad_(False)
    for c in (fc6, conv):
        with torch.no_grad():
            c.weight.copy_(torch.randn(c.weight.shape, generator=g) * (2 / c.weight[0].numel()) ** 0.5)
            c.bias.copy_(torch.randn(c.bias.shape, generator=g) * 0.1)
    x6 = torch.relu(torch.randn(1, 64, 12, 12, generator=g)).to(DEV, dtype)
    fc6 = fc6.to(DEV, dtype)
    ref6 = cuda_fast.eager_conv(fc6, False)(x6, (0, 0))
    for split in (1, 4, 8):
        assert cuda_fast.disagreement(cuda_fast.gemm_conv(fc6, False, split)(x6, (0, 0)), ref6) is None
    xc = torch.relu(torch.randn(2, 16, 13, 11, generator=g)).to(DEV, dtype)
    conv = conv.to(DEV, dtype)
    ref = cuda_fast.eager_conv(conv, True)(xc, (1, 1))
    assert cuda_fast.disagreement(cuda_fast.triton_conv(conv)(xc, (1, 1)), ref) is None
    pooled = cuda_fast.triton_conv(conv, pool=True)(xc, (1, 1))
    assert cuda_fast.disagreement(pooled, F.max_pool2d(ref, 2, 2, ceil_mode=True)) is None
    assert "disagrees" in cuda_fast.disagreement(torch.roll(ref, 1, dims=3), ref)
    assert "disagrees" in cuda_fast.disagreement(torch.roll(ref6, 1, dims=1), ref6)


def test_stream_input_slot_is_released_once():
    """compute() gives the pinned input slot back after the upload; when inference then fails,
    the worker's error path releases the batch again: the slot must not enter the free queue
    twice (two batches would be staged into one buffer)."""
    from fastfcn.runtime import stream_cuda

    stager = stream_cuda.CudaStager.__new__(stream_cuda.CudaStager)  # no CUDA streams needed
    stager.inputs = stream_cuda._Ring(2)
    slot = stager.inputs.free.get_nowait()
    staged = stream_cuda.Staged(slot, torch.empty(0, dtype=torch.uint8), 1)
    stager.release(staged)
    stager.release(staged)
    assert stager.inputs.free.qsize() == 2
    assert sorted(stager.inputs.free.get_nowait() for _ in range(2)) == [0, 1]


def test_backbone_timer_spins_longer(monkeypatch):
    """The dead-zone runner's timer (backends: the skip against whole maps) queues each timed
    pass behind BACKBONE_SPIN_CYCLES, so the skip's host side does not count against it."""
    spins = []
    monkeypatch.setattr(torch.cuda, "_sleep", spins.append)

    class Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self, stream=None):
            pass

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return 1.0

    monkeypatch.setattr(torch.cuda, "Event", Event)
    assert cuda_fast.backbone_timer(lambda: None, cuda=True) == 0.001
    assert spins == [cuda_fast.BACKBONE_SPIN_CYCLES] * 3
    assert cuda_fast.BACKBONE_SPIN_CYCLES > cuda_fast.SPIN_CYCLES
