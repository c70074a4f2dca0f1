"""What a plain install holds and needs: ONNX export's dependencies are runtime dependencies,
triton is only in the gpu/dev extras and never imported by a CPU run, the sdist carries what
its tests need, and a missing C++ extension fails the test session under FASTFCN_REQUIRE_CPP."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].strip().lower() for r in reqs}


def test_every_package_is_installed():
    # The package list in pyproject is explicit: a new subpackage missing from it is left out of
    # wheels (the `fastfcn` command then fails outside an editable checkout).
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "fastfcn").rglob("__init__.py")}
    assert found, "no packages found under fastfcn/"
    assert found <= listed, f"pyproject's [tool.setuptools] packages lacks {sorted(found - listed)}"


def test_dependencies():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime, extras = _names(project["dependencies"]), project["optional-dependencies"]
    # torch.onnx.export (fastfcn export) imports onnxscript: a plain install must have it.
    assert {"onnx", "onnxscript", "torch", "pillow"} <= runtime
    assert "triton" not in runtime
    assert "triton" in _names(extras["gpu"]) and "triton" in _names(extras["dev"])
    assert "triton" not in _names(extras["cpu"])
    assert (ROOT / "LICENSE").read_text().startswith("BSD 3-Clause License")
    assert "fastfcn contributors" in (ROOT / "LICENSE").read_text()


def test_cpu_runs_never_import_triton(tmp_path):
    script = textwrap.dedent("""
        import sys
        import numpy as np
        import fastfcn
        from fastfcn import models
        m = models.build("fcn8s", width=0.0625).eval()
        img = np.zeros((20, 24, 3), np.uint8)
        for backend in ("fused", "torch"):
            fastfcn.Segmenter(m, backend=backend, device="cpu").run(img)
        print(sorted(k for k in sys.modules if k == "triton" or k.startswith("triton.")))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout


def test_sdist_holds_what_its_tests_need(tmp_path):
    pytest.importorskip("build", reason="the build package (dev extra) makes the sdist")
    r = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--skip-dependency-check",
         "-o", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (sdist,) = tmp_path.glob("fastfcn-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    except FileNotFoundError:  # no git on this machine
        tracked = []
    if not tracked:  # not a git checkout (e.g. an unpacked sdist): check the tree itself
        tracked = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()]
    need = [
        f for f in tracked
        if f.startswith(("tests/", "kernels/", "fastfcn/", "benchmarks/"))
        and not f.endswith((".so", ".pyc")) and "__pycache__" not in f
    ] + ["LICENSE", "README.md", "Makefile", "pyproject.toml", "setup.py", "MANIFEST.in"]  # fmt: skip
    missing = sorted(set(need) - names)
    assert not missing, f"the sdist lacks {missing}"
    assert {"kernels/cpu/fcn_ops.cpp", "kernels/cpu/fcn_ops.h", "tests/conftest.py", "tests/helpers.py",
            "fastfcn/assets/demo_fcn8s.safetensors"} <= names  # fmt: skip


def test_missing_cpp_extension_fails_the_session_when_required(tmp_path):
    """Under FASTFCN_REQUIRE_CPP=1 (make test, CI) a build without the C++ kernels is an error,
    not ~280 quietly skipped tests."""
    block = tmp_path / "block"
    block.mkdir()
    # Stand-in for a failed build: importing the extension fails, as when it was never compiled.
    (block / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        class _NoExt:
            def find_spec(self, name, path=None, target=None):
                if name == "fastfcn.kernels.cpu._ext":
                    raise ImportError("blocked: stands for a failed C++ build")
        sys.meta_path.insert(0, _NoExt())
    """))
    env = dict(os.environ, PYTHONPATH=str(block), FASTFCN_REQUIRE_CPP="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_install.py",
           "-k", "test_dependencies"]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    # (Without the variable the same session passes: it is the one running this test.)
    assert r.returncode != 0 and "FASTFCN_REQUIRE_CPP=1" in r.stdout + r.stderr, r.stdout + r.stderr
    assert "fastfcn.kernels.cpu.available() is False" in r.stdout + r.stderr
