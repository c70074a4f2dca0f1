"""End-to-end speed: ``Segmenter.run(uint8 images, output="labels")`` per backend and precision.

Cases (the paper's nets, width 1, seeded random weights; upsampling stays bilinear):
FCN-8s 500x500 at batch 1 and 8, FCN-32s and FCN-16s 500x500 batch 1, FCN-8s on a
1920x1080 frame, DeconvNet 224x224 batch 32, the dilated net with the large context
module at 500x500. The gpu profile runs these sizes; the cpu profile keeps the
headline (FCN-8s 500x500 batch 1) at full size and shrinks the rest (listed in the
terminal summary and in each result's extra_info).

Peers (issue 9, cpu profile): FCN-8s 500x500 b1, DeconvNet 224x224 b2 and the dilated
net with the large context at 250x250 run fastfcn (torch, fused fp32, bf16 and fp16) side by
side with ONNX Runtime fp32 and fp16, OpenVINO f32 and bf16 and torch.compile, in one session
at the Segmenter's thread count; bf16 only where the CPU has native bf16 (AVX512-BF16 or
AMX, read from /proc/cpuinfo at run time), else skipped saying so with the CPU model and
flags. (torch's own fp16 is not a peer there: its CPU convolution at fp16 is the slow direct
loop, 5.4 s for FCN-32s width 0.25 at 250x250 against 0.12 s at fp32.) The results file and
the terminal summary give fused against the fastest peer at each precision. ONNX Runtime
and OpenVINO run one fp32 export per arch (timed once, ``export_s``), so their ``setup_s``
is session creation and compilation only; ONNX Runtime fp16 exports its fp16 graph itself,
inside its ``setup_s``. Cases run
one after the other, not in interleaved rounds (pytest-benchmark times one target per
test); each result records the 1-minute load average.

Method: the same seeded inputs for every backend; two warm-up runs (one per input,
which also records the expected labels); timed rounds alternate the two inputs, with
the device synchronised inside the timed region. Between rounds (untimed) the last
output is checked against the expected labels for its input and then overwritten
with an invalid class id, so a backend that returned a cached or stale buffer fails.
CUDA graphs and cuDNN autotuning are the Segmenter's own (it captures per shape on GPU).
A backend that cannot run raises BackendUnavailableError: the case is skipped with
its message.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import gc
import os
import shutil
import signal
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from common import PAPER_MS, PAPER_SOURCE, MemoryPeak, floor_fields, native_bf16_cpu, sync

import fastfcn
from fastfcn.flops import count_macs
from fastfcn.runtime.registry import backend_spec, onnx_backends

SEED = 0
WIDTH = 1.0
NUM_CLASSES = 21
NAMES = {
    "fcn8s": "FCN-8s", "fcn16s": "FCN-16s", "fcn32s": "FCN-32s", "deconvnet": "DeconvNet",
    "dilated-context": "Dilated+context(large)",
}  # fmt: skip


@dataclass(frozen=True)
class Case:
    arch: str
    batch: int
    height: int
    width: int

    @property
    def key(self) -> str:
        return f"{self.arch}-{self.width}x{self.height}-b{self.batch}"

    @property
    def label(self) -> str:
        return f"{NAMES[self.arch]} {self.width}x{self.height} b{self.batch}"


# The paper-size cases (issue 5).
HEAD = "fcn8s-500"
CASES = {
    HEAD: Case("fcn8s", 1, 500, 500),
    "fcn8s-500-b8": Case("fcn8s", 8, 500, 500),
    "fcn32s-500": Case("fcn32s", 1, 500, 500),
    "fcn16s-500": Case("fcn16s", 1, 500, 500),
    "fcn8s-1080p": Case("fcn8s", 1, 1080, 1920),
    "deconvnet-224-b32": Case("deconvnet", 32, 224, 224),
    "dilated-context-500": Case("dilated-context", 1, 500, 500),
}
# CPU profile: FCN-8s 500x500 at 2 cores costs ~1-2 s per image per backend, and
# torch.compile / ONNX export add ~30-90 s per shape, so the other cases run smaller,
# with torch and fused only (the 10-minute budget of issue 5).
CPU_CASES = {
    HEAD: CASES[HEAD],
    "fcn8s-500-b8": Case("fcn8s", 2, 250, 250),
    "fcn32s-500": Case("fcn32s", 1, 250, 250),
    "fcn16s-500": Case("fcn16s", 1, 250, 250),
    "fcn8s-1080p": Case("fcn8s", 1, 270, 480),
    "deconvnet-224-b32": Case("deconvnet", 2, 224, 224),
    "dilated-context-500": Case("dilated-context", 1, 250, 250),
}

# The peer comparison on the CPU (issue 9): cases, and (backend, precision) in run order.
PEER_CASES = (HEAD, "deconvnet-224-b32", "dilated-context-500")
PEER_RUNS = (
    ("torch", "fp32"), ("fused", "fp32"), ("onnxruntime", "fp32"), ("openvino", "fp32"),
    ("compile", "fp32"), ("fused", "bf16"), ("openvino", "bf16"), ("fused", "fp16"), ("onnxruntime", "fp16"),
)  # fmt: skip


def gpu_plan() -> list[tuple[str, str, str]]:
    """(case, backend, precision) in priority order: a time budget cuts from the end."""
    plan = [
        (HEAD, "torch", "fp32"), (HEAD, "torch", "bf16"), (HEAD, "fused", "bf16"),
        (HEAD, "compile", "bf16"), (HEAD, "onnxruntime", "fp32"), (HEAD, "fused", "fp16"),
        (HEAD, "torch", "fp16"), (HEAD, "fused", "fp32"), (HEAD, "torch", "tf32"),
        (HEAD, "fused", "tf32"), (HEAD, "onnxruntime", "fp16"), (HEAD, "compile", "fp32"),
    ]  # fmt: skip
    others = [k for k in CASES if k != HEAD]
    for k in others:
        plan += [(k, "torch", "fp32"), (k, "torch", "bf16"), (k, "fused", "bf16"), (k, "fused", "fp16")]
    for k in others:
        plan += [(k, "compile", "bf16")]
    for k in others:
        plan += [(k, "onnxruntime", "fp32")]
    return plan


def cpu_plan() -> list[tuple[str, str, str]]:
    """The peer cases first (the budget cuts from the end), then the reduced others."""
    plan = [(k, b, p) for k in PEER_CASES for b, p in PEER_RUNS]
    for k in CPU_CASES:
        if k not in PEER_CASES:
            plan += [(k, "torch", "fp32"), (k, "fused", "fp32")]
    return plan


def pytest_generate_tests(metafunc):
    if "e2e" not in metafunc.fixturenames:
        return
    state = metafunc.config._fastfcn_bench
    cpu = state.profile == "cpu"
    cases = CPU_CASES if cpu else CASES
    plan = cpu_plan() if cpu else gpu_plan()
    device = "cpu" if cpu else "cuda"
    # The plans are priority orders; the registry says which (backend, precision) exist.
    wrong = [(b, p) for _, b, p in plan if not backend_spec(b).supports(device, p)]
    if wrong:
        raise ValueError(f"the {device} plan names runs its backends' registry entries do not offer: {wrong}")
    params = [pytest.param((k, cases[k], b, p), id=f"{cases[k].key}-{b}-{p}") for k, b, p in plan]
    metafunc.parametrize("e2e", params)
    if cpu:
        reduced = [f"{CASES[k].label} -> {c.label}" for k, c in CPU_CASES.items() if c != CASES[k]]
        peers = ", ".join(CPU_CASES[k].label for k in PEER_CASES)
        runs = ", ".join(f"{b} {p}" for b, p in PEER_RUNS)
        state.notes.append(
            f"end-to-end (cpu profile): peers on {peers}: {runs}; 3 rounds each. "
            "Others torch and fused fp32 only, 2 rounds. Reduced sizes: " + "; ".join(reduced)
        )
    else:
        state.notes.append(f"end-to-end (gpu profile): {len(plan)} cases in priority order, paper sizes")


# Models are built once per arch (seeded) and deep-copied per Segmenter, which may
# convert or fold its copy in place. One kept: FCN-8s at width 1 is 538 MB of fp32.
_MODELS: OrderedDict = OrderedDict()
_FLOPS: dict = {}
_ONNX: dict = {}  # arch -> (folder, path, export seconds): one fp32 export, for onnxruntime and openvino


def seeded_model(arch: str) -> torch.nn.Module:
    if arch not in _MODELS:
        _MODELS.clear()
        gc.collect()
        torch.manual_seed(SEED)
        _MODELS[arch] = fastfcn.models.build(arch, NUM_CLASSES, WIDTH).eval()
    return _MODELS[arch]


def case_count(case: Case):
    """The case's FlopCount: nominal MACs and those computed with the image-independent
    positions skipped (fastfcn.runtime.deadzone)."""
    key = (case.arch, case.batch, case.height, case.width)
    if key not in _FLOPS:
        _FLOPS[key] = count_macs(seeded_model(case.arch), (case.batch, 3, case.height, case.width))
    return _FLOPS[key]


def case_flops(case: Case) -> int:
    return case_count(case).flops


def seeded_onnx(arch: str) -> tuple[str, float]:
    """(path, export seconds) of the seeded model's dynamic fp32 ONNX export; one kept."""
    if arch not in _ONNX:
        for folder, _, _ in _ONNX.values():
            shutil.rmtree(folder, ignore_errors=True)
        _ONNX.clear()
        folder = tempfile.mkdtemp(prefix="fastfcn-bench-onnx-")
        atexit.register(shutil.rmtree, folder, True)
        t = time.perf_counter()
        path = fastfcn.export_onnx(seeded_model(arch), Path(folder) / f"{arch}.onnx")
        _ONNX[arch] = (folder, str(path), time.perf_counter() - t)
    return _ONNX[arch][1], _ONNX[arch][2]


