"""benchmarks/gpu_first_contact.sh in its CPU dry run (tiny sizes, Triton's interpreter): every
stage runs and writes its results, so the one-call GPU script cannot rot between GPU runs."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_first_contact.sh"


@pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout"
)
def test_caps_are_cut_to_what_is_left_of_the_run(tmp_path):
    """Every stage's cap is cut to what is left of FC_TOTAL (less the summary's 10 s): a run
    given 14 s gives env at most 4 s instead of its 20 and the headline what env left."""
    import re

    out = tmp_path / "fc"
    env = {**os.environ, "FC_DRY": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "STAGES": "env headline", "FC_TOTAL": "14",
           "TRITON_CACHE_DIR": str(tmp_path / "triton")}  # fmt: skip
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (out / "run.log").read_text()
    caps = {m[0]: int(m[1]) for m in re.findall(r"=== (\w+) \(cap (\d+) s\)", log)}
    assert set(caps) == {"env", "headline"}, log
    assert caps["env"] <= 4 and 1 <= caps["headline"] <= 4, caps


@pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout"
)
def test_summary_keeps_its_own_ten_seconds(tmp_path):
    """The stages before leave the summary the 10 s the run keeps for it: with nothing else
    left (FC_TOTAL 10) it still gets its cap of 10 s and writes summary.txt. The H200's third
    call gave it 1 s (the tests had taken the rest) and it was killed before writing."""
    out = tmp_path / "fc"
    env = {**os.environ, "FC_DRY": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "STAGES": "summary", "FC_TOTAL": "10"}  # fmt: skip
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (out / "run.log").read_text()
    assert "=== summary (cap 10 s)" in log and "hit its cap" not in log, log
    assert (out / "summary.txt").exists()


@pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout"
)
def test_dry_run_writes_every_stage(tmp_path):
    out = tmp_path / "fc"
    env = {
        **os.environ,
        "FC_DRY": "1",
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
        "TRITON_CACHE_DIR": str(tmp_path / "triton"),
    }
    env.pop("STAGES", None)
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (out / "run.log").read_text()
    assert "hit its cap" not in log and "ended with status" not in log, log[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "env.json",
            "correctness.json",
            "headline.json",
            "profile.json",
            "tests.log",
            "summary.txt",
            "run.log",
        ]
    )  # flat and few: the device tool returns at most 8 files
    data = {
        n: json.loads((out / f"{n}.json").read_text()) for n in ("env", "correctness", "headline", "profile")
    }
    for name, d in data.items():
        assert d["errors"] == [], (name, d["errors"])
    assert data["env"]["c_compiler"] and data["env"]["python_h"] is True  # Triton's launchers need both
    kernels = {k["name"]: k for k in data["correctness"]["kernels"]}
    for kind in ("bilinear", "depthwise", "dense"):
        k = next(v for n, v in kernels.items() if n.startswith(f"final_stage_{kind}"))
        assert (
            k["mismatch_beyond_ties"] == 0
            and k["logits_max_err_over_max"] < 1e-5
            and k["probs_max_abs_err"] < 1e-5
        )
        assert all(v["equals_chosen"] for n, v in kernels.items() if n.startswith(f"variant_{kind}_labels"))
    convs = [v for n, v in kernels.items() if n.startswith("triton_conv_")]
    assert len(convs) == 4
    assert all(v["err_over_max"] < (1e-5 if "float32" in v["name"] else 2e-2) for v in convs)
    exact = [v["exact"] for n, v in kernels.items() if n.startswith(("maxpool", "unpool", "window_paste"))]
    assert len(exact) == 10 and all(exact)  # switches 2 + unpool 4 + NHWC pool 2 + window paste 2
    checks = data["correctness"]["graph_checks"]
    for key in (
        "replay_bitwise_repeatable",
        "sensitive_to_input",
        "pinned_host_input_equals_device_input",
        "threads_4x3_consistent",
    ):
        assert checks[key] is True, key
    # Two Segmenters each measure and choose their own convolutions (CPU planner here, cuDNN's
    # benchmark mode on a GPU); at bf16 on a random net with nearly flat logits another choice
    # moves a few labels (measured 0.9962 in a dry run); a broken path agrees on ~1/C of them.
    assert checks["graph_vs_no_graph"]["label_agreement"] >= 0.99
    assert data["correctness"]["fused_bf16_conv_plan"]["cpu_plan"]  # the CPU planner's, in a dry run
    cases = data["headline"]["cases"]
    measured = {(c["backend"], c["batch"]) for c in cases if c.get("ms_per_image", 0) > 0}
    assert measured == {
        ("fused", 1),
        ("fused", 2),
        ("torch", 1),
        ("torch", 2),
        ("fused-whole", 1),
        ("fused-whole", 2),
    }
    assert {c["backend"] for c in cases if "skipped" in c} == {"compile"}
    profiles = data["profile"]["profiles"]
    assert [(p["backend"], p["batch"]) for p in profiles] == [("fused", 1), ("torch", 1)]
    assert all("convolution" in p["by_category_ms_count"] for p in profiles)
    assert profiles[0]["conv_choices"]["cpu_plan"] and profiles[1]["conv_choices"] == {"cpu_plan": []}
    tests_log = (out / "tests.log").read_text()
    assert tests_log.count("collected") == 2, tests_log[-2000:]
    summary = (out / "summary.txt").read_text()
    assert "fused      1" in summary and "check threads_4x3_consistent: True" in summary


def _fc():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_first_contact as fc
    finally:
        sys.path.pop(0)
    return fc


def test_conv_plan_reports_choices_pool_epilogues_and_failures(monkeypatch):
    """What the first GPU run must see of the fused CUDA backend: per layer the candidate chosen
    per shape, the conv + pool choice, and why a candidate fell back (here cuDNN's fused op
    refuses and the Triton conv has no GPU)."""
    import types

    import torch

    from fastfcn.models import build
    from fastfcn.runtime import cuda_fast

    def refuses(*args):
        raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED")

    monkeypatch.setattr(torch, "cudnn_convolution_relu", refuses, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    m = build("fcn8s", 21, 0.0625).eval().requires_grad_(False)
    cuda_fast.install(m)
    with torch.inference_mode():
        m(torch.randn(1, 3, 40, 36), "labels")
    plan = _fc().conv_plan(types.SimpleNamespace(_backend=types.SimpleNamespace(model=m)))
    assert len(plan) == 14 and len(plan["fc6"]["choice"]) == 1
    convs = {k: v for k, v in plan.items() if k.startswith("conv")}
    assert all(list(v["choice"].values()) == ["eager"] for v in convs.values())
    assert sorted(k for k, v in convs.items() if "pool" in v) == [
        f"conv{i}_{j}" for i, j in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
    ]
    failed = plan["conv1_1"]["failed"]
    assert any(k.startswith("cudnn_relu") and "NOT_SUPPORTED" in v for k, v in failed.items())
    assert any(k.startswith("triton") and "CUDA tensors" in v for k, v in failed.items())


def test_categories():
    fc = _fc()
    assert fc.categorize("upsample_kernel") == "fastfcn_kernels"
    assert fc.categorize("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "convolution"
    assert fc.categorize("void cudnn::ops::nchwToNhwcKernel<__nv_bfloat16>") == "layout_copies"
    assert (
        fc.categorize(
            "void at::native::vectorized_elementwise_kernel<4, at::native::(anonymous)::launch_clamp_scalar"
        )
        == "relu"
    )
    assert (
        fc.categorize("void at::native::(anonymous namespace)::max_pool_forward_nhwc<c10::BFloat16>")
        == "pool"
    )
    assert (
        fc.categorize("void at::native::elementwise_kernel<128, 2, CUDAFunctor_add<c10::BFloat16>>") == "bias"
    )
    assert fc.categorize("triton_poi_fused_convolution_relu_3") == "inductor_fused"
    assert fc.categorize("conv_bias_relu_kernel") == "fastfcn_conv"
    assert fc.categorize("aten::mm") == "convolution" and fc.categorize("aten::relu_") == "relu"


def test_summary_judges_the_issue_targets():
    """The summary says of each target whether this run met it, from the stages' JSON: fused
    bf16 b1 <= 0.8 ms and >= 1.1x compile, b32 >= 1,500 images/s, final stage >= 10x eager."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_first_contact as fc
    finally:
        sys.path.pop(0)
    h = {"cases": [
        {"backend": "fused", "batch": 1, "ms_per_batch": 0.7, "ms_per_image": 0.7, "images_per_s": 1428.6},
        {"backend": "compile", "batch": 1, "ms_per_batch": 0.84, "ms_per_image": 0.84, "images_per_s": 1190},
        {"backend": "fused", "batch": 32, "ms_per_batch": 25.6, "ms_per_image": 0.8, "images_per_s": 1250.0},
        {"backend": "compile", "batch": 32, "error": "cap reached"},
    ]}  # fmt: skip
    nan = float("nan")
    c = {"kernels": [{"name": "final_stage_bilinear_b8_1080x1920", "ms": 0.5, "torch_ms": 4.0},
                     {"name": "final_stage_dense_b8_1080x1920", "ms": nan, "torch_ms": 9.0}]}  # fmt: skip
    lines = fc.issue_targets(c, h)
    assert lines[0] == "target fused b1 ms: 0.700 (<= 0.8 ms on an H200) met"
    assert lines[1] == "target fused vs compile b1: 1.200 (>= 1.1x) met"
    assert lines[2] == "target fused b32 images/s: 1250.000 (>= 1500) MISSED"
    assert lines[3] == "target final_stage_bilinear_b8_1080x1920 labels vs eager: 8.000 (>= 10x) MISSED"
    assert lines[4].endswith("not measured (>= 10x)") and len(lines) == 5
    assert all(x.endswith("not measured (<= 0.8 ms on an H200)") for x in fc.issue_targets({}, {})[:1])
