"""Elementwise math: exp, log, trigonometry, clamp, maximum/minimum and where."""

import math

import gradflow_kernels
import numpy as np

from .._device import cupy_module
from .._tensor import Tensor, tensor
from .. import _special
from .._fastpath import fast_op
from ..autograd import Function
from ..autograd._namespace import TensorNamespace
from ._common import as_operand, check_broadcast, check_float

__all__ = [
    "exp", "log", "log1p", "sqrt", "square", "abs", "sign", "sin", "cos",
    "tanh", "sigmoid", "erf", "clamp", "maximum", "minimum", "where",
    "stable_sigmoid",
]


def activation_grad(ctx, name, saved, grad, generic, **params):
    """Return the input gradient from a fused kernel if one applies, else ``generic``.

    This is the one place where an activation's backward picks its path. A
    plain backward on arrays tries ``gradflow_kernels`` first, and a recorded
    backward (``create_graph=True``, on Tensors) always runs ``generic``.
    """
    # Small CPU arrays are settled here, before the kernel's checks, because
    # this runs once per activation record in every backward.
    small = type(saved) is np.ndarray and saved.size < gradflow_kernels.CPU_MIN_SIZE
    if not small and not isinstance(ctx.xp, TensorNamespace):
        fused = gradflow_kernels.fused_activation_backward(name, saved, grad, **params)
        if fused is not None:
            return fused
    return generic(ctx.xp, saved, grad, **params)


def stable_sigmoid(xp, x):
    """Return 1 / (1 + exp(-x)) without overflow for large |x|."""
    z = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + z), z / (1 + z))


