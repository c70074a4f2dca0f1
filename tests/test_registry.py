"""The backend registry: entries validate themselves, register_backend refuses bad input, a
user-registered backend runs through the Segmenter, the built-in entries say what their
backends accept, and the Segmenter's execution plan is resolved once."""

from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import fastfcn
from fastfcn import BackendUnavailableError
from fastfcn.models import build
from fastfcn.runtime import (
    Backend,
    BackendSpec,
    Tolerance,
    available_backends,
    backend_spec,
    register_backend,
    registry,
)
from fastfcn.runtime.backends import TorchBackend, create_backend
from fastfcn.runtime.execution import ExecutionPlan


@pytest.fixture
def clean_registry():
    """Whatever a test registers is removed afterwards (the registry is process-wide)."""
    before = available_backends()
    yield
    for name in available_backends():
        if name not in before:
            registry.unregister_backend(name)
    assert available_backends() == before


def _model():
    torch.manual_seed(0)
    return build("fcn32s", 21, 0.0625).eval()


def _images(n=2, h=21, w=27, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


class Negated(Backend):
    """A user backend: the reference model, logits negated (so its results are its own)."""

    name = "negated"

    def __init__(self, source, device, precision):
        super().__init__(source, device, precision)
        self.inner = TorchBackend(source, device, precision)

    def __call__(self, x, output):
        logits = -self.inner(x, "logits")
        if output == "labels":
            return logits.argmax(1).to(torch.uint8)
        return logits.softmax(1) if output == "probs" else logits


# ------------------------------------------------------------------ a user-registered backend


def test_user_backend_runs_through_the_segmenter(clean_registry, monkeypatch):
    spec = register_backend("negated", Negated, devices=("cpu",), precisions={"cpu": ("fp32",)},
                            description="logits negated")
    assert backend_spec("negated") is spec and available_backends()[-1] == "negated"
    assert spec.can_run("cpu") == (True, "")
    # "auto" is the CPU for a backend whose entry has no CUDA, even where CUDA is present.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seg = fastfcn.Segmenter(_model(), backend="negated", precision="fp32")
    monkeypatch.undo()
    ref = fastfcn.Segmenter(_model(), backend="torch", device="cpu")
    assert seg.backend == "negated" and seg.device == torch.device("cpu") and seg.precision == "fp32"
    assert seg.execution.backend == "negated" and not seg.execution.serial and seg.execution.tf32 is None
    batch = _images()
    got, want = seg.run(batch, "logits"), ref.run(batch, "logits")
    assert torch.equal(got, -want)
    assert torch.equal(seg.run(batch), (-want).argmax(1).to(torch.uint8))
    # What its entry does not offer is refused before the factory runs, saying what it offers.
    with pytest.raises(BackendUnavailableError, match="runs at precision fp32 on cpu; got 'bf16'"):
        fastfcn.Segmenter(_model(), backend="negated", precision="bf16", device="cpu")


def test_auto_precision_is_one_the_backend_offers(clean_registry, monkeypatch):
    from fastfcn.runtime.execution import resolve_precision

    # A CUDA entry without bf16: "auto" (bf16 on Ampere or newer) falls back to its fp32.
    register_backend("negated", Negated, precisions={"cpu": ("fp32",), "cuda": ("fp32", "fp16")})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve_precision("auto", torch.device("cuda", 0), "negated") == "fp32"
    assert resolve_precision("auto", torch.device("cuda", 0), "torch") == "bf16"
    monkeypatch.undo()
    # An entry that offers only bf16 on the CPU runs at bf16, where "auto" would say fp32.
    register_backend("negated_bf16", Negated, devices=("cpu",), precisions={"cpu": ("bf16",)})
    seg = fastfcn.Segmenter(_model(), backend="negated_bf16", device="cpu")
    assert seg.precision == "bf16"
    assert seg.run(_images(1)).shape == (1, 21, 27)


def test_factory_must_return_a_backend(clean_registry):
    register_backend("plain", lambda source, device, precision: object(), devices=("cpu",),
                     precisions={"cpu": ("fp32",)})
    with pytest.raises(TypeError, match="returned a object, not a fastfcn.runtime.Backend"):
        fastfcn.Segmenter(_model(), backend="plain", device="cpu", precision="fp32")


def test_spec_registration_and_replace(clean_registry):
    spec = BackendSpec("mine", Negated, devices=("cpu",), precisions={"cpu": ("fp32",)})
    assert register_backend(spec) is spec
    with pytest.raises(ValueError, match="'mine' is already registered; pass replace=True"):
        register_backend("mine", Negated, devices=("cpu",), precisions={"cpu": ("fp32",)})
    with pytest.raises(ValueError, match="'torch' is already registered"):
        register_backend("torch", Negated)
    other = register_backend("mine", "tests_do_not_import:this", replace=True)
    assert backend_spec("mine") is other and other.devices == ("cpu", "cuda")
    with pytest.raises(ValueError, match="built in and cannot be removed"):
        registry.unregister_backend("fused")


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"name": "auto"}, ValueError, "other than 'auto'"),
    ({"name": "my backend"}, ValueError, "identifier"),
    ({"factory": 42}, TypeError, "factory must be callable"),
    ({"factory": "no_colon_here"}, TypeError, "'module:attr' path"),
    ({"devices": ("tpu",), "precisions": {"tpu": ("fp32",)}}, ValueError, r"subset of \('cpu', 'cuda'\)"),
    ({"devices": ()}, ValueError, "non-empty subset"),
    ({"precisions": {"cpu": ("fp32",)}}, ValueError, r"exactly its devices \('cpu', 'cuda'\)"),
    ({"devices": ("cpu",), "precisions": {"cpu": ("int8",)}}, ValueError, "precisions on cpu must be"),
    ({"devices": ("cpu",), "precisions": {"cpu": ()}}, ValueError, "non-empty subset"),
    ({"devices": ("cpu",), "precisions": {"cpu": ("fp32", "tf32")}}, ValueError, "'tf32' is a CUDA mode"),
    ({"devices": ("cpu",), "precisions": {"cpu": ("fp32", "fp16")},
      "tolerance": {"fp32": Tolerance(1e-4, 1.0)}}, ValueError, r"missing \['fp16'\]"),
])  # fmt: skip
def test_bad_registrations_are_refused(clean_registry, kwargs, exc, match):
    fields = {"name": "bad", "factory": Negated, **kwargs}
    name, factory = fields.pop("name"), fields.pop("factory")
    with pytest.raises(exc, match=match):
        register_backend(name, factory, **fields)
    assert "bad" not in available_backends()


