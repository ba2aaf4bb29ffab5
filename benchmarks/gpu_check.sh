#!/usr/bin/env bash
# One prepared GPU run, at most 8 minutes: install gradflow, run the kernel
# tests and then the suite's cuda cases on the GPU, run the GPU benchmarks,
# and print what benchmarks/RESULTS.md needs.
#
# Expects a machine with one NVIDIA GPU, Python 3.12, cupy-cuda13x, numba,
# numba-cuda and PyTorch with CUDA already installed, and no network. Run it
# from the repository root:  bash benchmarks/gpu_check.sh
# Without a GPU it stops at once with exit status 2. When CuPy or gradflow
# cannot use the GPU, it stops after the environment probe with status 3.
#
# Time limits in seconds, 470 in all, each step under its own `timeout`:
#   nvidia-smi 10, Python probe 30, install 30, gradflow import 15,
#   kernel tests 75, the suite's cuda cases 100, bench_kernels.py 65,
#   bench_gpu_mlp.py 95, bench_checkpoint.py 50.
# A step never runs past the end of the 470 s budget: its limit shrinks to
# what is left, and a step with less than 10 s left is skipped.
# NOTE: the limits are sized from CPU runs, not measured on a GPU yet. The
# test steps print their ten slowest tests (--durations) to size them.
#
# $OUT (or ./gpu_check_out) receives seven files: environment.log,
# kernel_tests.log, cuda_suite.log, bench_kernels.log, bench_gpu_mlp.log,
# bench_checkpoint.log and summary.md, which contains the sections to
# paste into benchmarks/RESULTS.md and the exit status of every step.
set -uo pipefail

OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
PYTHON="${PYTHON:-python3}"
# GPU_CHECK_BUDGET_S shortens the budget, to try the script's own logic.
BUDGET_S="${GPU_CHECK_BUDGET_S:-470}"
DEADLINE=$((SECONDS + BUDGET_S))
# Output reaches the logs as it is written, also from a step that is killed.
export PYTHONUNBUFFERED=1
# Tiny test launches would trip Numba's low-occupancy warning, and the test
# suite turns warnings into errors.
export NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS=0
unset NUMBA_ENABLE_CUDASIM
STATUSES=()

banner() { echo; echo "== $* ($(date -u +%H:%M:%S) UTC)"; }

# run_step NAME LIMIT LOG SECTION COMMAND...
# Runs COMMAND under `timeout` with LIMIT seconds, or what is left of the
# budget if that is less. stderr, and stdout unless SECTION names a file,
# go to $OUT/LOG. With SECTION, stdout goes to $WORK/SECTION and is copied
# to the log afterwards. Returns COMMAND's exit status and records it.
run_step() {
    local name=$1 limit=$2 log=$3 section=$4
    shift 4

    local left=$((DEADLINE - SECONDS))
    if ((left < 10)); then
        banner "$name: skipped, less than 10 s of the ${BUDGET_S} s budget is left"
        STATUSES+=("$name: skipped (budget spent)")
        return 1
    fi
    if ((limit > left)); then
        limit=$left
    fi

    banner "$name (limit $limit s)"
    local status start_bytes=0
    if [[ -f $OUT/$log ]]; then
        start_bytes=$(wc -c < "$OUT/$log")
    fi
    if [[ $section == - ]]; then
        timeout -k 5 "$limit" "$@" >> "$OUT/$log" 2>&1
        status=$?
    else
        timeout -k 5 "$limit" "$@" > "$WORK/$section" 2>> "$OUT/$log"
        status=$?
        cat "$WORK/$section" >> "$OUT/$log"
    fi

    tail -c +$((start_bytes + 1)) "$OUT/$log" | tail -n 25
    local note=""
    if ((status == 124 || status == 137)); then
        note=" (timed out after $limit s)"
    fi
    echo "$name exit status: $status$note"
    STATUSES+=("$name: $status$note")
    return "$status"
}

