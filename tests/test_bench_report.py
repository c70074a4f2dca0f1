"""fastfcn bench-report on hand-made result files, and the benchmark conftest's writer
feeding it (a tiny benchmark run through pytester with benchmarks/conftest.py)."""

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from fastfcn import bench_report, cli

pytest_plugins = ("pytester",)

E2E = "benchmarks/test_end_to_end.py::test_end_to_end"
BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def e2e(case_key, backend, precision, median_ms, batch=1, **extra):
    info = {
        "case": f"FCN-8s {case_key}", "case_key": case_key, "arch": "fcn8s", "batch": batch,
        "height": 500, "width": 500, "backend": backend, "precision": precision,
        "median_ms": median_ms, "iqr_ms": 0.1 * median_ms, "ms_per_image": median_ms / batch,
        "images_per_s": 1e3 * batch / median_ms, "x_faster_than_paper": 175.0 / (median_ms / batch),
        "headline": case_key == "500x500-b1",
    }  # fmt: skip
    info.update(extra)
    name = f"test_end_to_end[{case_key}-{backend}-{precision}]"
    return {
        "name": name, "fullname": f"benchmarks/test_end_to_end.py::{name}", "extra_info": info,
        "stats": {"median": median_ms / 1e3, "iqr": 0.1 * median_ms / 1e3},
    }  # fmt: skip