def test_register_backend_argument_errors(clean_registry):
    with pytest.raises(TypeError, match="needs a factory"):
        register_backend("nofactory")
    with pytest.raises(TypeError, match="takes no other fields"):
        register_backend(BackendSpec("x", Negated), devices=("cpu",))
    # precisions left out: torch's on the devices given
    assert BackendSpec("cpuonly", Negated, devices=("cpu",)).precisions == {"cpu": ("fp32", "bf16", "fp16")}
    with pytest.raises(TypeError, match="a BackendSpec or a name; got int"):
        register_backend(3, Negated)
    with pytest.raises(ValueError, match=r"Tolerance.logits must be in \(0, 1\)"):
        Tolerance(0.0, 1.0)
    with pytest.raises(ValueError, match=r"Tolerance.labels must be in \(0, 1\]"):
        Tolerance(1e-4, 1.5)
    with pytest.raises(ValueError, match="unknown backend 'nope'; expected 'auto' or one of"):
        backend_spec("nope")


def test_entries_are_frozen():
    spec = backend_spec("openvino")
    with pytest.raises(AttributeError):
        spec.devices = ("cpu", "cuda")
    with pytest.raises(TypeError):
        spec.precisions["cuda"] = ("fp32",)
    with pytest.raises(TypeError):
        spec.tolerance["fp16"] = Tolerance(0.1, 0.5)


# ------------------------------------------------------------------ the built-in entries


def test_builtin_entries():
    assert registry.builtin_backends() == ("torch", "fused", "compile", "onnxruntime", "openvino")
    assert registry.onnx_backends() == ("onnxruntime", "openvino")
    ov = backend_spec("openvino")
    assert ov.devices == ("cpu",) and ov.precisions["cpu"] == ("fp32", "bf16")
    assert ov.tolerance["fp32"].logits < backend_spec("torch").tolerance["fp32"].logits
    assert not backend_spec("onnxruntime").supports("cpu", "bf16")
    fused = backend_spec("fused")
    assert fused.supports("cuda", "tf32") and not fused.supports("cpu", "tf32")


