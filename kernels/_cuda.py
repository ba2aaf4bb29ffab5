"""CUDA kernels: the activation backward formulas as grid-stride loops.

Importing this module imports ``numba.cuda``; each kernel compiles on its
first launch for the dtypes it meets. The kernels take 1-D C-contiguous
arrays of one dtype (CuPy arrays on a GPU, NumPy arrays under the CUDA
simulator) and two float64 parameters ``a`` and ``b``, as the CPU loops do.

Each kernel spells its formula out instead of calling the function in
``_cpu``: Numba 0.68's ``cuda.compile_ptx`` compiles a called device
function for the current device, so a kernel that calls one cannot be
compiled to PTX on a machine without a GPU. The tests check every kernel
against a float64 NumPy reference.

NOTE: ``v = x[i] * 1.0`` promotes float16 and float32 to float64, so every
kernel computes in float64. That is accurate for every dtype. GELU's erf
and exp may then be bound by FP64 throughput on GPUs with few FP64 units,
and no GPU timing exists yet to tell.
"""

import math

import numpy as np
from numba import cuda

from ._cpu import GELU_CUBIC, INV_SQRT_2, INV_SQRT_2PI, SQRT_2_OVER_PI
from ._launch import (
    SIMULATOR, THREADS_PER_BLOCK, as_device_array, block_count, current_stream,
)

__all__ = ["KERNELS", "activation_backward", "launch_activation", "run_on_host"]


@cuda.jit
def relu_backward(out_saved, grad, out, a, b):
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = 0.0 if out_saved[i] <= 0.0 else grad[i]


@cuda.jit
def leaky_relu_backward(x, grad, out, a, b):
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = grad[i] if x[i] > 0.0 else grad[i] * a


@cuda.jit
def sigmoid_backward(out_saved, grad, out, a, b):
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        s = out_saved[i] * 1.0
        out[i] = grad[i] * s * (1.0 - s)


@cuda.jit
def tanh_backward(out_saved, grad, out, a, b):
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        t = out_saved[i] * 1.0
        out[i] = grad[i] * (1.0 - t * t)


@cuda.jit
def gelu_backward(x, grad, out, a, b):
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        v = x[i] * 1.0
        cdf = 0.5 * (1.0 + math.erf(v * INV_SQRT_2))
        pdf = INV_SQRT_2PI * math.exp(-0.5 * v * v)
        out[i] = grad[i] * (cdf + v * pdf)


@cuda.jit
def gelu_tanh_backward(x, grad, out, a, b):
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        v = x[i] * 1.0
        v_sq = v * v
        t = math.tanh(SQRT_2_OVER_PI * (v + GELU_CUBIC * v_sq * v))
        d_inner = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * v_sq)
        out[i] = grad[i] * (0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * d_inner)


@cuda.jit
def silu_backward(x, grad, out, a, b):
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        v = x[i] * 1.0
        z = math.exp(-abs(v))
        s = 1.0 / (1.0 + z) if v >= 0.0 else z / (1.0 + z)
        out[i] = grad[i] * s * (1.0 + v * (1.0 - s))


@cuda.jit
def softplus_backward(x, grad, out, a, b):
    # a: beta, b: threshold.
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        bx = x[i] * a
        if bx > b:
            out[i] = grad[i]
        else:
            z = math.exp(-abs(bx))
            s = 1.0 / (1.0 + z) if bx >= 0.0 else z / (1.0 + z)
            out[i] = grad[i] * s


KERNELS = {
    "relu": relu_backward,
    "leaky_relu": leaky_relu_backward,
    "sigmoid": sigmoid_backward,
    "tanh": tanh_backward,
    "gelu": gelu_backward,
    "gelu_tanh": gelu_tanh_backward,
    "silu": silu_backward,
    "softplus": softplus_backward,
}


def launch_activation(name, saved, grad, out, a=0.0, b=0.0):
    """Launch the backward kernel of ``name`` on CuPy's current stream."""
    blocks = block_count(out.size)
    KERNELS[name][blocks, THREADS_PER_BLOCK, current_stream()](
        saved, grad, out, a, b
    )


def activation_backward(name, saved, grad, a=0.0, b=0.0):
    """Return the input gradient of ``name`` for C-contiguous CuPy arrays."""
    import cupy

    out = cupy.empty_like(saved)
    if out.size == 0:
        return out
    launch_activation(
        name,
        as_device_array(saved.reshape(-1)),
        as_device_array(grad.reshape(-1)),
        as_device_array(out.reshape(-1)),
        a, b,
    )
    return out


def run_on_host(name, saved, grad, a=0.0, b=0.0):
    """Run the CUDA kernel of ``name`` on NumPy arrays and return a NumPy array.

    Under the simulator the kernel reads the host arrays directly; on a GPU
    the arrays are copied to the device and back. Tests use it to run the
    same kernels on machines with and without a GPU.
    """
    flat_saved = np.ascontiguousarray(saved).reshape(-1)
    flat_grad = np.ascontiguousarray(grad).reshape(-1)
    out = np.empty_like(flat_saved)
    if SIMULATOR or out.size == 0:
        launch_activation(name, flat_saved, flat_grad, out, a, b)
        return out.reshape(np.shape(saved))
    device_out = cuda.to_device(out)
    blocks = block_count(out.size)
    KERNELS[name][blocks, THREADS_PER_BLOCK](
        cuda.to_device(flat_saved), cuda.to_device(flat_grad), device_out, a, b
    )
    return device_out.copy_to_host().reshape(np.shape(saved))
