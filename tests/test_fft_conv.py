"""The fused CPU backend's Fourier-domain convolution (cpu_fast.FftConv): large-kernel stride-1
layers (fc6 of FCN, FCN-AlexNet and the dilated net) as products of spectra, with dilation by
space-to-batch and tiling by overlap-save."""

import json

import pytest
import torch
import torch.nn.functional as F

import fastfcn
import fastfcn.models as models
from fastfcn.runtime import cpu_fast
from fastfcn.runtime.cpu_fast import FftConv, OneDnnConv, _Geom

CL = torch.channels_last


def geom(cin, cout, k, dilation=(1, 1), relu=False, seed=0, stride=(1, 1), groups=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(cout, cin // groups, *k, generator=g) * (2 / (cin * k[0] * k[1])) ** 0.5
    b = torch.randn(cout, generator=g) * 0.1
    return _Geom(w, b, list(stride), list(dilation), groups, relu)


def reference(x, g, padding):
    y = F.conv2d(x.double(), g.weight.double(), g.bias.double(), 1, padding, g.dilation)
    return y.relu() if g.relu else y


def rel_err(y, ref):
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize(
    "cin,cout,k,dilation,size,padding,relu,n",
    [(3, 5, (7, 7), (4, 4), (56, 56), (0, 0), True, 1),  # the dilated net's fc6 geometry
     (3, 5, (7, 7), (1, 1), (16, 16), (0, 0), False, 1),  # FCN's fc6: 10x10 out, 2x2 tiles of 8x8
     (4, 6, (5, 6), (2, 3), (23, 31), (3, 1), True, 2),  # uneven kernel, dilation and padding
     (2, 3, (7, 7), (4, 4), (25, 25), (0, 0), False, 1),  # 1x1 output
     (2, 3, (6, 6), (1, 1), (6, 6), (0, 0), False, 1),  # FCN-AlexNet's fc6 covering its input
     (2, 3, (7, 5), (3, 1), (40, 9), (2, 2), True, 3),
     (8, 4, (5, 5), (1, 1), (61, 47), (2, 2), True, 1)],  # many tiles, padded ("same")
)  # fmt: skip
def test_fp32_equals_the_direct_convolution(cin, cout, k, dilation, size, padding, relu, n):
    g = geom(cin, cout, k, dilation, relu, seed=cin * cout)
    x = torch.randn(n, cin, *size, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=CL)
    ref = reference(x, g, padding)
    y = FftConv(g, torch.float32)(x, padding)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert y.is_contiguous(memory_format=CL)
    # measured 3e-8 - 2.2e-7; a misplaced tile, phase or frequency gives errors of order 1
    assert rel_err(y, ref) < 2e-6


def test_nchw_input_and_unrelued_negative_outputs():
    g = geom(4, 4, (5, 5), (2, 2))
    x = torch.randn(1, 4, 30, 30)  # NCHW strides in, channels_last out
    y = FftConv(g, torch.float32)(x, (0, 0))
    assert (y < 0).any() and rel_err(y, reference(x, g, (0, 0))) < 2e-6


@pytest.mark.parametrize("native", [True, False])
def test_bf16_error_is_that_of_a_direct_bf16_conv(native, monkeypatch):
    """bf16: products on bf16 real and imaginary parts where the CPU has native bf16, else
    complex64 on the bf16-rounded weight; either way an error of the order of oneDNN's direct
    bf16 convolution (fc6 of the dilated net, measured: 4.9e-3 against 4.0e-3)."""
    monkeypatch.setattr(cpu_fast, "native_bf16", lambda: native)
    g = geom(64, 96, (7, 7), (4, 4), relu=True, seed=3)
    x = torch.randn(1, 64, 40, 40, generator=torch.Generator().manual_seed(2)).relu()
    xb = x.to(torch.bfloat16).contiguous(memory_format=CL)
    ref = reference(x, g, (0, 0))
    conv = FftConv(g, torch.bfloat16)
    assert conv.bf16_products == native
    y = conv(xb, (0, 0))
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=CL)
    err = rel_err(y, ref)
    direct = rel_err(OneDnnConv(g, torch.bfloat16)(xb, (0, 0)), ref) if cpu_fast.mkldnn_available() else 4e-3
    assert err < 2.5 * direct, (err, direct)
    assert err > 1e-4  # it did compute in bf16 (fp32 spectra on the fp32 weight give ~1e-7)


def test_fp16_uses_the_fp16_rounded_weight():
    g = geom(16, 8, (7, 7), (2, 2), seed=5)
    x = torch.randn(2, 16, 30, 28, generator=torch.Generator().manual_seed(4)).half()
    rounded = _Geom(g.weight.half().float(), g.bias.half().float(), g.stride, g.dilation, 1, g.relu)
    ref = reference(x.float(), rounded, (1, 1))
    y = FftConv(g, torch.float16)(x, (1, 1))
    assert y.dtype == torch.float16
    # the fp16 rounding of the output is all that is left: <= 2^-11 of each value, far below
    # the difference the unrounded weight makes
    assert ((y.double() - ref).abs() <= ref.abs() * 2**-10 + 1e-3 * ref.abs().max()).all()


def test_offered_only_for_large_stride_1_kernels():
    assert "fft" in cpu_fast.candidates(geom(8, 8, (7, 7), (4, 4)), torch.float32)
    assert "fft-bfloat16" in cpu_fast.candidates(geom(8, 8, (6, 6)), torch.bfloat16)
    assert "fft-float16" in cpu_fast.candidates(geom(8, 8, (5, 5)), torch.float16)
    for g in (geom(8, 8, (3, 3)), geom(8, 8, (7, 3)), geom(8, 8, (7, 7), stride=(2, 2)),
              geom(8, 8, (7, 7), groups=2)):  # fmt: skip
        assert not any(k.startswith("fft") for k in cpu_fast.candidates(g, torch.float32))


def test_refuses_empty_output_and_spectra_that_do_not_fit(monkeypatch):
    conv = FftConv(geom(8, 8, (7, 7), (4, 4)), torch.float32)
    small = torch.randn(1, 8, 24, 24)  # 24 + 0 - 4 * 6 = 0 rows out
    assert not conv.accepts(small, (0, 0))
    with pytest.raises(ValueError, match="gives no output"):
        conv(small, (0, 0))
    x = torch.randn(1, 8, 56, 56)
    assert conv.accepts(x, (0, 0))
    monkeypatch.setattr(cpu_fast, "_mem_available", lambda: 4 * conv.spectra_bytes() - 1)
    assert not conv.accepts(x, (0, 0)) and not conv.runnable(x, (0, 0))
    with pytest.raises(ValueError, match="quarter of the available memory"):
        conv(x, (0, 0))
    monkeypatch.setattr(cpu_fast, "_mem_available", lambda: 4 * conv.spectra_bytes())
    assert conv.accepts(x, (0, 0))
    assert conv.spectra_bytes() == 8 * 8 * 14 * 8 * 8  # C_out x C_in x 2k x (k + 1) complex64


class Prefer:
    """A fake planner timer: candidates named ``prefix``... take 0.1 s, the others 1 s."""

    def __init__(self, prefix):
        self.prefix, self.calls = prefix, []

    def __call__(self, name, fn, best=None):
        self.calls.append(name)
        return (0.1 if name.startswith(self.prefix) else 1.0), fn()


@pytest.mark.parametrize("winner", ["fft", "onednn"])
def test_planner_keeps_the_spectra_only_of_a_winner(winner):
    """The planner prepares the spectra before timing (a one-off, not the layer's speed) and frees
    them when the FFT candidate wins no shape of the layer."""
    if winner == "onednn" and not cpu_fast.mkldnn_available():
        pytest.skip("torch built without oneDNN")
    torch.manual_seed(0)
    m = models.fold_batchnorm(models.build("dilated-frontend", 5, 1 / 16).eval())
    planner = cpu_fast.ConvPlanner(m, timer=Prefer(winner), persist=False)
    fft = planner.convs["fc6"].cands["fft"]
    with torch.no_grad():
        m(torch.randn(1, 3, 200, 190).contiguous(memory_format=CL))
    (entry,) = [e for e in planner.plan() if e["layer"] == "fc6"]
    assert entry["chosen"] == winner and "fft" in entry["times_ms"]
    assert (fft.spectra is not None) == (winner == "fft")


def test_dilated_net_through_the_fft_fc6_agrees_with_torch():
    """The whole dilated net with fc6 through FftConv (a fake timer makes it win) against the torch
    backend: the same labels wherever the top two classes are not within fp32 noise."""
    torch.manual_seed(0)
    model = models.build("dilated-context", 7, 1 / 16).eval()
    ref = fastfcn.Segmenter(model, device="cpu", backend="torch", precision="fp32")
    seg = fastfcn.Segmenter(model, device="cpu", backend="fused", precision="fp32")
    seg._backend.planner.timer = Prefer("fft")
    # 200x180: fc6 gets a 49x47 map (at 61x75 it got 32x34, where fft would do more multiplies)
    x = torch.randint(0, 256, (2, 200, 180, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    got, want = seg.run(x, output="logits"), ref.run(x, output="logits")
    chosen = {e["layer"]: e["chosen"] for e in seg.plan}
    assert chosen["fc6"] == "fft"
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


def _dilated_frontend():
    torch.manual_seed(0)
    return models.fold_batchnorm(models.build("dilated-frontend", 5, 1 / 16).eval())


def _planned_and_cached(tmp_path, monkeypatch, prefer):
    """A dilated front end planned with ``prefer`` winning, its choices in a plan cache under
    tmp_path: (input, output, path of the cache file)."""
    monkeypatch.setenv("FASTFCN_PLAN_CACHE", "on")
    monkeypatch.setenv("FASTFCN_CACHE_DIR", str(tmp_path))
    x = torch.randn(1, 3, 200, 190).contiguous(memory_format=CL)
    m = _dilated_frontend()
    cpu_fast.ConvPlanner(m, timer=Prefer(prefer))
    with torch.no_grad():
        want = m(x)
    (path,) = tmp_path.glob("conv-plan-*.json")
    return x, want, path


def _must_not_time(name, fn, best=None):
    raise AssertionError("a cached choice was re-measured")


def test_a_cached_fft_choice_runs_the_runner_up_until_the_set_up_would_have_paid(tmp_path, monkeypatch):
    """Ski rental: a process that takes "fft" from the plan cache runs the runner-up for
    set-up / saving calls (both recorded when the choice was measured), then builds the spectra."""
    monkeypatch.setenv("FASTFCN_PLAN_CACHE", "on")
    monkeypatch.setenv("FASTFCN_CACHE_DIR", str(tmp_path))
    x = torch.randn(1, 3, 200, 190).contiguous(memory_format=CL)
    m = _dilated_frontend()
    p1 = cpu_fast.ConvPlanner(m, timer=Prefer("fft"))
    with torch.no_grad():
        want = m(x)
    (path,) = tmp_path.glob("conv-plan-*.json")
    data = json.loads(path.read_text())
    (key,) = [k for k in data if k.endswith(cpu_fast.DEFERRAL)]
    rec = data[key]
    assert data[key.removesuffix(cpu_fast.DEFERRAL)] == "fft"
    assert rec["setup_s"] == round(p1.convs["fc6"].cands["fft"].prepare_seconds, 4)
    assert rec["saving_s"] == pytest.approx(0.9) and rec["runner"] != "fft"  # Prefer: 1 s against 0.1 s
    data[key] = {**rec, "setup_s": 2.5, "saving_s": 1.0}  # 3 calls of the runner-up
    path.write_text(json.dumps(data))

    m2 = _dilated_frontend()
    p2 = cpu_fast.ConvPlanner(m2, timer=_must_not_time)
    fc6 = p2.convs["fc6"]
    runner = fc6.cands[rec["runner"]]
    ran = []
    for name, impl in (("fft", fc6.cands["fft"]), ("runner", runner)):
        orig = impl.__call__

        class Spy(type(impl)):
            def __call__(self, x, padding, name=name, orig=orig):
                ran.append(name)
                return orig(x, padding)

        impl.__class__ = Spy
    with torch.no_grad():
        outs = [m2(x) for _ in range(5)]
    assert ran == ["runner"] * 3 + ["fft"] * 2
    (entry,) = [e for e in p2.plan() if e["layer"] == "fc6"]
    assert entry["chosen"] == "fft" and entry["source"] == "cache" and entry["deferred_calls"] == 3
    for out in outs:
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("damage", [None, "text", [1], {"runner": "nope", "setup_s": 1, "saving_s": 1},
                                    {"runner": "RUNNER", "setup_s": float("nan"), "saving_s": 1},
                                    {"runner": "RUNNER", "setup_s": 1, "saving_s": -1},
                                    {"runner": "RUNNER", "setup_s": True, "saving_s": 1},
                                    {"runner": "fft", "setup_s": 1, "saving_s": 1}])  # fmt: skip
def test_an_unusable_deferral_record_runs_the_cached_winner_at_once(damage, tmp_path, monkeypatch):
    x, _, path = _planned_and_cached(tmp_path, monkeypatch, "fft")
    data = json.loads(path.read_text())
    (key,) = [k for k in data if k.endswith(cpu_fast.DEFERRAL)]
    runner = data[key]["runner"]
    if damage is None:
        del data[key]
    else:
        if isinstance(damage, dict):
            damage = {k: (runner if v == "RUNNER" else v) for k, v in damage.items()}
        data[key] = damage
    path.write_text(json.dumps(data, allow_nan=True))
    m2 = _dilated_frontend()
    p2 = cpu_fast.ConvPlanner(m2, timer=_must_not_time)
    with torch.no_grad():
        m2(x)
    (entry,) = [e for e in p2.plan() if e["layer"] == "fc6"]
    assert entry["chosen"] == "fft" and "deferred_calls" not in entry
    assert p2.convs["fc6"].cands["fft"].prepared


@pytest.mark.parametrize("content", ["[1, 2]", '"x"', "{", '{"KEY": [1]}'])
def test_a_damaged_plan_cache_is_measured_again(content, tmp_path, monkeypatch):
    """A cache file that is not a JSON object, or a layer entry that is not a name, is measured
    again, not an error (it was an AttributeError / unhashable-type TypeError)."""
    x, want, path = _planned_and_cached(tmp_path, monkeypatch, "onednn")
    if "KEY" in content:
        data = json.loads(path.read_text())
        key = sorted(data)[0]
        content = json.dumps({**data, key: [1]})
    path.write_text(content)
    m2 = _dilated_frontend()
    timer = Prefer("onednn")
    p2 = cpu_fast.ConvPlanner(m2, timer=timer)
    with torch.no_grad():
        got = m2(x)
    assert timer.calls and any(e["source"] == "measured" for e in p2.plan())
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_format_plan_names_a_deferral():
    e = {"layer": "fc6", "input": [1, 512, 56, 56], "compute_dtype": "bfloat16", "chosen": "fft-bfloat16",
         "source": "cache", "times_ms": {}, "deferred_calls": 4}  # fmt: skip
    assert cpu_fast.format_plan([e]).endswith("(cache, after 4 calls of the runner-up)")
    del e["deferred_calls"]
    assert cpu_fast.format_plan([e]).endswith("(cache)")


def test_a_choice_cached_before_a_candidate_existed_is_measured_again(tmp_path, monkeypatch):
    """A plan cache written when fc6 had no fft candidate (an earlier version) does not keep fc6 on
    its old choice: the candidate set is part of the key."""
    monkeypatch.setenv("FASTFCN_PLAN_CACHE", "on")
    monkeypatch.setenv("FASTFCN_CACHE_DIR", str(tmp_path))
    x = torch.randn(1, 3, 200, 190).contiguous(memory_format=CL)
    m = _dilated_frontend()
    old = cpu_fast.ConvPlanner(m, timer=Prefer("onednn"))
    old.convs["fc6"].cands.pop("fft")  # as before fft existed
    with torch.no_grad():
        m(x)
    m2 = _dilated_frontend()
    timer = Prefer("fft")
    p2 = cpu_fast.ConvPlanner(m2, timer=timer)
    with torch.no_grad():
        m2(x)
    chosen = {e["layer"]: (e["chosen"], e["source"]) for e in p2.plan()}
    assert chosen["fc6"] == ("fft", "measured")
    assert chosen["conv1_1"] == ("onednn", "cache")  # same candidates: the cached choice stands


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiles_in_chunks_give_the_same_result(dtype, monkeypatch):
    """The products go in chunks of tiles (FFT_CHUNK_BYTES bounds their memory): one tile a chunk
    gives what one chunk for all gives, up to the order of the matrix product's sums (a misplaced
    tile would differ by the output's magnitude)."""
    g = geom(8, 16, (7, 7), (2, 2), relu=True, seed=7)
    x = torch.randn(2, 8, 45, 39, generator=torch.Generator().manual_seed(5)).to(dtype)
    whole = FftConv(g, dtype)(x, (3, 3))
    monkeypatch.setattr(cpu_fast, "FFT_CHUNK_BYTES", 1)
    chunked = FftConv(g, dtype)(x, (3, 3))
    step = 1e-6 if dtype == torch.float32 else 2**-8  # fp32 sums' order; one bf16 rounding
    torch.testing.assert_close(chunked.float(), whole.float(), rtol=0, atol=step * whole.abs().max().item())
    bound = 2e-6 if dtype == torch.float32 else 1e-2  # bf16: rounded input, weight and output
    assert rel_err(chunked.float(), reference(x.float(), g, (3, 3))) < bound


@pytest.mark.parametrize(
    "shape,padding,k,dilation,offered",
    [((1, 8, 56, 56), (0, 0), (7, 7), (4, 4), True),  # the dilated net's fc6: 7x fewer
     ((1, 8, 30, 30), (0, 0), (7, 7), (4, 4), False),  # 6x6 out over 16 phases: 4x more
     ((2, 8, 22, 22), (0, 0), (7, 7), (1, 1), True),  # FCN-8s's fc6 at 500x500
     ((2, 8, 7, 7), (0, 0), (7, 7), (1, 1), False),  # DeconvNet's fc6: one output
     ((2, 8, 1, 1), (6, 6), (7, 7), (1, 1), False),  # its deconvolution: one tap per output
     ((1, 8, 21, 21), (0, 0), (6, 6), (1, 1), True)],  # FCN-AlexNet's fc6
)  # fmt: skip
def test_offered_only_where_it_does_fewer_multiplies(shape, padding, k, dilation, offered):
    conv = FftConv(geom(8, 8, k, dilation), torch.float32)
    x = torch.randn(shape)
    assert conv.accepts(x, padding) == offered
    assert conv.runnable(x, padding)
    if not offered:  # still right when called
        assert rel_err(conv(x, padding), reference(x, conv.g, padding)) < 2e-6


def test_taps_inside_counts_what_a_loop_over_taps_counts():
    """The closed form behind ``accepts``' multiply count, against the plain count of (output, tap)
    pairs landing on the input, over sizes, paddings, kernels and dilations."""
    for size in range(1, 12):
        for pad in range(8):
            for k in range(1, 8):
                for d in range(1, 5):
                    out = size + 2 * pad - d * (k - 1)
                    if out <= 0:
                        continue
                    want = sum(0 <= i - pad + t * d < size for i in range(out) for t in range(k))
                    assert cpu_fast._taps_inside(size, pad, k, d, out) == want, (size, pad, k, d)
