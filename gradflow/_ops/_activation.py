"""Activation functions, whose first-order backward may use a fused kernel.

Each backward has one generic formula written against ``ctx.xp``; it is the
reference, the fallback, and what a recorded backward (``create_graph=True``)
runs. A plain backward on arrays first tries a fused one-pass kernel from
``gradflow_kernels``, in ``activation_grad``. That helper lives in
``_unary``, because sigmoid and tanh use it too and this module imports
from ``_unary``.
"""

import math

import gradflow_kernels

from .._fastpath import fast_path
from ..autograd import Function
from ._common import check_float
from ._unary import activation_grad as _activation_grad
from ._unary import ctx_xp, stable_sigmoid

__all__ = ["relu", "leaky_relu", "gelu", "silu", "softplus"]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_CUBIC = 0.044715


class Relu(Function):
    @staticmethod
    def forward(ctx, x):
        out = ctx_xp(x).maximum(x, 0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return _activation_grad(ctx, "relu", out, grad, _relu_grad)


def _relu_grad(xp, out, grad):
    # NOTE: relu'(0) = 0 as in PyTorch. Testing out <= 0 (not out > 0) also
    # passes the gradient through a NaN, which is what PyTorch does.
    return xp.where(out <= 0, 0, grad)


class LeakyRelu(Function):
    @staticmethod
    def forward(ctx, x, negative_slope):
        ctx.save_for_backward(x)
        ctx.negative_slope = negative_slope
        return ctx_xp(x).where(x > 0, x, x * negative_slope)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        grad_x = _activation_grad(
            ctx, "leaky_relu", x, grad, _leaky_relu_grad,
            negative_slope=ctx.negative_slope,
        )
        return grad_x, None


def _leaky_relu_grad(xp, x, grad, negative_slope):
    return xp.where(x > 0, grad, grad * negative_slope)


class Gelu(Function):
    @staticmethod
    def forward(ctx, x, approximate):
        xp = ctx_xp(x)
        ctx.save_for_backward(x)
        ctx.approximate = approximate
        if approximate == "tanh":
            inner = _SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x)
            return 0.5 * x * (1 + xp.tanh(inner))
        fused = gradflow_kernels.fused_activation_forward("gelu", x)
        if fused is not None:
            return fused
        from .._special import erf

        # In place after the first product, which saves three temporaries of
        # x's size. Halving before the product keeps a huge finite x from
        # overflowing to inf.
        out = erf(x * _INV_SQRT_2)
        out += 1
        out *= 0.5
        out *= x
        return out

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        if ctx.approximate == "tanh":
            grad_x = _activation_grad(ctx, "gelu_tanh", x, grad, _gelu_tanh_grad)
        else:
            grad_x = _activation_grad(ctx, "gelu", x, grad, _gelu_grad)
        return grad_x, None


def _gelu_grad(xp, x, grad):
    cdf = 0.5 * (1 + xp.erf(x * _INV_SQRT_2))
    pdf = _INV_SQRT_2PI * xp.exp(-0.5 * x * x)
    return grad * (cdf + x * pdf)


def _gelu_tanh_grad(xp, x, grad):
    x_sq = x * x
    t = xp.tanh(_SQRT_2_OVER_PI * (x + _GELU_CUBIC * x_sq * x))
    d_inner = _SQRT_2_OVER_PI * (1 + 3 * _GELU_CUBIC * x_sq)
    return grad * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * d_inner)


class Silu(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * stable_sigmoid(ctx_xp(x), x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return _activation_grad(ctx, "silu", x, grad, _silu_grad)


def _silu_grad(xp, x, grad):
    s = xp.sigmoid(x)
    return grad * s * (1 + x * (1 - s))


class Softplus(Function):
    @staticmethod
    def forward(ctx, x, beta, threshold):
        xp = ctx_xp(x)
        ctx.save_for_backward(x)
        ctx.beta, ctx.threshold = beta, threshold
        bx = x * beta
        # log(1 + exp(bx)) = max(bx, 0) + log1p(exp(-|bx|)) never overflows;
        # above the threshold the function is linear (PyTorch's rule).
        smooth = (xp.maximum(bx, 0) + xp.log1p(xp.exp(-xp.abs(bx)))) / beta
        return xp.where(bx > threshold, x, smooth)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        grad_x = _activation_grad(
            ctx, "softplus", x, grad, _softplus_grad,
            beta=ctx.beta, threshold=ctx.threshold,
        )
        return grad_x, None, None


def _softplus_grad(xp, x, grad, beta, threshold):
    bx = x * beta
    return xp.where(bx > threshold, grad, grad * xp.sigmoid(bx))


def _checked(x, name):
    from .._tensor import Tensor, tensor

    x = x if isinstance(x, Tensor) else tensor(x)
    check_float(name, x)
    return x


@fast_path("relu")
def relu(x):
    """Return max(x, 0) elementwise; the gradient at 0 is 0."""
    return Relu.apply(_checked(x, "relu"))


def leaky_relu(x, negative_slope=0.01):
    """Return x where x > 0, else ``negative_slope * x``."""
    return LeakyRelu.apply(_checked(x, "leaky_relu"), float(negative_slope))


def gelu(x, approximate="none"):
    """Return x * Phi(x); ``approximate="tanh"`` uses the tanh formula."""
    if approximate not in ("none", "tanh"):
        raise ValueError(
            f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}"
        )
    return Gelu.apply(_checked(x, "gelu"), approximate)


def silu(x):
    """Return x * sigmoid(x) (also called swish)."""
    return Silu.apply(_checked(x, "silu"))


def softplus(x, beta=1.0, threshold=20.0):
    """Return log(1 + exp(beta * x)) / beta, linear where beta * x > threshold."""
    if beta <= 0:
        raise ValueError(f"softplus: beta must be positive, got {beta}")
    return Softplus.apply(_checked(x, "softplus"), float(beta), float(threshold))
