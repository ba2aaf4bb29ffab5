"""Fused kernels that gradflow's ops call through one seam each.

This package handles arrays only (NumPy and CuPy), never gradflow Tensors.
Numba is imported on the first call that needs a kernel, never at import.

* ``fused_activation_backward`` returns the input gradient of an activation
  computed in one pass, or None when no fused kernel applies, in which case
  the caller runs its generic array expression instead.
* ``multi_tensor_plan`` tables many gradients of one device, so that their
  global norm and their scaling each take a number of kernel launches that
  does not grow with the number of gradients (``gradflow.nn.utils``).
* ``adam_table`` tables the parameters, gradients and Adam states of one
  dtype and device, so that one parallel CPU loop or one CUDA launch
  updates them all (``gradflow.optim``).
* ``matmul`` multiplies large NumPy float matrices, or batches of them,
  through MKL when the ``mkl`` wheel is installed, or returns None
  (``_blas``).
"""

import sys
import warnings

import numpy as np

from . import _threads
from ._threads import limit_openmp_spinning

# Here rather than only before the first kernel: a program that calls
# numba.set_num_threads() starts Numba's OpenMP workers at that call, and
# the setting must come first. NOTE: the variable is process-wide, so other
# libraries on GNU OpenMP loaded after gradflow (PyTorch, for one) do not
# spin-wait either, unless the user sets GOMP_SPINCOUNT. Without gradflow
# imported yet, a warning waits for the first CPU kernel.
limit_openmp_spinning(warn_now="gradflow" in sys.modules)

from ._blas import matmul  # noqa: E402 (loads MKL after the setting above)

__all__ = [
    "ACTIVATIONS", "CPU_MIN_SIZE", "FORK_REASON", "FORWARD_ACTIVATIONS",
    "activation_backward", "cpu_kernels_forked",
    "adam_table", "fused_activation_backward", "fused_activation_forward",
    "matmul", "multi_tensor_plan",
]

# The value each activation saves for backward (its input or its output),
# and the names of its parameters in the order the kernels take them as
# ``a`` and ``b``.
ACTIVATIONS = {
    "relu": ("output", ()),
    "leaky_relu": ("input", ("negative_slope",)),
    "sigmoid": ("output", ()),
    "tanh": ("output", ()),
    "gelu": ("input", ()),
    "gelu_tanh": ("input", ()),
    "silu": ("input", ()),
    "softplus": ("input", ("beta", "threshold")),
}

# Below this many elements, starting the parallel loop costs more than the
# NumPy expression. NOTE: an estimate from timings of 2**12 to 2**20 float32
# elements on a shared 2-core AMD EPYC VM, where sigmoid and tanh were faster
# fused from 2**14 on; another machine may want another value.
CPU_MIN_SIZE = 1 << 14

_CPU_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_CUDA_DTYPES = _CPU_DTYPES + (np.dtype(np.float16),)


# The reason, for error messages, that the CPU kernels do not run in a forked process.
FORK_REASON = (
    "this process was forked after the OpenMP worker threads of gradflow's "
    "parallel CPU kernels started, and the kernels cannot run in it. Start "
    "worker processes with the 'spawn' or 'forkserver' method"
)


def cpu_kernels_forked():
    """Return whether the parallel CPU kernels are off because of a fork."""
    return _threads.forked_from_openmp


def fused_activation_backward(name, saved, grad_output, **params):
    """Return the input gradient of activation ``name``, or None.

    ``saved`` is the array the activation kept for backward (its input for
    gelu, gelu_tanh, silu, softplus and leaky_relu, its output for relu,
    sigmoid and tanh) and ``grad_output`` the incoming gradient of the same
    shape. ``params`` are the activation's parameters by name (see
    ``ACTIVATIONS``). None means that the caller's generic expression is
    the better choice for these arrays.
    """
    if name not in ACTIVATIONS or type(saved) is not type(grad_output):
        return None
    same = saved.dtype == grad_output.dtype and saved.shape == grad_output.shape
    # A strided input stays on the generic path, because NumPy and CuPy run
    # it on the strides directly, and a copy for the kernel costs a full pass.
    contiguous = saved.flags.c_contiguous and grad_output.flags.c_contiguous
    on_cpu = isinstance(saved, np.ndarray)
    if on_cpu and same and contiguous and saved.dtype in _CPU_DTYPES \
            and saved.size >= CPU_MIN_SIZE and not _threads.forked_from_openmp:
        from . import _cpu

        return _cpu.activation_backward(name, saved, grad_output, *_ab(name, params))
    on_cuda = not on_cpu and hasattr(saved, "__cuda_array_interface__")
    # NOTE: no size threshold on CUDA: a launch has not been measured against
    # CuPy's multi-kernel expression on small arrays yet.
    if on_cuda and same and contiguous and saved.dtype in _CUDA_DTYPES:
        from . import _cuda

        return _cuda.activation_backward(name, saved, grad_output, *_ab(name, params))
    return None


# Activations with a fused CPU forward.
FORWARD_ACTIVATIONS = ("gelu",)