class Exp(Function):
    @staticmethod
    def forward(ctx, x):
        out = ctx_xp(x).exp(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return grad * out


class Log(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return ctx_xp(x).log(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad / x


class Log1p(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return ctx_xp(x).log1p(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad / (1 + x)


class Sqrt(Function):
    @staticmethod
    def forward(ctx, x):
        out = ctx_xp(x).sqrt(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return grad / (2 * out)


class Abs(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return ctx_xp(x).abs(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        # NOTE: sign(0) = 0, so abs'(0) = 0 as in PyTorch.
        return grad * ctx.xp.sign(x)


class Sin(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return ctx_xp(x).sin(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * ctx.xp.cos(x)


class Cos(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return ctx_xp(x).cos(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return -grad * ctx.xp.sin(x)


class Tanh(Function):
    @staticmethod
    def forward(ctx, x):
        out = ctx_xp(x).tanh(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return activation_grad(ctx, "tanh", out, grad, _tanh_grad)


def _tanh_grad(xp, out, grad):
    return grad * (1 - out * out)


class Sigmoid(Function):
    @staticmethod
    def forward(ctx, x):
        out = stable_sigmoid(ctx_xp(x), x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return activation_grad(ctx, "sigmoid", out, grad, _sigmoid_grad)


def _sigmoid_grad(xp, out, grad):
    return grad * out * (1 - out)


class Erf(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _special.erf(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (2 / math.sqrt(math.pi)) * ctx.xp.exp(-x * x)


class Clamp(Function):
    @staticmethod
    def forward(ctx, x, low, high):
        ctx.save_for_backward(x)
        ctx.bounds = (low, high)
        return ctx_xp(x).clip(x, low, high)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        low, high = ctx.bounds
        # The gradient passes where low <= x <= high, bounds included (PyTorch).
        inside = True
        if low is not None:
            inside = x >= low
        if high is not None:
            inside = (x <= high) & inside if low is not None else x <= high
        return ctx.xp.where(inside, grad, 0), None, None


class Maximum(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return ctx_xp(a, b).maximum(a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return _split_ties(ctx.xp, grad, a > b, a == b, ctx.needs_input_grad)


class Minimum(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return ctx_xp(a, b).minimum(a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return _split_ties(ctx.xp, grad, a < b, a == b, ctx.needs_input_grad)


def _split_ties(xp, grad, first_wins, tie, needs):
    # NOTE: where both operands are equal, each gets half the gradient,
    # which is what PyTorch's maximum and minimum do.
    half = grad * 0.5
    grad_a = xp.where(first_wins, grad, xp.where(tie, half, 0)) if needs[0] else None
    grad_b = None
    if needs[1]:
        grad_b = xp.where(first_wins, 0, xp.where(tie, half, grad))
    return grad_a, grad_b


class Where(Function):
    @staticmethod
    def forward(ctx, condition, a, b):
        ctx.save_for_backward(condition)
        return ctx_xp(condition).where(condition, a, b)

    @staticmethod
    def backward(ctx, grad):
        (condition,) = ctx.saved_tensors
        xp = ctx.xp
        _, need_a, need_b = ctx.needs_input_grad
        grad_a = xp.where(condition, grad, 0) if need_a else None
        grad_b = xp.where(condition, 0, grad) if need_b else None
        return None, grad_a, grad_b


def ctx_xp(*arrays):
    """Return the array module (numpy or cupy) of the first array in ``arrays``."""
    for array in arrays:
        if isinstance(array, np.ndarray):
            return np
        if hasattr(array, "__cuda_array_interface__"):
            return cupy_module()
    return np


def _float_unary(function, name):
    def op(x):
        x = _tensor_arg(x, name)
        check_float(name, x)
        return function.apply(x)

    op.__name__ = name
    op.__qualname__ = name
    op.__doc__ = f"Return the elementwise {name} of a floating-point tensor."
    return op


def _tensor_arg(x, name):
    if isinstance(x, Tensor):
        return x
    return tensor(x)


exp = fast_op("exp", _float_unary(Exp, "exp"))
log = fast_op("log", _float_unary(Log, "log"))
log1p = _float_unary(Log1p, "log1p")
sqrt = fast_op("sqrt", _float_unary(Sqrt, "sqrt"))
sin = fast_op("sin", _float_unary(Sin, "sin"))
cos = fast_op("cos", _float_unary(Cos, "cos"))
tanh = fast_op("tanh", _float_unary(Tanh, "tanh"))
sigmoid = fast_op("sigmoid", _float_unary(Sigmoid, "sigmoid"))
erf = _float_unary(Erf, "erf")


def abs(x):
    """Return |x| elementwise; the gradient at 0 is 0."""
    x = _tensor_arg(x, "abs")
    return Abs.apply(x)


def square(x):
    """Return x * x elementwise."""
    from ._arith import mul

    return mul(x, x)


class Sign(Function):
    @staticmethod
    def forward(ctx, x):
        return ctx_xp(x).sign(x)

    @staticmethod
    def backward(ctx, grad):
        # The derivative is 0 wherever it exists, as PyTorch's sign reports.
        return ctx.xp.zeros_like(grad)


def sign(x):
    """Return the sign (-1, 0 or 1) of each element; its gradient is zero."""
    return Sign.apply(_tensor_arg(x, "sign"))


def clamp(x, min=None, max=None):
    """Limit ``x`` to [min, max]; the gradient passes where min <= x <= max."""
    x = _tensor_arg(x, "clamp")
    if min is None and max is None:
        raise ValueError("clamp: at least one of min and max must be given")
    from .._tensor import Tensor

    if isinstance(min, Tensor) or isinstance(max, Tensor):
        out = x if min is None else maximum(x, min)
        return out if max is None else minimum(out, max)
    if min is not None and max is not None and min > max:
        raise ValueError(f"clamp: min ({min}) is greater than max ({max})")
    return Clamp.apply(x, min, max)


def maximum(a, b):
    """Return the elementwise maximum; a tie splits the gradient evenly."""
    a, b = as_operand(a, b), as_operand(b, a)
    check_broadcast("maximum", a, b)
    return Maximum.apply(a, b)


def minimum(a, b):
    """Return the elementwise minimum; a tie splits the gradient evenly."""
    a, b = as_operand(a, b), as_operand(b, a)
    check_broadcast("minimum", a, b)
    return Minimum.apply(a, b)


def where(condition, a, b):
    """Return ``a`` where ``condition`` is true, else ``b`` (with broadcasting)."""
    from .._tensor import Tensor, make_tensor

    if not isinstance(condition, Tensor):
        condition = as_operand(condition, a if isinstance(a, Tensor) else b)
        if not isinstance(condition, Tensor):
            condition = make_tensor(ctx_xp().asarray(condition))
    if condition.dtype.kind != "b":
        raise TypeError(
            f"where: condition must be a bool tensor, got dtype {condition.dtype}; "
            "build it with a comparison such as x > 0."
        )
    a, b = as_operand(a, condition), as_operand(b, condition)
    check_broadcast("where", condition, a)
    check_broadcast("where", condition, b)
    return Where.apply(condition, a, b)
