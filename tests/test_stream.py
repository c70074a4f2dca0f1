"""Segmenter.stream: one result per frame, in order, equal to run(); bounded memory; errors; shutdown."""

import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import fastfcn
from fastfcn import StreamError
from fastfcn.errors import InputError
from fastfcn.runtime.stream import StreamStats, stream


@pytest.fixture(scope="module")
def seg():
    torch.manual_seed(0)
    model = fastfcn.models.build("fcn8s", width=0.0625, num_classes=5).eval()
    return fastfcn.Segmenter(model, device="cpu", backend="torch", precision="fp32")


def frames_of(n, sizes=((20, 24),), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*sizes[i * len(sizes) // n], 3), dtype=np.uint8) for i in range(n)]


def threads_now():
    return {t for t in threading.enumerate() if t.name.startswith("fastfcn-stream")}


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_each_result_equals_run_in_order(seg, batch_size):
    frames = frames_of(11)
    stats = StreamStats()
    out = list(stream(seg, iter(frames), batch_size=batch_size, stats=stats))
    assert len(out) == len(frames)
    for f, r in zip(frames, out):
        assert r.dtype == torch.uint8 and r.shape == f.shape[:2]
        assert torch.equal(r, seg.run(f).cpu())
    # Full batches, then the rest: nothing dropped, nothing padded.
    assert stats.sizes == [batch_size] * (11 // batch_size) + ([11 % batch_size] if 11 % batch_size else [])


def test_logits_and_frame_kinds(seg):
    # numpy, torch and PIL frames in one stream; logits come back as run() gives them.
    a, b, c = frames_of(3)
    out = list(seg.stream([a, torch.from_numpy(b), Image.fromarray(c)], batch_size=2, output="logits"))
    for f, r in zip((a, b, c), out):
        assert r.shape == (5, *f.shape[:2]) and r.dtype == torch.float32
        torch.testing.assert_close(r, seg.run(f, output="logits").cpu(), rtol=1e-5, atol=1e-5)


def test_size_change_mid_stream_never_mixes_a_batch(seg):
    frames = frames_of(9, sizes=((16, 16), (24, 20), (16, 16)))  # 3 + 3 + 3 frames
    stats = StreamStats()
    out = list(stream(seg, frames, batch_size=8, stats=stats))
    assert [tuple(r.shape) for r in out] == [f.shape[:2] for f in frames]
    assert stats.sizes == [3, 3, 3]
    for f, r in zip(frames, out):
        assert torch.equal(r, seg.run(f).cpu())


def test_max_delay_flushes_a_partial_batch(seg):
    frames = frames_of(3)
    release = threading.Event()

    def live():  # a live source: 2 frames, then nothing until the consumer has seen them
        yield frames[0]
        yield frames[1]
        release.wait(10)
        yield frames[2]

    stats = StreamStats()
    it = stream(seg, live(), batch_size=8, max_delay=0.05, stats=stats)
    t0 = time.perf_counter()
    first = [next(it), next(it)]
    assert time.perf_counter() - t0 < 5  # without max_delay this would wait for the third frame
    release.set()
    rest = list(it)
    assert len(first) + len(rest) == 3 and stats.sizes == [2, 1]
    assert torch.equal(first[1], seg.run(frames[1]).cpu())


def test_source_exception_reaches_consumer_with_index_after_earlier_results(seg):
    frames = frames_of(5)

    def source():
        yield from frames[:5]
        raise OSError("camera unplugged")

    got = []
    with pytest.raises(StreamError, match="frame 5") as e:
        for r in seg.stream(source(), batch_size=2):
            got.append(r)
    assert len(got) == 5 and e.value.index == 5 and isinstance(e.value.__cause__, OSError)
    time.sleep(0.2)
    assert not threads_now()


def test_bad_frame_is_named(seg):
    frames = frames_of(4)
    frames[2] = np.zeros((8, 8), np.uint8)
    with pytest.raises(StreamError, match="frame 2") as e:
        list(seg.stream(frames, batch_size=1))
    assert e.value.index == 2 and isinstance(e.value.__cause__, InputError)


def test_inference_exception_names_the_batch(seg, monkeypatch):
    calls = {"n": 0}
    real = seg._run

    def flaky(t, kind, output):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device lost")
        return real(t, kind, output)

    monkeypatch.setattr(seg, "_run", flaky)
    got = []
    with pytest.raises(StreamError, match="batch starting at frame 3") as e:
        for r in seg.stream(frames_of(9), batch_size=3):
            got.append(r)
    assert len(got) == 3 and e.value.index == 3


def test_early_break_stops_threads(seg):
    before = set(threading.enumerate())

    def endless():
        f = frames_of(1)[0]
        while True:
            yield f

    for i, _ in enumerate(seg.stream(endless(), batch_size=2)):
        if i == 4:
            break
    deadline = time.perf_counter() + 3
    while threads_now() and time.perf_counter() < deadline:
        time.sleep(0.01)
    assert set(threading.enumerate()) <= before


def test_close_stops_threads_while_consumer_is_slow(seg):
    f = frames_of(1)[0]
    it = seg.stream((f for _ in range(1000)), batch_size=4, queue_size=1)
    next(it)
    time.sleep(0.2)  # the producer fills the bounded queues and blocks on them (backpressure)
    assert threads_now()
    t0 = time.perf_counter()
    it.close()
    assert time.perf_counter() - t0 < 1.0
    deadline = time.perf_counter() + 3  # a reader caught inside next() ends when it returns
    while threads_now() and time.perf_counter() < deadline:
        time.sleep(0.01)
    assert not threads_now()


def test_close_does_not_wait_for_a_blocked_live_source(seg):
    f = frames_of(1)[0]
    release = threading.Event()

    def camera():
        yield f
        yield f
        release.wait(30)  # no next frame yet
        yield f

    it = seg.stream(camera(), batch_size=1)
    next(it), next(it)
    t0 = time.perf_counter()
    it.close()
    assert time.perf_counter() - t0 < 1.0
    release.set()  # the frame comes: the reader sees the stop flag and ends
    deadline = time.perf_counter() + 3
    while threads_now() and time.perf_counter() < deadline:
        time.sleep(0.01)
    assert not threads_now()


def test_backpressure_bounds_frames_read_ahead(seg):
    read = {"n": 0}
    f = frames_of(1)[0]

    def source():
        while True:
            read["n"] += 1
            yield f

    it = seg.stream(source(), batch_size=2, queue_size=1)
    next(it)
    time.sleep(0.3)
    # frames queue (1 x 2) + batches queue (1) + results queue (1) + one batch in each stage
    assert read["n"] <= 2 + 2 + 2 + 3 * 2 + 2, read["n"]
    it.close()


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20


def test_ten_thousand_frames_in_order_with_flat_memory():
    torch.manual_seed(0)
    # FCN-AlexNet at width 1/32: 0.44 ms per 16x16 frame at batch 8 (fused, 2 cores), so the
    # 10,000 frames take ~5 s of inference; FCN-32s at width 1/16 took 49 s.
    model = fastfcn.models.build("fcn-alexnet", width=0.03125, num_classes=3).eval()
    tiny = fastfcn.Segmenter(model, device="cpu", precision="fp32")
    n = 10_000
    frames = [np.full((16, 16, 3), v, np.uint8) for v in range(256)]
    expect = [tiny.run(f).cpu() for f in frames]
    rss = []
    count = 0
    # Fresh arrays (copies), so a stream that kept frames would hold 10,000 x 768 B + objects.
    for i, r in enumerate(tiny.stream((frames[k % 256].copy() for k in range(n)), batch_size=8)):
        assert torch.equal(r, expect[i % 256]), i
        count += 1
        if i % 1000 == 999:
            rss.append(_rss_mib())
    assert count == n
    # Flat: after warm-up, resident memory grows by less than 5 MiB over 8000 frames (the
    # frames themselves would be 6 MiB if the stream kept them).
    assert rss[-1] - rss[1] < 5.0, rss


def test_bad_arguments(seg):
    with pytest.raises(InputError, match="batch_size"):
        seg.stream([], batch_size=0)
    with pytest.raises(InputError, match="max_delay"):
        seg.stream([], max_delay=-1)
    with pytest.raises(InputError, match="queue_size"):
        seg.stream([], queue_size=0)
    with pytest.raises(ValueError, match="output"):
        seg.stream([], output="scores")
    with pytest.raises(TypeError, match="iterable"):
        seg.stream(3)
    assert list(seg.stream([])) == []


# ------------------------------------------------------------------ two-input nets: RGB-D streams

RGBD = [("nyud-fcn32s-color-d", "depth"), ("nyud-fcn32s-color-hha", "hha")]


@pytest.fixture(scope="module")
def rgbd():
    from helpers import rgbd_net

    return {arch: fastfcn.Segmenter(rgbd_net(arch), device="cpu", backend="torch", precision="fp32")
            for arch, _ in RGBD}  # fmt: skip


def pairs_of(keyword, n, sizes=((24, 32),), seed=0):
    """n (frame, second input) pairs: depth uint16 millimetres 0.5-10 m, or HHA uint8 images."""
    rng = np.random.default_rng(seed + 1)
    frames = frames_of(n, sizes, seed)
    if keyword == "depth":
        return [(f, rng.integers(500, 10000, f.shape[:2], dtype=np.uint16)) for f in frames]
    return [(f, rng.integers(0, 256, f.shape, dtype=np.uint8)) for f in frames]


@pytest.mark.parametrize("arch, keyword", RGBD)
def test_rgbd_pairs_equal_run_in_order(rgbd, arch, keyword):
    seg = rgbd[arch]
    pairs = pairs_of(keyword, 9, ((24, 32), (16, 20), (24, 32)), seed=3)  # 3 + 3 + 3 frames
    stats = StreamStats()
    out = list(stream(seg, iter(pairs), batch_size=2, stats=stats))
    assert stats.sizes == [2, 1, 2, 1, 2, 1]  # a size change flushes, as for one input
    expect = [seg.run(f, **{keyword: s}).cpu() for f, s in pairs]
    assert len(out) == 9 and all(torch.equal(r, e) for r, e in zip(out, expect))
    # The labels depend on the second input: a stream that paired a frame with another frame's
    # second input (same size: the next one in its group of 3) would fail above.
    other = [pairs[i - i % 3 + (i + 1) % 3][1] for i in range(9)]
    wrong = [seg.run(f, **{keyword: o}).cpu() for (f, _), o in zip(pairs, other)]
    assert sum(not torch.equal(w, e) for w, e in zip(wrong, expect)) >= 3


def test_rgbd_second_input_forms_logits_and_dtype_batches(rgbd):
    from PIL import Image

    seg = rgbd["nyud-fcn32s-color-d"]
    (f0, d0), (f1, d1), (f2, d2), (f3, d3) = pairs_of("depth", 4, ((16, 20),), seed=5)
    items = [
        (f0, d0),  # uint16: widened to int32, as run() does
        [torch.from_numpy(f1), torch.from_numpy(d1.astype(np.int32))],  # a list of two, torch
        (Image.fromarray(f2), Image.fromarray(d2)),  # PIL: a 16-bit greyscale image -> float32
        (f3, d3.astype(np.int32)),
    ]
    stats = StreamStats()
    out = list(stream(seg, items, batch_size=4, output="logits", stats=stats))
    # int32, int32 | float32 | int32: a batch never mixes depth dtypes (stacking would promote)
    assert stats.sizes == [2, 1, 1]
    for (f, d), r in zip(((f0, d0), (f1, d1), (f2, d2), (f3, d3)), out):
        assert r.shape == (5, 16, 20)
        torch.testing.assert_close(r, seg.run(f, "logits", depth=d).cpu(), rtol=1e-5, atol=1e-4)


def test_rgbd_refusals_name_the_frame(seg, rgbd):
    color_d, color_hha = rgbd["nyud-fcn32s-color-d"], rgbd["nyud-fcn32s-color-hha"]
    pairs, hha = pairs_of("depth", 4, ((16, 20),), seed=7), pairs_of("hha", 2, ((16, 20),), seed=7)
    cases = [
        (seg, [f for f, _ in pairs[:2]] + [pairs[2]], 2,
         r"a tuple of 2; fcn8s takes one input \(color images\): each frame is one \(H, W, 3\) uint8 image"),
        (color_d, [pairs[0], pairs[1][0]], 1,
         r"is one ndarray; nyud-fcn32s-color-d takes two inputs \(color \+ depth\): each frame must be a "
         r"pair \(image, depth\)"),
        (color_d, [pairs[0], (*pairs[1], pairs[1][1])], 1, "is a tuple of 3; nyud-fcn32s-color-d takes two"),
        (color_d, [*pairs[:2], (pairs[2][0], pairs[2][1][:, :19])], 2,
         r"the depth input is \(1, 16, 19\) \(N, H, W\) but its images are \(1, 16, 20\)"),
        (color_d, [*pairs[:3], (pairs[3][0], pairs[3][1].astype(np.uint8))], 3,
         "8-bit depth holds no millimetres"),
        (color_hha, [hha[0], (hha[1][0], hha[1][1][..., 0])], 1,
         r"the hha input must be one \(H, W, 3\) uint8"),
    ]
    for s, items, index, message in cases:
        got = []
        expect = rf"^the source failed at frame {index}: InputError: .*{message}"
        with pytest.raises(StreamError, match=expect) as e:
            for r in s.stream(items, batch_size=2):
                got.append(r)
        assert e.value.index == index and isinstance(e.value.__cause__, InputError)
        assert len(got) == index  # every earlier frame's result first


def test_rgbd_source_failure_max_delay_and_close(rgbd):
    seg = rgbd["nyud-fcn32s-color-hha"]
    pairs = pairs_of("hha", 3, ((16, 20),), seed=9)
    release = threading.Event()

    def camera():  # a live RGB-D source: 2 pairs, then nothing until the consumer has both
        yield pairs[0]
        yield pairs[1]
        release.wait(10)
        yield pairs[2]
        raise OSError("sensor unplugged")

    stats = StreamStats()
    it = stream(seg, camera(), batch_size=8, max_delay=0.05, stats=stats)
    first = [next(it), next(it)]  # max_delay pushed the partial batch
    release.set()
    with pytest.raises(StreamError, match="^the source failed at frame 3: OSError: sensor unplugged") as e:
        first.extend(it)
    assert e.value.index == 3 and stats.sizes == [2, 1]
    assert all(torch.equal(r, seg.run(f, hha=h).cpu()) for r, (f, h) in zip(first, pairs))
    it2 = seg.stream(iter(pairs * 100), batch_size=2, queue_size=1)
    next(it2)
    it2.close()
    deadline = time.perf_counter() + 3
    while threads_now() and time.perf_counter() < deadline:
        time.sleep(0.01)
    assert not threads_now()


@pytest.mark.gpu
def test_rgbd_stream_on_cuda_takes_the_plain_path():
    from helpers import rgbd_net

    seg = fastfcn.Segmenter(rgbd_net("nyud-fcn32s-color-d"), device="cuda", backend="torch", precision="fp32")
    pairs = pairs_of("depth", 5, ((24, 32),), seed=11)
    out = list(seg.stream(pairs, batch_size=2))
    assert len(out) == 5
    for r, (f, d) in zip(out, pairs):
        assert r.device.type == "cpu" and torch.equal(r, seg.run(f, depth=d).cpu())
