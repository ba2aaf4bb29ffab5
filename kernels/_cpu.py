"""CPU kernels: the activation backward formulas as parallel Numba loops.

Importing this module imports Numba, so ``gradflow_kernels`` imports it only
on the first fused call. Each function compiles on its first call for the
dtypes it meets and is cached on disk (``cache=True``), so later processes
load it instead of compiling it again.

Each formula maps one saved forward value and one incoming gradient to one
input gradient, and takes the two parameters ``a`` and ``b`` (zero when
unused), so one loop signature serves every activation. The formulas live
in this file, next to the loops, because Numba checks only the source file
of a cached function for changes: a formula edited in another file would
leave a stale compiled loop in the cache.

NOTE: the arithmetic runs in float64 whatever the array dtype, because Numba
types a Python float literal as float64. The result is rounded once, when
the loop stores it.
"""

import math

import numba
import numpy as np

__all__ = ["LOOPS", "activation_backward", "copy_sum_loop"]

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
INV_SQRT_2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
GELU_CUBIC = 0.044715


@numba.njit(cache=True)
def relu(out, grad, a, b):
    # relu'(0) = 0: the saved output is 0 wherever the input was <= 0.
    return grad if out > 0.0 else 0.0


@numba.njit(cache=True)
def leaky_relu(x, grad, a, b):
    # a: negative_slope.
    return grad if x > 0.0 else grad * a


@numba.njit(cache=True)
def sigmoid_grad(out, grad, a, b):
    return grad * out * (1.0 - out)


@numba.njit(cache=True)
def tanh_grad(out, grad, a, b):
    return grad * (1.0 - out * out)


@numba.njit(cache=True)
def gelu(x, grad, a, b):
    cdf = 0.5 * (1.0 + math.erf(x * INV_SQRT_2))
    pdf = INV_SQRT_2PI * math.exp(-0.5 * x * x)
    return grad * (cdf + x * pdf)


@numba.njit(cache=True)
def gelu_tanh(x, grad, a, b):
    x_sq = x * x
    t = math.tanh(SQRT_2_OVER_PI * (x + GELU_CUBIC * x_sq * x))
    d_inner = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x_sq)
    return grad * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * d_inner)


@numba.njit(cache=True)
def silu(x, grad, a, b):
    # sigmoid(x) from exp(-|x|), which cannot overflow.
    z = math.exp(-abs(x))
    s = 1.0 / (1.0 + z) if x >= 0.0 else z / (1.0 + z)
    return grad * s * (1.0 + x * (1.0 - s))


@numba.njit(cache=True)
def softplus(x, grad, a, b):
    # a: beta, b: threshold. Above the threshold softplus is the identity.
    bx = x * a
    if bx > b:
        return grad
    z = math.exp(-abs(bx))
    s = 1.0 / (1.0 + z) if bx >= 0.0 else z / (1.0 + z)
    return grad * s


# One loop per activation, because Numba's disk cache keys a function by its
# name and source line, so a loop built by a factory could not be cached.
@numba.njit(parallel=True, cache=True)
def _relu_loop(saved, grad, out, a, b):
    for i in numba.prange(saved.size):
        out[i] = relu(saved[i], grad[i], a, b)


@numba.njit(parallel=True, cache=True)
def _leaky_relu_loop(saved, grad, out, a, b):
    for i in numba.prange(saved.size):
        out[i] = leaky_relu(saved[i], grad[i], a, b)


@numba.njit(parallel=True, cache=True)
def _sigmoid_loop(saved, grad, out, a, b):
    for i in numba.prange(saved.size):
        out[i] = sigmoid_grad(saved[i], grad[i], a, b)


@numba.njit(parallel=True, cache=True)
def _tanh_loop(saved, grad, out, a, b):
    for i in numba.prange(saved.size):
        out[i] = tanh_grad(saved[i], grad[i], a, b)


@numba.njit(parallel=True, cache=True)
def _gelu_loop(saved, grad, out, a, b):
    for i in numba.prange(saved.size):
        out[i] = gelu(saved[i], grad[i], a, b)


@numba.njit(parallel=True, cache=True)
def _gelu_tanh_loop(saved, grad, out, a, b):
    for i in numba.prange(saved.size):
        out[i] = gelu_tanh(saved[i], grad[i], a, b)


@numba.njit(parallel=True, cache=True)
def _silu_loop(saved, grad, out, a, b):
    for i in numba.prange(saved.size):
        out[i] = silu(saved[i], grad[i], a, b)


@numba.njit(parallel=True, cache=True)
def _softplus_loop(saved, grad, out, a, b):
    for i in numba.prange(saved.size):
        out[i] = softplus(saved[i], grad[i], a, b)


LOOPS = {
    "relu": _relu_loop,
    "leaky_relu": _leaky_relu_loop,
    "sigmoid": _sigmoid_loop,
    "tanh": _tanh_loop,
    "gelu": _gelu_loop,
    "gelu_tanh": _gelu_tanh_loop,
    "silu": _silu_loop,
    "softplus": _softplus_loop,
}


@numba.njit(parallel=True, cache=True)
def copy_sum_loop(a, b, out):
    """Write a + b: two reads and one write, the bandwidth floor of a backward."""
    for i in numba.prange(a.size):
        out[i] = a[i] + b[i]


def activation_backward(name, saved, grad, a=0.0, b=0.0):
    """Return the input gradient of ``name`` for C-contiguous arrays of one dtype."""
    out = np.empty_like(saved)
    LOOPS[name](saved.reshape(-1), grad.reshape(-1), out.reshape(-1), a, b)
    return out