def test_can_run_reports_a_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if the package were not installed
    ok, why = registry.can_run("openvino", "cpu")
    assert not ok and "needs the openvino package" in why and "pip install openvino" in why
    ok, why = registry.can_run("openvino", "cuda")
    assert not ok and "runs on cpu only, not cuda" in why
    assert registry.can_run("torch", "cpu") == (True, "")


@pytest.mark.parametrize("name", ["torch", "fused"])
def test_declared_cpu_precisions_build_and_others_are_refused(name):
    """Each precision an entry declares on the CPU builds; the undeclared ones are refused."""
    model = _model()
    spec = backend_spec(name)
    for precision in registry.PRECISIONS:
        if spec.supports("cpu", precision):
            assert create_backend(name, model, torch.device("cpu"), precision).precision == precision
        else:
            with pytest.raises(BackendUnavailableError, match=f"got '{precision}'"):
                create_backend(name, model, torch.device("cpu"), precision)


def test_registry_does_not_import_torch(tmp_path):
    code = ("import sys; from fastfcn.runtime import registry; from fastfcn import names; "
            "assert names.BACKENDS == registry.builtin_backends(); "
            "assert registry.can_run('torch') == (True, ''); "
            "assert 'torch' not in sys.modules, [m for m in sys.modules if m.startswith('torch')][:5]")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------ the execution plan


def test_execution_plan_is_resolved_once():
    seg = fastfcn.Segmenter(_model(), device="cpu", backend="fused", precision="fp32", graph_cache=3)
    plan = seg.execution
    assert (plan.device, plan.backend, plan.precision) == (torch.device("cpu"), "fused", "fp32")
    assert plan.input_dtype == torch.float32 and plan.graph_cache == 3
    assert not plan.cuda_graphs and not plan.serial and plan.tf32 is None
    with pytest.raises(AttributeError):
        plan.precision = "bf16"
    seg.run(_images(1))
    assert seg.plan and all("chosen" in p for p in seg.plan)  # Segmenter.plan keeps its meaning


@pytest.mark.parametrize("device, precision, thread_safe, graph_safe, cache, want", [
    ("cpu", "fp32", True, False, 8, dict(cuda_graphs=False, serial=False, tf32=None)),
    ("cpu", "fp32", False, False, 8, dict(cuda_graphs=False, serial=True, tf32=None)),  # e.g. compile
    ("cuda", "fp32", True, True, 8, dict(cuda_graphs=True, serial=True, tf32=False)),
    ("cuda", "tf32", True, True, 0, dict(cuda_graphs=False, serial=True, tf32=True)),  # graph_cache=0
    ("cuda", "bf16", True, False, 8, dict(cuda_graphs=False, serial=True, tf32=None)),  # not graph-safe
])  # fmt: skip
def test_execution_plan_follows_from_the_backend(device, precision, thread_safe, graph_safe, cache, want):
    backend = types.SimpleNamespace(device=torch.device(device), precision=precision,
                                    input_dtype=torch.bfloat16,
                                    thread_safe=thread_safe, graph_safe=graph_safe)
    plan = ExecutionPlan.of(backend, "x", cache)
    assert {k: getattr(plan, k) for k in want} == want
    assert plan.input_dtype == torch.bfloat16 and plan.precision == precision and plan.graph_cache == cache


def test_create_backend_checks_the_precision_name_once_for_every_entry_point():
    model = build("fcn32s", num_classes=3, width=1 / 16).eval()
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match=r"unknown precision 'int8'; expected 'auto' or one of \['fp32'"):
        create_backend("torch", model, cpu, "int8")
    # "auto" is resolved before a backend is built (resolve_precision); only ONNX Runtime takes
    # it, meaning the precision its graph was exported at.
    with pytest.raises(ValueError, match="'torch' needs a resolved precision"):
        create_backend("torch", model, cpu, "auto")
    with pytest.raises(ValueError, match="unknown precision 'int8'"):
        fastfcn.Segmenter(model, backend="torch", device="cpu", precision="int8")