def results_file(path, device, started, benchmarks, not_measured=(), **env):
    doc = {
        "schema": "fastfcn-bench/1",
        "environment": {"device": {"name": device, "torch": "2.11.0"}, "date": started[:10],
                        "started": started, **env},
        "benchmarks": list(benchmarks),
        "not_measured": list(not_measured),
    }  # fmt: skip
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def gpu_dir(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    results_file(
        d / "h200-old.json", "NVIDIA H200", "2026-11-01T10:00:00+00:00",
        [e2e("500x500-b1", "fused", "bf16", 9.0)],  # superseded by the newer file
        not_measured=[{"nodeid": f"{E2E}[500x500-b1-compile-bf16]",
                       "outcome": "skipped", "reason": "compile: no triton"}],
    )  # fmt: skip
    results_file(
        d / "h200-new.json", "NVIDIA H200", "2026-11-02T10:00:00+00:00",
        [
            e2e("500x500-b1", "torch", "fp32", 10.0, speedup_vs_torch_fp32=1.0),
            e2e("500x500-b1", "fused", "bf16", 2.0, fraction_of_floor=0.37),  # no speedup field: computed
            e2e("500x500-b8", "fused", "bf16", 8.0, batch=8, reduced_from="FCN-8s 500x500 b8"),
            {"name": "test_unpool[1080p]", "fullname": "benchmarks/test_kernels.py::test_unpool[1080p]",
             "extra_info": {"gbps": 2900.0, "fraction_of_hbm": 0.6}, "stats": {"median": 1e-4, "iqr": 1e-6}},
        ],
        not_measured=[{"nodeid": f"{E2E}[500x500-b1-onnxruntime-fp32]",
                       "outcome": "skipped", "reason": "onnxruntime: CUDA provider not installed"}],
        profile="gpu",
    )  # fmt: skip
    # A measured result in a later file removes an earlier "not measured" entry.
    doc = json.loads((d / "h200-new.json").read_text())
    doc["benchmarks"].append(e2e("500x500-b1", "compile", "bf16", 4.0))
    (d / "h200-new.json").write_text(json.dumps(doc))
    return d


def table_rows(text):
    """The end-to-end table's rows (the fused-vs-peer table below it starts with the case too)."""
    table = text.split("| case | backend |", 1)[1].split("\n\n", 1)[0]
    return [line for line in table.splitlines() if line.startswith("| FCN-8s")]


def test_markdown_values(gpu_dir):
    devices = bench_report.load([str(gpu_dir)])
    assert list(devices) == ["NVIDIA H200"]
    text = bench_report.markdown(devices)
    rows = table_rows(text)
    # Headline first, torch before fused before compile; the old 9 ms fused row lost to 2 ms.
    assert [r.split("|")[2].strip() for r in rows] == ["torch", "fused", "compile", "fused"]
    fused = rows[1].split("|")
    assert fused[4].strip() == "2.00"  # ms/image
    assert fused[6].strip() == "500.00"  # img/s
    assert fused[7].strip() == "5.00x"  # 10 ms torch fp32 / 2 ms
    assert fused[8].strip() == "87.50"  # 175 / 2
    assert fused[9].strip() == "37.0"  # % of floor
    b8 = rows[3].split("|")
    assert "(for FCN-8s 500x500 b8)" in b8[1] and b8[4].strip() == "1.00" and b8[5].strip() == "0.10"
    assert "| test_unpool[1080p] | 0.1 |" in text and "| 2900 | 60.0 |" in text
    assert "onnxruntime: CUDA provider not installed" in text
    assert "no triton" not in text  # measured later: not listed as skipped
    assert "torch 2.11.0" in text and "profile gpu" in text


def test_fused_against_the_fastest_peer(gpu_dir):
    rows = [
        e2e("a", "fused", "fp32", 100.0)["extra_info"], e2e("a", "onnxruntime", "fp32", 150.0)["extra_info"],
        e2e("a", "openvino", "fp32", 120.0)["extra_info"], e2e("a", "torch", "fp32", 90.0)["extra_info"],
        e2e("a", "fused", "bf16", 50.0)["extra_info"], e2e("a", "openvino", "bf16", 40.0)["extra_info"],
        e2e("b", "fused", "bf16", 10.0)["extra_info"], e2e("b", "compile", "fp32", 5.0)["extra_info"],
    ]  # fmt: skip
    got = {(e["case_key"], e["precision"]): e for e in bench_report.peer_ratios(rows)}
    assert set(got) == {("a", "fp32"), ("a", "bf16"), ("b", "bf16")}  # no fused fp32 on b: no entry
    # torch is the reference, not a peer: the fastest fp32 peer is OpenVINO at 120 ms.
    assert got[("a", "fp32")]["peer"] == "openvino" and got[("a", "fp32")]["ratio"] == pytest.approx(1.2)
    assert got[("a", "bf16")]["ratio"] == pytest.approx(0.8)  # the peer is faster: ratio < 1
    assert got[("b", "bf16")]["ratio"] is None and "no peer" in got[("b", "bf16")]["reason"]
    # The report's table: fused 2 ms bf16 against compile 4 ms bf16 on the headline case.
    assert "| FCN-8s 500x500-b1 | bf16 | 2.0 | compile | 4.0 | 2.00x |" in bench_report.markdown(
        bench_report.load([str(gpu_dir)])
    )


def test_cli_writes_markdown_and_png(gpu_dir, tmp_path, capsys):
    md, png = tmp_path / "out" / "r.md", tmp_path / "out" / "r.png"
    rc = cli.main(["bench-report", str(gpu_dir), "--markdown", str(md), "--png", str(png)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert md.read_text() in printed and "5.00x" in md.read_text()
    img = Image.open(png).convert("RGB")
    assert img.width > 500 and img.height > 100
    # A bar in the fused colour was drawn.
    assert bench_report.BACKEND_COLOURS["fused"] in {c for _, c in img.getcolors(maxcolors=1 << 20)}


def test_cli_missing_file(tmp_path, capsys):
    assert cli.main(["bench-report", str(tmp_path / "nope.json")]) == 1
    assert "no benchmark results" in capsys.readouterr().err


def test_rejects_non_results(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"a": 1}')
    with pytest.raises(ValueError, match="benchmarks"):
        bench_report.load([str(p)])


def test_reads_plain_pytest_benchmark_json(tmp_path):
    p = tmp_path / "pb.json"
    p.write_text(json.dumps({
        "machine_info": {"cpu": {"brand_raw": "Some CPU"}}, "datetime": "2026-11-02T00:00:00",
        "benchmarks": [e2e("500x500-b1", "torch", "fp32", 1500.0)],
    }))  # fmt: skip
    devices = bench_report.load([str(p)])
    assert list(devices) == ["Some CPU"]
    assert "| 1500.00 |" in bench_report.markdown(devices)


def test_conftest_writer_feeds_the_report(pytester):
    """A tiny benchmark session with benchmarks/conftest.py writes a file the report reads."""
    for name in ("conftest.py", "common.py"):
        shutil.copy(BENCH_DIR / name, pytester.path / name)
    pytester.makepyfile(
        test_tiny="""
        import pytest

        def test_tiny(benchmark, record_extra):
            benchmark.pedantic(sum, args=(range(100),), rounds=3)
            record_extra(benchmark, nbytes=800, flops=100, items=2)

        def test_skipped(benchmark):
            pytest.skip("backend x cannot run here: because")
        """
    )
    out = pytester.path / "res.json"
    res = pytester.runpytest_inprocess("--benchmark-only", f"--bench-results={out}", "-p", "no:cacheprovider")
    res.assert_outcomes(passed=1, skipped=1)
    doc = json.loads(out.read_text())
    (b,) = doc["benchmarks"]
    x = b["extra_info"]
    assert x["rounds"] == 3 and x["median_ms"] > 0 and x["items_per_s"] > 0
    assert x["gbps"] == pytest.approx(800 / (x["median_ms"] / 1e3) / 1e9)
    assert x["device"] == doc["environment"]["device"]["name"] and x["torch"]
    assert doc["not_measured"][0]["reason"] == "backend x cannot run here: because"
    assert "--bench-results" in doc["environment"]["command"]
    text = bench_report.markdown(bench_report.load([str(out)]))
    assert "| test_tiny |" in text and "backend x cannot run here" in text
    res.stdout.fnmatch_lines(["*fastfcn benchmarks*", f"results: {out}*"])


def _bench_module(name: str = "common"):
    """benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"fastfcn_bench_{name}", BENCH_DIR / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    "name, label, bf16, fp32",
    [
        ("NVIDIA H200", "H200", 989.0, 66.9),
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.0, 66.9),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756.0, 51.2),
        ("NVIDIA H100 NVL", "H100 NVL", 835.5, 60.0),
        ("NVIDIA A100-SXM4-80GB", "A100 80GB", 312.0, 19.5),
        ("NVIDIA A100-PCIE-40GB", "A100 40GB", 312.0, 19.5),
    ],
)
def test_peak_table(name, label, bf16, fp32):
    e = _bench_module().gpu_peak(name)
    assert e["label"].startswith(label) and e["tflops"]["bf16"] == bf16 and e["tflops"]["fp32"] == fp32
    assert "datasheet" in e["source"]


def test_floor_fields():
    common = _bench_module()
    assert common.gpu_peak("Tesla K40c") is None
    info = {"name": "NVIDIA H200", "peak": common.gpu_peak("NVIDIA H200")}
    # docs/facts.md, "Cost of FCN-8s": 363 GFLOP at 989 TFLOP/s is a 0.37 ms floor.
    f = common.floor_fields(363e9, 1e-3, info, "bf16")
    assert f["floor_ms"] == pytest.approx(0.367, abs=1e-3) and f["fraction_of_floor"] == pytest.approx(
        0.367, abs=1e-3
    )
    assert f["achieved_tflops"] == pytest.approx(363.0)
    none = common.floor_fields(
        1e9, 1.0, {"name": "x", "peak": {"tflops": {"fp32": None}, "reason": "why"}}, "fp32"
    )
    assert none["fraction_of_floor"] is None and none["floor_reason"] == "why"


def test_floor_counts_the_work_done():
    """% of floor is of the MACs the backend computed: a fused result from before
    ``floor_work_gmac`` was recorded (floor on nominal MACs) is rescaled to its computed MACs;
    a result that records the work it was measured on, or another backend's, is kept."""
    old = e2e("a", "fused", "fp32", 100.0, fraction_of_floor=1.13, gmac=69.2, computed_gmac=35.9)
    old = old["extra_info"]
    assert bench_report.floor_fraction(old) == pytest.approx(1.13 * 35.9 / 69.2)
    new = dict(old, floor_work_gmac=35.9, fraction_of_floor=0.59)
    assert bench_report.floor_fraction(new) == pytest.approx(0.59)
    torch_row = dict(old, backend="torch", fraction_of_floor=0.5)
    assert bench_report.floor_fraction(torch_row) == pytest.approx(0.5)
    whole = dict(old, computed_gmac=69.2)  # a net without a dead zone: nothing skipped
    assert bench_report.floor_fraction(whole) == pytest.approx(1.13)
    assert bench_report.floor_fraction(dict(old, fraction_of_floor=None)) is None


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("side", [9, 12])  # 9: the last tile row/column is partly padding
def test_bf16_alternatives_winograd_is_the_convolution(m, side):
    """benchmarks/bf16_alternatives.py measures Winograd's bf16 error and speed: with fp32
    products its winograd() must be the valid 3x3 convolution, or the measured error is noise."""
    import torch
    import torch.nn.functional as F

    mod = _bench_module("bf16_alternatives")
    g = torch.Generator().manual_seed(m * 100 + side)
    x = torch.randn(2, 5, side, side + 1, generator=g)
    w = torch.randn(7, 5, 3, 3, generator=g)
    y = mod.winograd(x, w, m, torch.float32)
    ref = F.conv2d(x, w)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert (mod.winograd(x, w, m, torch.bfloat16) - ref).abs().max() > 0  # bf16 products do round
