"""The backend registry: one entry per backend (DESIGN.md idea 6).

An entry (``BackendSpec``) says how to build the backend and what it offers: the devices it
runs on, the precisions per device, the agreement tolerance per precision that its tests
hold it to, the packages it imports and whether it takes an exported ``.onnx`` file. The
CLI's ``--backend`` choices, the demo, the benchmarks and the agreement tests iterate over
``available_backends()``; nothing else lists the backends.

This module imports neither torch nor a backend's package: ``fastfcn --help`` reads it, and
``can_run`` asks only whether a package is importable (``importlib.util.find_spec``).
Building a backend (``create_backend`` in fastfcn.runtime.backends) imports it.

    from fastfcn.runtime import register_backend
    register_backend("mine", MyBackend, devices=("cpu",), precisions={"cpu": ("fp32",)})
    fastfcn.Segmenter(model, backend="mine", device="cpu")
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

DEVICES = ("cpu", "cuda")
# The precisions a Segmenter takes (fastfcn.runtime.backends.PRECISIONS maps them to dtypes).
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


@dataclass(frozen=True)
class Tolerance:
    """How close a backend's results must be to the eager fp32 reference at one precision.

    logits: the largest |logit error| allowed, as a fraction of the reference's logit range.
    labels: the smallest fraction of labels equal to the reference's; 1.0 means every label
        whose reference top-2 margin exceeds twice ``logits`` x range (near-ties may flip).
    """

    logits: float
    labels: float

    def __post_init__(self):
        if not 0 < self.logits < 1:
            raise ValueError(f"Tolerance.logits must be in (0, 1) (a fraction of the logit range); "
                             f"got {self.logits!r}")
        if not 0 < self.labels <= 1:
            raise ValueError(f"Tolerance.labels must be in (0, 1] (a fraction of labels); "
                             f"got {self.labels!r}")


# Measured in tests/test_runtime.py (width 0.125-0.25 nets, odd sizes, AMD EPYC Zen 4):
# fp32 differs from the eager reference in summation order only (max |logit error| / range
# <= 1e-6 fused, <= 2e-6 onnxruntime; 1e-4 leaves ~50x headroom, far below a real bug's > 1e-2).
# bf16: torch 7.1e-3 / 99.48% labels, fused 4.3e-3 / 99.62%; fp16: torch 7.6e-4 / 99.92%,
# fused 5.0e-4 / 99.95%: bounds ~4x the worst error, at most 4x as many flipped labels. With
# today's seeds (FCN-8s width 0.25, two 64x80 images): bf16 torch 4.5e-3 / 99.67%, fused
# 2.4e-3 / 99.90%; fp16 torch 7.4e-4 / 99.96%, fused (fp16 layers in fp32 math) 3.1e-4 / 100%.
# tf32 (10-bit mantissa products, as fp16) is held to the bf16 bound, as the CUDA test did.
FP32 = Tolerance(1e-4, 1.0)
BF16 = Tolerance(0.03, 0.98)
FP16 = Tolerance(0.003, 0.997)
TORCH_TOLERANCE = MappingProxyType({"fp32": FP32, "tf32": BF16, "bf16": BF16, "fp16": FP16})


_DEFAULT_PRECISIONS = {"cpu": ("fp32", "bf16", "fp16"), "cuda": ("fp32", "tf32", "bf16", "fp16")}


def _frozen_precisions(precisions) -> Mapping[str, tuple[str, ...]]:
    return MappingProxyType({d: tuple(p) for d, p in dict(precisions).items()})


@dataclass(frozen=True)
class BackendSpec:
    """One backend: how to build it and what it offers.

    name: what ``Segmenter(backend=...)`` and ``--backend`` take.
    factory: ``factory(source, device, precision, **options) -> Backend``, or the dotted path
        ``"package.module:attr"`` of one (imported when the backend is first built).
    devices: device types it runs on, of ("cpu", "cuda"); ``device="auto"`` picks the first
        of CUDA (when present) and the CPU that it lists.
    precisions: device type -> the precisions it runs at there (a subset of PRECISIONS);
        None: what torch runs on each of its devices (cpu: fp32, bf16, fp16; cuda: also tf32).
    tolerance: precision -> Tolerance, what its agreement tests allow against the reference.
    requires: Python packages it imports (``can_run`` reports a missing one with the command).
    onnx: it runs the exported graph, so it also takes an ``.onnx`` file as its source.
    install: the command that installs ``requires`` (for the reason ``can_run`` gives).
    description: one line for ``--help`` and the docs.
    """

    name: str
    factory: Callable | str
    devices: tuple[str, ...] = DEVICES
    precisions: Mapping[str, tuple[str, ...]] | None = None
    tolerance: Mapping[str, Tolerance] = field(default_factory=lambda: dict(TORCH_TOLERANCE))
    requires: tuple[str, ...] = ()
    onnx: bool = False
    install: str = ""
    description: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier() or self.name == "auto":
            raise ValueError(f"a backend name must be an identifier other than 'auto'; got {self.name!r}")
        if not callable(self.factory) and not (isinstance(self.factory, str) and ":" in self.factory):
            raise TypeError(f"backend {self.name!r}: factory must be callable(source, device, precision) "
                            f"or a 'module:attr' path; got {self.factory!r}")
        object.__setattr__(self, "devices", tuple(self.devices))
        object.__setattr__(self, "requires", tuple(self.requires))
        bad = [d for d in self.devices if d not in DEVICES]
        if not self.devices or bad:
            raise ValueError(f"backend {self.name!r}: devices must be a non-empty subset of {DEVICES}; "
                             f"got {self.devices!r}")
        given = self.precisions if self.precisions is not None else {
            d: p for d, p in _DEFAULT_PRECISIONS.items() if d in self.devices}
        precisions = _frozen_precisions(given)
        if set(precisions) != set(self.devices):
            raise ValueError(f"backend {self.name!r}: precisions must name exactly its devices "
                             f"{self.devices}; got {sorted(precisions)}")
        for device, names in precisions.items():
            wrong = [p for p in names if p not in PRECISIONS]
            if not names or wrong:
                raise ValueError(f"backend {self.name!r}: precisions on {device} must be a non-empty subset "
                                 f"of {PRECISIONS}; got {names!r}")
            if device == "cpu" and "tf32" in names:
                raise ValueError(f"backend {self.name!r}: 'tf32' is a CUDA mode; "
                                 "remove it from the cpu precisions")
        object.__setattr__(self, "precisions", precisions)
        tolerance = MappingProxyType(dict(self.tolerance))
        missing = sorted({p for names in precisions.values() for p in names} - set(tolerance))
        if missing or not all(isinstance(t, Tolerance) for t in tolerance.values()):
            raise ValueError(f"backend {self.name!r}: tolerance must give a Tolerance for every precision it "
                             f"runs at; missing {missing}")
        object.__setattr__(self, "tolerance", tolerance)

    def supports(self, device: str, precision: str) -> bool:
        """Whether it runs on device type ``device`` ("cpu", "cuda") at ``precision``."""
        return precision in self.precisions.get(device, ())

    def can_run(self, device: str = "cpu") -> tuple[bool, str]:
        """(True, "") when its packages are importable and it serves device type ``device``;
        else (False, a sentence saying what is missing). Hardware is not probed: whether a
        precision runs on this CPU or GPU is decided when the backend is built."""
        if device not in self.devices:
            return False, f"backend {self.name!r} runs on {' and '.join(self.devices)} only, not {device}"
        for package in self.requires:
            if _importable(package) is None:
                how = f"; install it with `{self.install}`" if self.install else ""
                return False, (f"backend {self.name!r} needs the {package} package, which is not "
                               f"installed{how}")
        return True, ""

    def build(self, source, device, precision: str, **options):
        """The backend: ``factory(source, device, precision, **options)``."""
        factory = self.factory
        if isinstance(factory, str):
            module, _, attr = factory.partition(":")
            factory = getattr(importlib.import_module(module), attr)
        return factory(source, device, precision, **options)


def _importable(package: str):
    try:
        return importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a package set to None in sys.modules, or a broken one
        return None


# ONNX Runtime has no bf16 path; fp16 runs a graph exported at fp16. tests/test_export.py
# (FCN-8s width 0.25, CPU provider): fp16 5.9e-4 and 99.87-99.90% labels (torch's own fp16
# 1.0e-3, 99.79-99.89%); 5e-3 is 8x the error, 10x fp16's unit roundoff.
_ORT_PRECISIONS = {"cpu": ("fp32", "fp16"), "cuda": ("fp32", "tf32", "fp16")}
_ORT_TOLERANCE = {"fp32": FP32, "tf32": BF16, "fp16": Tolerance(5e-3, 0.995)}

_BUILTIN = (
    BackendSpec("torch", "fastfcn.runtime.backends:TorchBackend",
                description="the reference model in eager PyTorch (the numerical spec)"),
    BackendSpec("fused", "fastfcn.runtime.backends:FusedBackend",
                description="fastfcn's kernels: folded BatchNorm, fused ops, planned convolutions"),
    BackendSpec("compile", "fastfcn.runtime.backends:CompileBackend",
                description="torch.compile (inductor) of the reference"),
    BackendSpec("onnxruntime", "fastfcn.runtime.ort:OnnxRuntimeBackend", precisions=_ORT_PRECISIONS,
                tolerance=_ORT_TOLERANCE, requires=("onnxruntime",), onnx=True,
                install="pip install onnxruntime (CPU) or pip install onnxruntime-gpu (CUDA)",
                description="the exported graph in ONNX Runtime (CUDA provider when present)"),
    # tests/test_openvino.py, max |logit error| / range: fp32 <= 7.6e-7 (1e-5 is 13x that);
    # bf16 <= 5.2e-3 with >= 99.4% labels where torch has no bf16 path (0.02 is 4x the error).
    BackendSpec("openvino", "fastfcn.runtime.openvino:OpenVinoBackend", devices=("cpu",),
                precisions={"cpu": ("fp32", "bf16")},
                tolerance={"fp32": Tolerance(1e-5, 1.0), "bf16": Tolerance(0.02, 0.98)},
                requires=("openvino",), onnx=True, install="pip install openvino",
                description="the exported graph in OpenVINO's CPU plugin"),
)
_REGISTRY: dict[str, BackendSpec] = {s.name: s for s in _BUILTIN}


def register_backend(spec_or_name: BackendSpec | str, factory: Callable | str | None = None, *,
                     replace: bool = False, **fields) -> BackendSpec:
    """Add a backend; returns its entry.

    ``register_backend(BackendSpec(...))`` or ``register_backend(name, factory, devices=...,
    precisions=..., tolerance=..., requires=..., onnx=..., description=...)`` (BackendSpec's
    fields and defaults). factory(source, device, precision) must return a
    fastfcn.runtime.Backend. A name already registered is refused unless ``replace=True``.
    """
    if isinstance(spec_or_name, BackendSpec):
        if factory is not None or fields:
            raise TypeError("register_backend(spec) takes no other fields: they are the spec's")
        spec = spec_or_name
    elif isinstance(spec_or_name, str):
        if factory is None:
            raise TypeError(f"register_backend({spec_or_name!r}, factory, ...) needs a factory: "
                            "a callable(source, device, precision) -> Backend")
        spec = BackendSpec(spec_or_name, factory, **fields)
    else:
        raise TypeError(f"register_backend takes a BackendSpec or a name; got {type(spec_or_name).__name__}")
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"backend {spec.name!r} is already registered; pass replace=True to replace it, "
                         "or choose another name")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_backend(name: str) -> None:
    """Remove a backend added by register_backend (the built-in ones stay)."""
    if name in {s.name for s in _BUILTIN}:
        raise ValueError(f"backend {name!r} is built in and cannot be removed")
    if _REGISTRY.pop(name, None) is None:
        raise ValueError(f"backend {name!r} is not registered; registered: {available_backends()}")


def available_backends() -> list[str]:
    """Registered backend names, in registration order (whether each runs here: ``can_run``)."""
    return list(_REGISTRY)


def builtin_backends() -> tuple[str, ...]:
    """The backends fastfcn ships (what the CLI offers)."""
    return tuple(s.name for s in _BUILTIN)


def backend_spec(name: str) -> BackendSpec:
    """The registry entry of backend ``name``."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown backend {name!r}; expected 'auto' or one of {available_backends()}"
        ) from None


def backend_specs() -> list[BackendSpec]:
    """Every registry entry, in registration order."""
    return list(_REGISTRY.values())


def can_run(name: str, device: str = "cpu") -> tuple[bool, str]:
    """Whether backend ``name`` can run on device type ``device`` here, and why not (see BackendSpec)."""
    return backend_spec(name).can_run(device)


def onnx_backends() -> tuple[str, ...]:
    """The backends that run an exported graph and take an ``.onnx`` file."""
    return tuple(s.name for s in _REGISTRY.values() if s.onnx)
