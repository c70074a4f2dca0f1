# Quick start: `make demo` runs the built-in demo, `make test` runs the tests.
# Both create .venv on first use. On a CPU machine torch is pinned to the CPU
# build (2.13.0) before anything else is installed, so the multi-GB CUDA wheels
# are never pulled by accident; on a GPU machine install your CUDA torch into
# .venv first and run `make EXTRAS=dev,gpu,video,ray ...`; the range in pyproject accepts it.
PY ?= python3
VENV ?= .venv
# ray (Ray Data: fastfcn batch and its tests) adds about 530 MB and 110 s to a first setup.
# crf (pydensecrf2, the dense CRF of --crf / postprocess="crf") is a source distribution that pip
# compiles (Cython + C++): 42 s of CPU time on the 2-core Zen 4 (user 37.9 s + sys 3.9 s; wall
# 2 min 29 s and 4 min 26 s at load averages 9 and 12, when other builds shared the cores), once:
# pip caches the wheel. Without it the CRF tests that need the library skip, with the reason.
EXTRAS ?= dev,cpu,video,ray,crf
# The tests fail (instead of skipping about 280 of them) when the C++ kernels did not build:
# a missing compiler must not turn into a green run. REQUIRE_CPP=0 accepts a build without them.
REQUIRE_CPP ?= 1
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench clean

$(BIN)/fastfcn: pyproject.toml setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $(BIN)/fastfcn

setup: $(BIN)/fastfcn

demo: setup
	$(BIN)/fastfcn demo

test: setup
	FASTFCN_REQUIRE_CPP=$(REQUIRE_CPP) $(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python -m pytest benchmarks/ --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info
