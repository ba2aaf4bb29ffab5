#!/usr/bin/env bash
# One prepared GPU run, at most 8 minutes: install gradflow, run the kernel
# tests and then the suite's cuda cases on the GPU, run the GPU benchmarks,
# and print what benchmarks/RESULTS.md needs.
#
# Expects a machine with one NVIDIA GPU, Python 3.12, cupy-cuda13x, numba
# and numba-cuda already installed, and no network. Run it from the
# repository root:  bash benchmarks/gpu_check.sh
# Logs and the benchmark section go to $OUT (or ./gpu_check_out).
set -uo pipefail

OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
# Tiny test launches would trip Numba's low-occupancy warning, and the test
# suite turns warnings into errors.
export NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS=0
unset NUMBA_ENABLE_CUDASIM

step() { echo; echo "== $* ($(date -u +%H:%M:%S) UTC)"; }

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" - <<'EOF'
import platform, numpy, numba, cupy
print("python", platform.python_version(), "numpy", numpy.__version__,
      "numba", numba.__version__, "cupy", cupy.__version__)
from numba import cuda
print("numba.cuda from", cuda.__file__)
print("numba sees a GPU:", cuda.is_available())
EOF

step "install gradflow (no dependencies, no network)"
# Without network, build isolation cannot fetch setuptools, so the
# installed one is used. If that fails too, the checkout goes on PYTHONPATH,
# with kernels/ linked under its import name gradflow_kernels.
if ! "$PYTHON" -m pip install --no-deps --no-build-isolation -q -e . \
        > "$OUT/pip.log" 2>&1; then
    echo "pip install -e . failed (see pip.log); using PYTHONPATH instead"
    LINKS="$(mktemp -d)"
    ln -s "$PWD/kernels" "$LINKS/gradflow_kernels"
    export PYTHONPATH="$PWD:$LINKS${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" -c "import gradflow as gf, gradflow_kernels
print('gradflow sees CUDA:', gf.cuda.is_available())"

step "kernel tests on the GPU (limit 150 s)"
timeout 150 "$PYTHON" -m pytest -q -p no:cacheprovider \
    tests/test_kernels_activation.py tests/test_clip_grad.py tests/test_kernels_ptx.py \
    2>&1 | tee "$OUT/kernel_tests.log" | tail -25
echo "kernel tests exit status: ${PIPESTATUS[0]}"

step "the suite's cuda cases (limit 150 s)"
timeout 150 "$PYTHON" -m pytest -q -p no:cacheprovider -k cuda tests \
    2>&1 | tee "$OUT/cuda_suite.log" | tail -25
echo "cuda suite exit status: ${PIPESTATUS[0]}"

step "GPU benchmarks (limit 120 s)"
timeout 120 "$PYTHON" benchmarks/bench_kernels.py --gpu-only --rounds 5 \
    --write-results --results "$OUT/RESULTS_gpu.md" \
    2>&1 | tee "$OUT/bench_gpu.log"
echo "benchmark exit status: ${PIPESTATUS[0]}"

step "for benchmarks/RESULTS.md"
echo "Copy the GPU lines below into the bench_kernels section:"
cat "$OUT/RESULTS_gpu.md" 2>/dev/null || echo "(no benchmark output)"