def fused_activation_forward(name, x):
    """Return activation ``name`` of the array ``x`` from one fused pass, or None.

    The exact GELU is computed in float64 from erfc and rounded once, which
    is more accurate than the array expression (erf, then three products),
    whose 1 + erf(x) cancels for negative x. For float32 the erfc is a
    fitted formula of arithmetic only (within 1.1e-8 relative, so results
    stay within one float32 ulp), because the C library's erfc is a scalar
    call per element that the loop cannot vectorize.
    None means that the caller's array expression is the better choice:
    a CuPy, strided, float16 or small array, or an activation without a
    fused forward.
    """
    if (
        name not in FORWARD_ACTIVATIONS or type(x) is not np.ndarray
        or x.dtype not in _CPU_DTYPES or x.size < CPU_MIN_SIZE
        or not x.flags.c_contiguous or _threads.forked_from_openmp
    ):
        return None
    from . import _cpu

    return _cpu.activation_forward(name, x)


def activation_backward(name, saved, grad_output, **params):
    """Run the fused backward of ``name`` on any NumPy or CuPy arrays.

    Unlike ``fused_activation_backward`` this always runs the kernel: a
    strided input is copied once (with a ``PerformanceWarning``), and small
    arrays are not sent to the generic path. Raises ValueError for an
    unknown name, a dtype without a kernel, or mismatched shapes or dtypes.
    """
    _check_kernel_arguments(name, saved, grad_output)
    saved = _contiguous(name, saved, "saved")
    grad_output = _contiguous(name, grad_output, "grad_output")
    a, b = _ab(name, params)
    if isinstance(saved, np.ndarray):
        if _threads.forked_from_openmp:
            raise RuntimeError(
                f"activation_backward({name!r}): {FORK_REASON}, or use "
                "gradflow's ops, which fall back to NumPy in such a process."
            )
        from . import _cpu

        return _cpu.activation_backward(name, saved, grad_output, a, b)
    from . import _cuda

    return _cuda.activation_backward(name, saved, grad_output, a, b)


def multi_tensor_plan(arrays):
    """Return a plan that reduces and scales ``arrays`` together, or None.

    ``arrays`` are the gradients of one device (NumPy or CuPy), of any
    floating dtypes. The plan's ``norm(norm_type, max_norm)`` returns a
    float64 array [total norm, clip coefficient] on that device, and its
    ``scale_(state)`` multiplies every array in place by ``state[1]``.
    None means that the caller's per-array loop must be used: a strided
    array, or float16 on the CPU, where Numba cannot type float16.
    """
    if not arrays:
        return None
    if isinstance(arrays[0], np.ndarray):
        if _threads.forked_from_openmp or any(a.dtype not in _CPU_DTYPES for a in arrays):
            return None
        from ._clip_cpu import CpuPlan

        return CpuPlan.build(arrays)
    if any(a.dtype not in _CUDA_DTYPES for a in arrays):
        return None
    from ._clip_cuda import CudaPlan

    return CudaPlan.build(arrays)


def adam_table(like):
    """Return an empty Adam table for arrays of ``like``'s dtype and device, or None.

    ``like`` is a NumPy or CuPy array. The table's ``add`` takes one tensor's
    parameter, gradient and states, and its ``run`` updates every tabled
    tensor in one parallel CPU loop or one CUDA launch. None means that no
    kernel takes the array, so the caller's per-parameter update must be
    used: float16 on the CPU, where Numba cannot type float16, or a dtype
    other than float16, float32 and float64 on CUDA.
    """
    dtype = np.dtype(like.dtype)
    if isinstance(like, np.ndarray):
        if dtype not in _CPU_DTYPES or _threads.forked_from_openmp:
            return None
        from ._adam_cpu import AdamTable

        return AdamTable(dtype)
    if not hasattr(like, "__cuda_array_interface__") or dtype not in _CUDA_DTYPES:
        return None
    from ._adam_cuda import CudaAdamTable

    return CudaAdamTable(like)


def _ab(name, params):
    names = ACTIVATIONS[name][1]
    values = [float(params[n]) for n in names] + [0.0, 0.0]
    return values[0], values[1]


def _check_kernel_arguments(name, saved, grad_output):
    if name not in ACTIVATIONS:
        raise ValueError(
            f"activation_backward: unknown activation {name!r}; expected one "
            f"of {sorted(ACTIVATIONS)}"
        )
    dtypes = _CPU_DTYPES if isinstance(saved, np.ndarray) else _CUDA_DTYPES
    if saved.dtype not in dtypes or saved.dtype != grad_output.dtype:
        raise ValueError(
            f"activation_backward({name!r}): saved ({saved.dtype}) and "
            f"grad_output ({grad_output.dtype}) must share one dtype out of "
            f"{[str(d) for d in dtypes]}; cast them first."
        )
    if saved.shape != grad_output.shape:
        raise ValueError(
            f"activation_backward({name!r}): saved has shape {saved.shape} "
            f"but grad_output has shape {grad_output.shape}; they must match."
        )


def _contiguous(name, array, role):
    if array.flags.c_contiguous:
        return array
    from gradflow.errors import PerformanceWarning

    warnings.warn(
        f"activation_backward({name!r}): {role} (shape {array.shape}, strides "
        f"{array.strides}) is not C-contiguous, so it is copied before the "
        "fused kernel runs; pass a contiguous array to avoid the copy.",
        PerformanceWarning,
        stacklevel=3,
    )
    return array.copy(order="C")
