"""Every CUDA kernel compiles to real PTX for sm_90, with or without a GPU.

``numba.cuda.compile_ptx`` needs NVVM (libnvvm from the CUDA toolkit) but
no driver. The CUDA simulator replaces the compiler, so the compilation
runs in a subprocess with ``NUMBA_ENABLE_CUDASIM=0``.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import gradflow_kernels

_NO_NVVM_EXIT = 3

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from numba import cuda, types
    from numba.cuda.cudadrv import nvvm

    if not nvvm.is_available():
        print("NVVM (libnvvm) was not found; set CUDA_HOME to a CUDA toolkit")
        sys.exit(%d)

    from gradflow_kernels import _adam_cuda, _clip_cuda, _cuda

    f64 = types.float64
    i64 = types.int64[::1]
    table = types.int64[:, ::1]
    compiled = {}
    for dtype in (types.float16, types.float32, types.float64):
        arr = dtype[::1]
        activation = (arr, arr, arr, f64, f64)
        kernels = [(name, k, activation) for name, k in _cuda.KERNELS.items()]
        reduce = (i64, i64, i64, i64, arr, types.int64, f64, f64[::1], types.int64)
        kernels.append(("reduce", _clip_cuda._reduce_kernel, reduce))
        kernels.append(("scale", _clip_cuda._scale_kernel,
                        (i64, i64, i64, i64, arr, f64[::1])))
        adam = (table, i64, i64, i64, arr, f64[:, ::1]) + (f64,) * 6
        kernels.append(("adam", _adam_cuda._adam_kernel, adam))
        for name, kernel, signature in kernels:
            ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=(9, 0))
            compiled[f"{name}-{dtype}"] = ptx
    ptx, _ = cuda.compile_ptx(
        _clip_cuda._finish_kernel.py_func,
        (f64[::1], types.int64, f64, f64, f64[::1]), cc=(9, 0),
    )
    compiled["finish-float64"] = ptx
    print(json.dumps({k: (".target sm_90" in v, len(v)) for k, v in compiled.items()}))
    """
    % _NO_NVVM_EXIT
)


@pytest.fixture(scope="module")
def compiled():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env,
        timeout=300,
    )
    if result.returncode == _NO_NVVM_EXIT:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize(
    "kernel", sorted(gradflow_kernels.ACTIVATIONS) + ["adam", "reduce", "scale"]
)
def test_kernel_compiles_for_sm90(compiled, kernel, dtype):
    targets_sm90, size = compiled[f"{kernel}-{dtype}"]
    assert targets_sm90
    assert size > 0


def test_finish_kernel_compiles_for_sm90(compiled):
    targets_sm90, _ = compiled["finish-float64"]
    assert targets_sm90
