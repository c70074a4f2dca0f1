#!/usr/bin/env bash
# One call on a GPU box (H100/H200): end-to-end benchmarks at the paper's sizes, the
# kernel benchmarks, the GPU test lane, then the report. Installs nothing. Every step
# has its own `timeout`, so the script ends within ~8 minutes even if a step hangs:
#   e2e 270 s (budget 180 s + one case of at most 90 s) + kernels 60 s + tests 100 s
#   + report 20 s + checks 15 s = 465 s, plus <= 10 s kill grace per step.
# Results: benchmarks/results/<device-slug>-<date>.json (written after every test, so a
# killed step keeps what it measured), report .md and .png beside it; with $OUT set (the
# device tool) the new results, report, chart and one log are copied there too.
#
#   bash benchmarks/run_gpu.sh            # PYTHON=... to pick the interpreter
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
RES=benchmarks/results
mkdir -p "$RES"
STAMP=$(mktemp)
LOG=${OUT:+$OUT/run_gpu.log}
LOG=${LOG:-$RES/run_gpu.log}
: >"$LOG"
step() { echo "=== $* ($(date -u +%H:%M:%S), $(($(date +%s) - T0)) s in)" | tee -a "$LOG"; }
T0=$(date +%s)

step "environment"
timeout -k 5 15 nvidia-smi -L 2>&1 | tee -a "$LOG"
timeout -k 5 60 "$PY" -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'available', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>&1 | tee -a "$LOG"

# fastfcn.kernels lives in kernels/ (mapped by the package install). Without an install,
# import fastfcn from a folder of links that puts kernels/ inside the package, and keep
# the working directory off sys.path (PYTHONSAFEPATH, Python >= 3.11) so the links win.
if ! (cd /tmp && "$PY" -c "import fastfcn.kernels" >/dev/null 2>&1); then
    SRC=$(mktemp -d)
    mkdir "$SRC/fastfcn"
    for f in "$ROOT"/fastfcn/*; do ln -s "$f" "$SRC/fastfcn/$(basename "$f")"; done
    ln -s "$ROOT/kernels" "$SRC/fastfcn/kernels"
    export PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
    echo "fastfcn not installed: importing it from $SRC (links into $ROOT)" | tee -a "$LOG"
fi
timeout -k 5 60 "$PY" -c "import fastfcn, fastfcn.kernels; print('fastfcn', fastfcn.__version__)" 2>&1 | tee -a "$LOG"

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rs)

step "end-to-end benchmarks"
timeout -k 10 270 "${PYTEST[@]}" benchmarks/test_end_to_end.py --benchmark-only \
    --bench-budget 180 --bench-case-timeout 90 \
    --benchmark-json "${OUT:-$RES}/e2e-pytest-benchmark.json" 2>&1 | tee -a "$LOG"

step "kernel benchmarks"
timeout -k 10 60 "${PYTEST[@]}" benchmarks/ --ignore=benchmarks/test_end_to_end.py --benchmark-only \
    2>&1 | tee -a "$LOG"

step "GPU test lane"
timeout -k 10 100 "${PYTEST[@]}" -m gpu tests/ 2>&1 | tee -a "$LOG"

step "report"
mapfile -t NEW < <(find "$RES" -maxdepth 1 -name '*.json' -newer "$STAMP" ! -name '*pytest-benchmark*' | sort)
if [ "${#NEW[@]}" -gt 0 ]; then
    BASE=${NEW[-1]%.json}
    timeout -k 5 20 "$PY" -m fastfcn bench-report "${NEW[@]}" --markdown "$BASE.md" --png "$BASE.png" \
        2>&1 | tee -a "$LOG"
    if [ -n "${OUT:-}" ]; then
        cp "${NEW[@]}" "$OUT"/ 2>/dev/null
        cp "$BASE.md" "$BASE.png" "$OUT"/ 2>/dev/null
    fi
else
    echo "no results were written" | tee -a "$LOG"
fi
rm -f "$STAMP"
step "done"
