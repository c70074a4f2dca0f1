"""Benchmark session setup shared by every file in benchmarks/.

- Profile: "gpu" (the paper's sizes) when CUDA is present, "cpu" (reduced
  sizes and rounds, said so in the summary and in each result's extra_info)
  otherwise; ``--bench-profile`` overrides.
- Fixtures for every benchmark file: ``bench_device``, ``device_info``,
  ``bench_profile``, ``cpu_reduced``, ``bench_state`` and ``record_extra``
  (fills a result's extra_info: median and spread, environment, compute
  floor, GB/s). Every result also gets the environment fields and its median
  and spread automatically, whether or not its test calls ``record_extra``.
- Results: after every test the session's results (kernel files included),
  skips with their reasons and failures with their message are written to
  ``benchmarks/results/<device-slug>-<date>.json`` (``--bench-results``), so a
  run killed by a timeout keeps what it measured. pytest-benchmark's own
  ``--benchmark-json`` still works and carries the same environment block.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import bandwidth_fields, env_extra, floor_fields, stats_ms, utc_now  # noqa: E402
from common import device_info as _device_info  # noqa: E402

from fastfcn.bench_report import peer_ratios  # noqa: E402
from fastfcn.runtime.registry import backend_specs  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
SCHEMA = "fastfcn-bench/1"
# The cpu profile's end-to-end budget: the peer cases (3 cases x 7 backend/precision runs, one
# ONNX export and one torch.compile each) are estimated at ~10 min on the 2-core AMD EPYC from
# the 2026-11-30 results (FCN-8s 500x500 2.5-5 s per run, dilated 250x250 5-6 s); the
# kernel files add ~1 min. Cases past the budget are skipped, saying so.
CPU_BUDGET_S = 780.0


def pytest_addoption(parser):
    g = parser.getgroup("fastfcn benchmarks")
    g.addoption(
        "--bench-profile", choices=("auto", "cpu", "gpu"),
        default=os.environ.get("FASTFCN_BENCH_PROFILE", "auto"),
        help="case sizes: gpu = the paper's sizes, cpu = reduced to fit 15 minutes on 2 cores; "
        "auto = gpu when CUDA is present",
    )  # fmt: skip
    g.addoption(
        "--bench-results", default=os.environ.get("FASTFCN_BENCH_RESULTS", str(RESULTS_DIR)),
        help="folder (file name <device-slug>-<date>.json) or .json file for this session's results; "
        "'none' to write nothing",
    )  # fmt: skip
    g.addoption(
        "--bench-budget", type=float, default=None,
        help="seconds the end-to-end cases may take in all; later cases are skipped with the reason "
        f"(default: {CPU_BUDGET_S:.0f} on the cpu profile, none on gpu)",
    )  # fmt: skip
    g.addoption(
        "--bench-case-timeout",
        type=float,
        default=None,
        help="seconds one end-to-end case (setup, warm-up and rounds) may take before it fails",
    )


class BenchState:
    """Session-wide benchmark state: device, profile, budget, baselines, outcomes."""

    def __init__(self, config):
        self.config = config
        opt = config.getoption
        profile = opt("--bench-profile")
        self.has_cuda = torch.cuda.is_available()
        self.profile = ("gpu" if self.has_cuda else "cpu") if profile == "auto" else profile
        self.device = torch.device("cuda" if self.has_cuda else "cpu")
        self.cpu_reduced = self.profile == "cpu"
        budget = opt("--bench-budget")
        self.budget_s = budget if budget is not None else (CPU_BUDGET_S if self.cpu_reduced else None)
        self.case_timeout_s = opt("--bench-case-timeout")
        self.e2e_started: float | None = None
        self.started = utc_now()
        # (case key, precision) -> median seconds of the torch backend, measured this session.
        self.torch_medians: dict[tuple[str, str], float] = {}
        self.notes: list[str] = []  # plan descriptions, printed in the terminal summary
        self.outcomes: dict[str, dict] = {}  # nodeid -> skip / failure record
        self._info: dict | None = None

    @property
    def info(self) -> dict:
        if self._info is None:
            self._info = _device_info(self.device)
        return self._info

    def budget_left(self) -> float | None:
        if self.budget_s is None:
            return None
        if self.e2e_started is None:
            self.e2e_started = time.perf_counter()
        return self.budget_s - (time.perf_counter() - self.e2e_started)

    def environment(self) -> dict:
        args = " ".join(self.config.invocation_params.args)
        return {
            "device": self.info,
            "date": self.started.date().isoformat(),
            "started": self.started.isoformat(timespec="seconds"),
            "command": f"pytest {args}".strip(),
            "profile": self.profile,
            "cpu_reduced": self.cpu_reduced,
            "budget_s": self.budget_s,
            "plan": list(self.notes),
            # each registered backend: "ok" where its packages are installed, else why not
            "backends": {s.name: s.can_run(self.info["kind"])[1] or "ok" for s in backend_specs()},
        }


class ResultsWriter:
    """Writes the session's results after every benchmark test (see the module docstring)."""

    def __init__(self, config, state: BenchState):
        self.config = config
        self.state = state
        self.target = config.getoption("--bench-results")
        rel = os.path.relpath(HERE, config.rootpath)
        self.prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        self.written: Path | None = None

    def path(self) -> Path | None:
        if self.target.lower() == "none":
            return None
        p = Path(self.target)
        if p.suffix == ".json":
            return p
        return p / f"{self.state.info['slug']}-{self.state.started.date().isoformat()}.json"

    def _ours(self, nodeid: str) -> bool:
        return nodeid.startswith(self.prefix)

    def pytest_runtest_logreport(self, report):
        if not self._ours(report.nodeid):
            return
        if report.skipped and report.when in ("setup", "call"):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            reason = reason.removeprefix("Skipped: ")
            if "--benchmark-only" in reason or "--benchmark-skip" in reason:
                return  # not a benchmark, or benchmarks deselected: nothing to report
            self.state.outcomes[report.nodeid] = {"nodeid": report.nodeid, "outcome": "skipped",
                                                  "reason": reason}  # fmt: skip
        elif report.failed:
            msg = getattr(report.longrepr, "reprcrash", None)
            msg = msg.message if msg is not None else str(report.longrepr)
            self.state.outcomes[report.nodeid] = {
                "nodeid": report.nodeid, "outcome": "failed", "when": report.when, "reason": msg[:600],
            }  # fmt: skip
        if report.when == "teardown":
            self.dump()

    def benchmarks(self) -> list[dict]:
        bs = getattr(self.config, "_benchmarksession", None)
        out = []
        for b in getattr(bs, "benchmarks", []) if bs is not None else []:
            if b.has_error or not b.stats:
                continue
            d = b.as_dict(include_data=False)
            d["datetime"] = self.state.started.isoformat(timespec="seconds")
            out.append(d)
        return out

    def dump(self) -> None:
        path = self.path()
        new = self.benchmarks()
        if path is None or (not new and not self.state.outcomes):
            return
        # Merge with an earlier session's file of the same device and date (the end-to-end and
        # kernel files may run as two sessions): entries of this session win.
        results, outcomes, commands = {}, {}, []
        if path.exists():
            try:
                old = json.loads(path.read_text())
                if old.get("schema") == SCHEMA:
                    results = {b["fullname"]: b for b in old.get("benchmarks", [])}
                    outcomes = {o["nodeid"]: o for o in old.get("not_measured", [])}
                    commands = list(old.get("sessions", []))
            except (OSError, ValueError, KeyError, TypeError):
                results, outcomes, commands = {}, {}, []
        for b in new:
            results[b["fullname"]] = b
            outcomes.pop(b["fullname"], None)
        for nodeid, o in self.state.outcomes.items():
            if any(b["fullname"] == nodeid for b in new):
                continue
            outcomes[nodeid] = o
            results.pop(nodeid, None)
        env = self.state.environment()
        session = {k: env[k] for k in ("started", "command", "profile", "cpu_reduced", "budget_s")}
        commands = [c for c in commands if c.get("started") != session["started"]] + [session]
        doc = {
            "schema": SCHEMA,
            "environment": env,
            "sessions": commands,
            "benchmarks": sorted(results.values(), key=lambda b: b["fullname"]),
            "not_measured": sorted(outcomes.values(), key=lambda o: o["nodeid"]),
            "peer_ratios": peer_ratios([b.get("extra_info") or {} for b in results.values()]),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        os.replace(tmp, path)  # atomic: a timeout kill never leaves half a file
        self.written = path


def pytest_configure(config):
    state = BenchState(config)
    config._fastfcn_bench = state
    config._fastfcn_writer = ResultsWriter(config, state)
    config.pluginmanager.register(config._fastfcn_writer, "fastfcn-bench-results")


def pytest_benchmark_update_json(config, benchmarks, output_json):
    state = getattr(config, "_fastfcn_bench", None)
    if state is not None:
        output_json["fastfcn_environment"] = state.environment()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    state: BenchState | None = getattr(config, "_fastfcn_bench", None)
    writer: ResultsWriter | None = getattr(config, "_fastfcn_writer", None)
    if state is None:
        return
    tr = terminalreporter
    tr.section("fastfcn benchmarks")
    tr.write_line(
        f"device: {state.info['name']}; profile: {state.profile}"
        + ("" if state.budget_s is None else f"; end-to-end budget {state.budget_s:.0f} s")
    )
    if state.cpu_reduced:
        tr.write_line(
            "CPU-REDUCED RUN: smaller sizes, fewer cases and rounds than the paper's settings "
            "(extra_info cpu_reduced=true); run on a GPU or with --bench-profile=gpu for full sizes"
        )
    for note in state.notes:
        tr.write_line(f"  {note}")
    for o in state.outcomes.values():
        tr.write_line(f"  {o['outcome']}: {o['nodeid'].split('::')[-1]}: {o['reason'].splitlines()[0][:200]}")
    bs = getattr(config, "_benchmarksession", None)
    rows = [b.extra_info for b in getattr(bs, "benchmarks", []) if not b.has_error and b.stats]
    for e in peer_ratios(rows):
        if e["ratio"] is None:
            tr.write_line(f"  fused vs peers, {e['case']} {e['precision']}: {e['reason']}")
        else:
            tr.write_line(
                f"  fused vs fastest peer, {e['case']} {e['precision']}: fused {e['fused_ms']:.0f} ms, "
                f"{e['peer']} {e['peer_ms']:.0f} ms: {e['ratio']:.2f}x"
            )
    if writer is not None and writer.written is not None:
        tr.write_line(f"results: {writer.written} (table: fastfcn bench-report {writer.written})")


@pytest.fixture(scope="session")
def bench_state(pytestconfig) -> BenchState:
    return pytestconfig._fastfcn_bench


@pytest.fixture(scope="session")
def bench_device(bench_state) -> torch.device:
    """cuda when present, else cpu."""
    return bench_state.device


@pytest.fixture(scope="session")
def device_info(bench_state) -> dict:
    """benchmarks.common.device_info of bench_device: name, slug, driver, versions, peak table entry."""
    return bench_state.info


@pytest.fixture(scope="session")
def bench_profile(bench_state) -> str:
    """'gpu' (paper sizes) or 'cpu' (reduced)."""
    return bench_state.profile


@pytest.fixture(scope="session")
def cpu_reduced(bench_state) -> bool:
    return bench_state.cpu_reduced


@pytest.fixture
def record_extra(bench_state):
    """record_extra(benchmark, *, flops=None, nbytes=None, precision="fp32", items=None, **fields).

    Call after the benchmark ran. Adds median and spread (ms), the environment,
    and when given: flops per call -> achieved TFLOP/s, compute floor and its
    fraction; nbytes per call -> GB/s and fraction of HBM bandwidth; items per
    call -> ms per item and items/s. Returns the extra_info dict.
    """

    def record(benchmark, *, flops=None, nbytes=None, precision="fp32", items=None, **fields):
        info = bench_state.info
        extra = benchmark.extra_info
        st = stats_ms(benchmark)
        extra.update(st)
        extra.update(env_extra(info))
        extra.update(profile=bench_state.profile, cpu_reduced=bench_state.cpu_reduced, precision=precision)
        seconds = st["median_ms"] / 1e3
        if items:
            extra.update(ms_per_item=st["median_ms"] / items, items_per_s=items / seconds)
        if flops is not None:
            extra["flops"] = flops
            extra.update(floor_fields(flops, seconds, info, precision))
        if nbytes is not None:
            extra.update(bandwidth_fields(nbytes, seconds, info))
        extra.update(fields)
        return extra

    return record


@pytest.fixture(autouse=True)
def _bench_environment(request, bench_state):
    """After any benchmark test: the environment fields and median/spread, if not recorded."""
    yield
    bm = request.node.funcargs.get("benchmark") if hasattr(request.node, "funcargs") else None
    if bm is None or getattr(bm, "stats", None) is None:
        return
    extra = bm.extra_info
    for k, v in env_extra(bench_state.info).items():
        extra.setdefault(k, v)
    extra.setdefault("profile", bench_state.profile)
    extra.setdefault("cpu_reduced", bench_state.cpu_reduced)
    for k, v in stats_ms(bm).items():
        extra.setdefault(k, v)