print_statuses() {
    echo "Exit status of each step (124 or 137: timed out):"
    if ((${#STATUSES[@]} == 0)); then
        echo "- no step ran"
    fi
    local line
    for line in "${STATUSES[@]}"; do
        echo "- $line"
    done
    echo "Elapsed: ${SECONDS} s of the ${BUDGET_S} s budget."
}

# fail CODE MESSAGE: stop the run early, as nothing after this step can run.
fail() {
    echo "gpu_check: $2" >&2
    print_statuses | tee "$OUT/summary.md"
    exit "$1"
}

banner "GPU check"
if ! command -v nvidia-smi > /dev/null 2>&1; then
    fail 2 "nvidia-smi not found, so this machine has no usable NVIDIA GPU. This script needs one."
fi
run_step "nvidia-smi" 10 environment.log - \
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    || fail 2 "nvidia-smi failed, so no NVIDIA GPU is usable (see $OUT/environment.log)."

run_step "Python probe" 30 environment.log - "$PYTHON" - <<'EOF' || fail 3 "CuPy cannot use the GPU (see $OUT/environment.log)."
import platform

import numba
import numpy

print("python", platform.python_version(), "numpy", numpy.__version__,
      "numba", numba.__version__)
from numba import cuda

print("numba.cuda from", cuda.__file__)
print("numba sees a GPU:", cuda.is_available())
try:
    import torch
except Exception as error:  # missing, or a CUDA library that fails to load
    print(f"torch failed to import ({error!r}), so bench_gpu_mlp.py will skip")
else:
    print("torch", torch.__version__, "built for CUDA", torch.version.cuda,
          "sees a GPU:", torch.cuda.is_available())
import cupy

cupy.zeros(1, dtype=cupy.float32).sum().item()
name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
print("cupy", cupy.__version__, "allocated on", name)
EOF

# Without network, build isolation cannot fetch setuptools, so the
# installed one is used. If that fails too, the checkout goes on PYTHONPATH,
# with kernels/ linked under its import name gradflow_kernels.
if ! run_step "install gradflow (no dependencies, no network)" 30 environment.log - \
        "$PYTHON" -m pip install --no-deps --no-build-isolation -q -e .; then
    echo "pip install -e . failed (see environment.log); using PYTHONPATH instead"
    LINKS="$(mktemp -d)"
    ln -s "$PWD/kernels" "$LINKS/gradflow_kernels"
    export PYTHONPATH="$PWD:$LINKS${PYTHONPATH:+:$PYTHONPATH}"
    STATUSES+=("install: fell back to PYTHONPATH")
fi
run_step "gradflow import" 15 environment.log - "$PYTHON" -c "import sys
import gradflow as gf, gradflow_kernels
print('gradflow sees CUDA:', gf.cuda.is_available())
# Without setuptools and a C compiler the install builds no extension, and
# gradflow runs its Python path: the GPU figures then carry that overhead.
print('gradflow C extension:', 'loaded' if gf._fastpath.extension else 'not built')
sys.exit(0 if gf.cuda.is_available() else 1)" \
    || fail 3 "gradflow cannot use the GPU (see $OUT/environment.log)."

# A per-test limit keeps one hanging test from using up the step. Parallel
# workers compile the suite's CuPy kernels side by side. Each is used only
# where its plugin is installed. The cache plugin stays on under
# pytest-xdist, because pytest 6.2 with pytest-xdist 2.4 raised an internal
# error without it.
PYTEST=("$PYTHON" -m pytest -q --durations 10)
if "$PYTHON" -c "import pytest_timeout" > /dev/null 2>&1; then
    PYTEST+=(--timeout 60)
fi
SUITE_OPTIONS=(-p no:cacheprovider)
if "$PYTHON" -c "import xdist" > /dev/null 2>&1; then
    SUITE_OPTIONS=(-n 4)
fi
KERNEL_TESTS=(tests/test_kernels_activation.py tests/test_clip_grad.py
              tests/test_kernels_ptx.py)

run_step "kernel tests on the GPU" 75 kernel_tests.log - \
    "${PYTEST[@]}" -p no:cacheprovider "${KERNEL_TESTS[@]}"

# The kernel test files ran in full above, so they are left out here.
run_step "the suite's cuda cases" 100 cuda_suite.log - \
    "${PYTEST[@]}" "${SUITE_OPTIONS[@]}" -k cuda tests \
    "${KERNEL_TESTS[@]/#/--ignore=}"

run_step "bench_kernels.py --gpu-only" 65 bench_kernels.log kernels.md \
    "$PYTHON" benchmarks/bench_kernels.py --gpu-only --rounds 5

run_step "bench_gpu_mlp.py" 95 bench_gpu_mlp.log gpu_mlp.md \
    "$PYTHON" benchmarks/bench_gpu_mlp.py --rounds 5

run_step "bench_checkpoint.py --device cuda" 50 bench_checkpoint.log checkpoint.md \
    "$PYTHON" benchmarks/bench_checkpoint.py --device cuda --depths 64 --repeats 3

# show_section TITLE FILE: print one benchmark's output for the summary.
show_section() {
    echo
    echo "### $1"
    echo
    if [[ -s $WORK/$2 ]]; then
        cat "$WORK/$2"
    else
        echo "(no output; see the step's log)"
    fi
}

banner "for benchmarks/RESULTS.md"
{
    echo "# gpu_check.sh summary, $(date -u '+%Y-%m-%d %H:%M') UTC"
    show_section "bench_kernels.py: copy the GPU lines into the bench_kernels section" \
        kernels.md
    show_section "bench_gpu_mlp.py: replace the text between the bench_gpu_mlp markers" \
        gpu_mlp.md
    show_section "bench_checkpoint.py on cuda: the GPU part of the bench_checkpoint section" \
        checkpoint.md
    echo
    print_statuses
} | tee "$OUT/summary.md"

for line in "${STATUSES[@]}"; do
    if [[ $line != *": 0" ]]; then
        exit 1
    fi
done