def seeded_images(case: Case, seed: int) -> torch.Tensor:
    """(N, H, W, 3) uint8 RGB noise, identical for every backend and every run of the suite."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (case.batch, case.height, case.width, 3), generator=g, dtype=torch.uint8)


class OverBudget(Exception):
    """The session's end-to-end budget ran out while this case ran."""


@contextlib.contextmanager
def deadline(seconds: float | None, what: str, budget: bool = False):
    """Stop the case after `seconds` (SIGALRM; main thread on Unix only, else no limit):
    TimeoutError for --bench-case-timeout (a failure), OverBudget when the budget set it."""
    usable = seconds and hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        if budget:
            raise OverBudget(f"{what} was stopped after {seconds:.0f} s: the end-to-end budget ran out")
        raise TimeoutError(f"{what} took longer than {seconds:.0f} s (--bench-case-timeout)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def check_labels(out, expect: torch.Tensor, num_classes: int, what: str) -> None:
    """out must be fresh labels: right shape, no poisoned value, >= 99% equal to the warm-up's."""
    assert isinstance(out, torch.Tensor), f"{what}: run returned {type(out).__name__}, expected a tensor"
    assert tuple(out.shape) == tuple(expect.shape), (
        f"{what}: labels {tuple(out.shape)} != {tuple(expect.shape)}"
    )
    top = int(out.max())
    assert top < num_classes, (
        f"{what}: label {top} >= {num_classes} classes: the output was not (fully) recomputed "
        "since the previous round overwrote it"
    )
    agree = (out == expect).float().mean().item()
    # Exact equality is expected for a deterministic backend; 1% slack covers near-ties in
    # low precision should an algorithm not be bitwise reproducible.
    assert agree >= 0.99, f"{what}: only {agree:.4f} of labels equal the warm-up result for the same input"


def _seg_description(seg) -> dict:
    out = {}
    for attr in ("backend", "precision", "device", "provider", "providers", "impl", "skip_dead_zone"):
        v = getattr(seg, attr, None)
        if v is not None and not callable(v):
            out[f"segmenter_{attr}"] = str(v)
    return out


def test_end_to_end(e2e, benchmark, bench_state, bench_device):
    key, case, backend, precision = e2e
    left = bench_state.budget_left()
    if left is not None and left <= 0:
        pytest.skip(f"end-to-end time budget of {bench_state.budget_s:.0f} s spent (--bench-budget)")
    try:
        Segmenter = fastfcn.Segmenter
    except (ImportError, AttributeError) as e:
        pytest.skip(f"fastfcn.Segmenter cannot be imported: {e}")
    device, info = bench_device, bench_state.info
    cpu = device.type == "cpu"
    what = f"{case.label} {backend} {precision}"
    timeout = bench_state.case_timeout_s
    by_budget = False
    if left is not None and (not timeout or left + 60 < timeout):
        timeout, by_budget = left + 60, True  # a case may finish up to 60 s past the budget
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    runs, why = backend_spec(backend).can_run(device.type)
    if not runs:
        pytest.skip(f"{backend} {precision} on {device.type}: {why}")
    if cpu and precision == "bf16":
        native, why = native_bf16_cpu()
        if not native:
            pytest.skip(f"{backend} bf16 on cpu: {why}; bf16 runs only where it is native")
    model = seeded_model(case.arch)
    flops = case_flops(case)
    inputs = [seeded_images(case, SEED + i) for i in range(2)]
    mem = MemoryPeak(device)
    mem.reset()
    seg = None
    export_s = None
    try:
        with deadline(timeout, what, by_budget):
            source = copy.deepcopy(model)
            if backend in onnx_backends() and precision in ("fp32", "bf16"):
                source, export_s = seeded_onnx(case.arch)
            t0 = time.perf_counter()
            try:
                seg = Segmenter(source, backend=backend, device=str(device), precision=precision)
            except fastfcn.BackendUnavailableError as e:
                pytest.skip(f"{backend} {precision} on {device.type}: {e}")
            desc = _seg_description(seg)
            skips = seg.skip_dead_zone
            warmups = 0
            # Inputs live on the device (uploading frames is the caller's pipeline); a
            # Segmenter that only takes host arrays gets host tensors, and the result says so.
            where = "device"
            if not cpu:
                try:
                    dev_inputs = [x.to(device) for x in inputs]
                    seg.run(dev_inputs[0], output="labels")
                    warmups += 1
                    inputs = dev_inputs
                except fastfcn.BackendUnavailableError as e:
                    pytest.skip(f"{backend} {precision} on {device.type}: {e}")
                except (TypeError, ValueError):
                    where = "host"
            expect, one = [], None
            try:
                for x in inputs:  # warm-up: compile / export / graph capture / autotune, and the expectation
                    t1 = time.perf_counter()
                    out = seg.run(x, output="labels")
                    sync(device)
                    one = time.perf_counter() - t1  # the last one runs warm: it sizes the rounds
                    warmups += 1
                    expect.append(out.clone())
            except fastfcn.BackendUnavailableError as e:
                pytest.skip(f"{backend} {precision} on {device.type}: {e}")
            setup_s = time.perf_counter() - t0
            setup_mem = mem.read()
            del out

            # Rounds: GPU as many as fit ~1 s (10..50); CPU 3 for the peer cases, else 2.
            if cpu:
                rounds = 3 if key in PEER_CASES else 2
            else:
                rounds = max(10, min(50, int(1.0 / max(one, 1e-6))))

            state = {"i": 0, "out": None, "expect": None}

            def check_and_poison():
                prev = state["out"]
                if prev is None:
                    return
                check_labels(prev, state["expect"], NUM_CLASSES, what)
                # An invalid class id: a stale buffer fails the next check. Results made under
                # inference_mode may only be written inside it.
                with torch.inference_mode():
                    prev.fill_(255)
                sync(device)
                state["out"] = None

            def setup():
                check_and_poison()
                i = state["i"] % 2
                state["i"] += 1
                state["expect"] = expect[i]
                return (inputs[i],), {}

            def target(x):
                y = seg.run(x, output="labels")
                sync(device)  # inside the timed region: GPU time, not launch time
                state["out"] = y

            benchmark.group = case.label
            mem.reset()
            benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
            run_mem = mem.read()
            check_and_poison()
    except OverBudget as e:
        pytest.skip(f"{e} (--bench-budget {bench_state.budget_s:.0f} s)")
    finally:
        seg = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    s = benchmark.stats.stats
    med = s.median
    n = case.batch
    extra = benchmark.extra_info
    full = CASES[key]
    extra.update(
        case=case.label, case_key=case.key, arch=case.arch, model_width=WIDTH, batch=n,
        height=case.height, width=case.width, backend=backend, precision=precision,
        device_kind=device.type, profile=bench_state.profile,
        cpu_reduced=bench_state.cpu_reduced, reduced_from=None if case == full else full.label,
        headline=key == HEAD,
        median_ms=med * 1e3, iqr_ms=s.iqr * 1e3, stddev_ms=s.stddev * 1e3 if s.rounds > 1 else 0.0,
        q1_ms=s.q1 * 1e3, q3_ms=s.q3 * 1e3, min_ms=s.min * 1e3, max_ms=s.max * 1e3, rounds=s.rounds,
        warmup_runs=warmups, ms_per_image=med * 1e3 / n, images_per_s=n / med,
        paper_ms=PAPER_MS, paper_source=PAPER_SOURCE, x_faster_than_paper=PAPER_MS / (med * 1e3 / n),
        gmac=flops / 2e9, flops=flops, computed_gmac=case_count(case).computed_gmac,
        flops_source="fastfcn.flops.count_macs (layer hooks, reference forward)",
        setup_s=setup_s, export_s=export_s, threads=torch.get_num_threads(),
        input=f"uint8 (N, H, W, 3) on the {where}", output="labels",
        fresh_outputs="checked every round: labels equal the warm-up's; the previous output is "
        "overwritten with an invalid id before each round",
        memory_kind=mem.kind, memory_peak_mb=run_mem, memory_peak_with_setup_mb=setup_mem,
        loadavg_1min=load,
    )  # fmt: skip
    # The floor of the work done: the fused backend skips the dead zone (FCN-8s 500x500: 125.6 of
    # 181.5 GMAC), so its nominal FLOPs would put it above 100% of the floor.
    work = case_count(case).computed_macs * 2 if skips else flops
    extra.update(floor_fields(work, med, info, precision), floor_work_gmac=work / 2e9)
    extra.update(desc)
    if backend == "torch":
        bench_state.torch_medians[(key, precision)] = med
    for name, prec in (("speedup_vs_torch_fp32", "fp32"), ("speedup_vs_torch_same_precision", precision)):
        base = bench_state.torch_medians.get((key, prec))
        extra[name] = base / med if base else None
        if not base:
            extra[name + "_reason"] = f"torch {prec} on this case was not measured in this session"
