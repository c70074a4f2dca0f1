#!/usr/bin/env bash
# First GPU contact for fastfcn on one H100/H200: everything that matters, in order, in one call
# of at most 8 minutes (the device tool allows 600 s per call; ~15 min of GPU time per issue, the
# machine's start included, so one run plus one rerun):
#
#   stage        cap (s)  what
#   env             20    device, driver, versions; copy bandwidth, bf16/fp32 matmul TFLOP/s
#   correctness    120    every Triton kernel compiled vs the reference at full size; CUDA graphs;
#                         the conv-epilogue candidates vs torch and cuDNN
#   headline       160    FCN-8s 500x500 bf16 fused/torch/compile at batch 1, 8, 32 (compile last)
#                         and fused without the dead-zone skip at batch 1 (its ablation)
#   profile         40    device time per kernel category, fused and torch
#   tests         rest    pytest -m gpu, then tests/test_ops.py compiled: what the stages before
#                         left of the whole run's FC_TOTAL (465 s), half each, at least 40 s each
#   summary         10
# Every cap is also cut to what is left of FC_TOTAL (less the summary's 10 s), so the run ends
# within FC_TOTAL + nvidia-smi's 10 s + 5 s kill grace = 480 s. The tests compile every Triton
# specialisation they use (the static sm_90a build, benchmarks/results/static/: 0.1-0.3 s each
# for the heads, 1-3 s for a conv epilogue on the 2-core CPU here), so they run on 8 pytest-xdist
# workers where xdist is installed (the H200 image has it; 16 cores).
#
# Results go to the folder given as the first argument, else $FC_OUT, else $OUT (the device
# tool's), else ./fc_out: env.json correctness.json headline.json profile.json tests.log
# summary.txt run.log (7 flat files). Each JSON file is rewritten after every case, so a run
# killed by a cap keeps what it measured.
#
#   bash benchmarks/gpu_first_contact.sh                     # everything, on the GPU machine
#   STAGES="correctness tests" bash benchmarks/gpu_first_contact.sh   # a targeted rerun
#   FC_HEADLINE_BUDGET=40 STAGES="headline tests summary" FC_TOTAL=165 bash ...   # ~3 min, no compile
#   FC_DRY=1 bash benchmarks/gpu_first_contact.sh /tmp/fc    # CPU dry run (tiny sizes, interpreter)
set -u  # empty arrays are expanded as ${A[@]+"${A[@]}"}: bash < 4.4 calls "${A[@]}" unbound
cd "$(dirname "$0")/.."
ROOT=$PWD
OUTDIR=${1:-${FC_OUT:-${OUT:-$ROOT/fc_out}}}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
STAGES=${STAGES:-"env correctness headline profile tests summary"}
DRY=${FC_DRY:-0}
export PYTHONUNBUFFERED=1
# compile caches inside the (ignored) checkout: a rerun on the same warm machine skips
# inductor's and Triton's compiles
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$ROOT/.fc_cache/inductor}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$ROOT/.fc_cache/triton}
DRYARG=()
if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    DRYARG=(--dry-run)
fi
LOG=$OUTDIR/run.log
: >>"$LOG"
T0=$(date +%s)
TOTAL=${FC_TOTAL:-465}
left() { echo $((T0 + TOTAL - 10 - $(date +%s))); }  # seconds left, the summary's 10 s kept
capped() {  # capped CAP [OWN]: CAP, or what is left of the run (plus OWN, time kept for this stage) if less (>= 1)
    local l
    l=$(( $(left) + ${2:-0} ))
    [ "$l" -lt "$1" ] && { [ "$l" -gt 1 ] && echo "$l" || echo 1; } || echo "$1"
}
say() { echo "=== $* (+$(($(date +%s) - T0)) s)" | tee -a "$LOG"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

# fastfcn.kernels lives in kernels/ (mapped by the package install). Without an install, import
# fastfcn from a folder of links that puts kernels/ inside the package, and keep the working
# directory off sys.path (PYTHONSAFEPATH, Python >= 3.11) so the links win.
if ! (cd /tmp && "$PY" -c "import fastfcn.kernels" >/dev/null 2>&1); then
    SRC=$(mktemp -d)
    mkdir "$SRC/fastfcn"
    for f in "$ROOT"/fastfcn/*; do ln -s "$f" "$SRC/fastfcn/$(basename "$f")"; done
    ln -s "$ROOT/kernels" "$SRC/fastfcn/kernels"
    export PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
    echo "fastfcn not installed: importing it from $SRC (links into $ROOT)" | tee -a "$LOG"
fi

stage() {  # stage NAME CAP [extra args]
    local name=$1 cap own=0
    [ "$name" = summary ] && own=10  # left() keeps the summary's 10 s: they are its own
    cap=$(capped "$2" "$own")
    shift 2
    say "$name (cap $cap s)"
    timeout -k 5 "$cap" "$PY" "$ROOT/benchmarks/gpu_first_contact.py" "$name" "$OUTDIR" ${DRYARG[@]+"${DRYARG[@]}"} "$@" \
        >>"$LOG" 2>&1
    local rc=$?
    [ $rc -eq 0 ] || echo "stage $name ended with status $rc (124: hit its cap)" | tee -a "$LOG"
}

if has env; then
    timeout -k 5 10 nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.sm,power.draw,temperature.gpu,memory.used \
        --format=csv >>"$LOG" 2>&1 || echo "nvidia-smi: not available" >>"$LOG"
    stage env 20
fi
has correctness && stage correctness 120
has headline && stage headline 160 --budget "${FC_HEADLINE_BUDGET:-145}"  # < 45: no torch.compile cases
has profile && stage profile 40

if has tests; then
    # what the stages before left, half for each selection, at least 40 s each
    CAP1=$(( $(left) / 2 ))
    [ "$CAP1" -lt 40 ] && CAP1=40
    say "tests (cap $CAP1 s, then the rest, at least 40 s)"
    TO=()
    "$PY" -c "import pytest_timeout" 2>/dev/null && TO=(--timeout=35)
    PT=("$PY" -m pytest -q -p no:cacheprovider -rfEs --tb=short ${TO[@]+"${TO[@]}"})
    if [ "$DRY" = 1 ]; then
        PT+=(--collect-only)  # the dry run checks that both selections collect
    elif "$PY" -c "import xdist" 2>/dev/null; then
        PT+=(-n 8)  # Triton's compiles are single-threaded: 8 processes compile side by side
    fi
    echo "--- pytest -m gpu (full-size kernels, CUDA-graph path)" >"$OUTDIR/tests.log"
    timeout -k 5 "$CAP1" "${PT[@]}" -m gpu tests/test_ops.py tests/test_runtime.py tests/test_gpu_readiness.py \
        >>"$OUTDIR/tests.log" 2>&1
    CAP2=$(left)
    [ "$CAP2" -lt 40 ] && CAP2=40
    echo "--- tests/test_ops.py and the Triton conv tests compiled (not gpu; cap $CAP2 s)" >>"$OUTDIR/tests.log"
    timeout -k 5 "$CAP2" "${PT[@]}" -m "not gpu" tests/test_ops.py \
        tests/test_gpu_readiness.py::test_triton_conv_bias_relu_pool_matches_reference \
        tests/test_gpu_readiness.py::test_triton_conv_bf16_and_bad_input >>"$OUTDIR/tests.log" 2>&1
    grep -E "(passed|failed|error|tests? collected|selected)" "$OUTDIR/tests.log" | tee -a "$LOG"
fi
has summary && stage summary 10 && tail -n 60 "$OUTDIR/summary.txt"
say "done"
