"""Arithmetic: + - * / ** and negation with broadcasting, and matrix products.

Binary ops return gradients of the broadcast shape; the engine sums them back
to each input's shape.
"""

import numbers

import numpy as np


from .._fastpath import fast_path
from .._tensor import Tensor
from ..autograd import Function
from ._common import as_operand, check_float, check_broadcast, matmul_arrays

__all__ = ["add", "sub", "mul", "div", "pow", "neg", "matmul"]


class Add(Function):
    @staticmethod
    def forward(ctx, a, b):
        return a + b

    @staticmethod
    def backward(ctx, grad):
        return grad, grad


class Sub(Function):
    @staticmethod
    def forward(ctx, a, b):
        return a - b

    @staticmethod
    def backward(ctx, grad):
        return grad, (-grad if ctx.needs_input_grad[1] else None)


class Mul(Function):
    @staticmethod
    def forward(ctx, a, b):
        # Each gradient needs only the other operand, so only that is kept
        # (an in-place change to an operand nothing reads is then allowed).
        need_a, need_b = ctx.needs_input_grad
        ctx.save_for_backward(a if need_b else None, b if need_a else None)
        return a * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad
        return (grad * b if need_a else None), (grad * a if need_b else None)


class Div(Function):
    @staticmethod
    def forward(ctx, a, b):
        out = a / b
        ctx.save_for_backward(b, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        b, out = ctx.saved_tensors
        grad_a = grad / b
        grad_b = -grad_a * out if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


class Pow(Function):
    @staticmethod
    def forward(ctx, base, exponent):
        # 0 ** -1 is inf, the right value, so NumPy's warning is silenced.
        with np.errstate(divide="ignore"):
            out = base**exponent
        ctx.save_for_backward(base, exponent, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        base, exponent, out = ctx.saved_tensors
        xp = ctx.xp
        need_base, need_exponent = ctx.needs_input_grad
        grad_base = grad_exponent = None
        # 0 ** (e - 1) divides by zero for e < 1. The infinities are the
        # right limits, so NumPy's warnings about them are silenced.
        with np.errstate(divide="ignore", invalid="ignore"):
            if need_base:
                grad_base = _pow_base_grad(xp, grad, base, exponent)
            if need_exponent:
                grad_exponent = _pow_exponent_grad(xp, grad, base, exponent, out)
        return grad_base, grad_exponent


def _pow_base_grad(xp, grad, base, exponent):
    # NOTE: the derivative of b**0 is 0 everywhere, also at b == 0 where the
    # formula gives 0 * 0**-1 = nan; PyTorch masks it the same way.
    if isinstance(exponent, numbers.Number):
        return grad * 0 if exponent == 0 else grad * exponent * base ** (exponent - 1)
    return xp.where(exponent == 0, 0, grad * exponent * base ** (exponent - 1))


def _pow_exponent_grad(xp, grad, base, exponent, out):
    # NOTE: d(b**e)/de = b**e * log(b); PyTorch sets it to 0 where b == 0 and
    # e >= 0 (the limit), instead of 0 * -inf = nan.
    # A negative exponent at b == 0 keeps inf * -inf = -inf, PyTorch's value.
    grad_exponent = grad * out * xp.log(base)
    return xp.where((base == 0) & (exponent >= 0), 0, grad_exponent)


class Neg(Function):
    @staticmethod
    def forward(ctx, a):
        return -a

    @staticmethod
    def backward(ctx, grad):
        return -grad


class MatMul(Function):
    """NumPy's matmul: 1-D vectors, 2-D matrices and broadcast batches."""

    @staticmethod
    def forward(ctx, a, b):
        need_a, need_b = ctx.needs_input_grad
        ctx.save_for_backward(a if need_b else None, b if need_a else None)
        ctx.ndims = (a.ndim, b.ndim)
        return matmul_arrays(a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        xp = ctx.xp
        need_a, need_b = ctx.needs_input_grad
        a_ndim, b_ndim = ctx.ndims
        if a_ndim == 1 and b_ndim == 1:
            return (grad * b if need_a else None), (grad * a if need_b else None)
        if a_ndim == 1:
            # (k) @ (..., k, n): treat a as a (1, k) matrix.
            grad_row = xp.expand_dims(grad, -2)
            grad_a = (grad_row @ xp.swapaxes(b, -1, -2))[..., 0, :] if need_a else None
            grad_b = xp.expand_dims(a, -1) @ grad_row if need_b else None
            return grad_a, grad_b
        if b_ndim == 1:
            # (..., m, k) @ (k): treat b as a (k, 1) matrix.
            grad_col = xp.expand_dims(grad, -1)
            grad_a = grad_col @ xp.expand_dims(b, -2) if need_a else None
            grad_b = (xp.swapaxes(a, -1, -2) @ grad_col)[..., 0] if need_b else None
            return grad_a, grad_b
        grad_a = matmul_arrays(grad, xp.swapaxes(b, -1, -2)) if need_a else None
        grad_b = matmul_arrays(xp.swapaxes(a, -1, -2), grad) if need_b else None
        return grad_a, grad_b


def _binary(function, name, a, b):
    # The common case first: a float tensor and a Python float, which needs
    # no conversion and no promotion.
    if type(b) is float and type(a) is Tensor and a.data.dtype.kind == "f":
        return function.apply(a, b)
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        a, b = as_operand(a, b), as_operand(b, a)
        # A Python number broadcasts to anything and takes the tensor's dtype.
        if not isinstance(a, Tensor):
            return function.apply(a, _float_for(function, b, a))
        if not isinstance(b, Tensor):
            return function.apply(_float_for(function, a, b), b)
    if a.data.dtype != b.data.dtype:
        a, b = _promote(a, b)
    elif function is Div and a.data.dtype.kind in "iub":
        a, b = a.astype(np.float32), b.astype(np.float32)
    if a.data.shape != b.data.shape:
        check_broadcast(name, a, b)
    return function.apply(a, b)


def _float_for(function, t, number):
    """Return ``t`` as float32 when an integer tensor meets a float (or ``/``).

    NumPy would give float64 there; gradflow follows PyTorch, whose default
    float dtype is float32.
    """
    if t.data.dtype.kind in "iub" and (isinstance(number, float) or function is Div):
        return t.astype(np.float32)
    return t


def _promote(a, b):
    """Cast an integer or bool operand to the other's float dtype (PyTorch's rule).

    Two floats (or two integers) of different sizes promote as in NumPy.
    """
    kind_a, kind_b = a.data.dtype.kind, b.data.dtype.kind
    if kind_a == "f" and kind_b in "iub":
        return a, b.astype(a.data.dtype)
    if kind_b == "f" and kind_a in "iub":
        return a.astype(b.data.dtype), b
    return a, b


@fast_path("add")
def add(a, b):
    """Return ``a + b`` with broadcasting; either side may be a Python number."""
    return _binary(Add, "add", a, b)


@fast_path("sub")
def sub(a, b):
    """Return ``a - b`` with broadcasting."""
    return _binary(Sub, "sub", a, b)


@fast_path("mul")
def mul(a, b):
    """Return ``a * b`` with broadcasting."""
    return _binary(Mul, "mul", a, b)


@fast_path("div")
def div(a, b):
    """Return ``a / b`` with broadcasting (true division)."""
    return _binary(Div, "div", a, b)


def pow(a, b):
    """Return ``a ** b``; the exponent may be a Python number or a Tensor."""
    if isinstance(b, numbers.Number) and not isinstance(b, bool):
        a = as_operand(a, b)
        if isinstance(a, Tensor):
            return Pow.apply(_float_for(Pow, a, b), b)
    return _binary(Pow, "pow", a, b)


@fast_path("neg")
def neg(a):
    """Return ``-a``."""
    return Neg.apply(a)


def matmul(a, b):
    """Return the matrix product ``a @ b`` with NumPy's matmul rules.

    Both operands must be Tensors of one floating dtype: unlike elementwise
    ops, a product of float32 and float64 is rejected rather than promoted,
    because it usually means data and weights disagree.
    """
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        a, b = as_operand(a, b), as_operand(b, a)
        if not isinstance(a, Tensor) or not isinstance(b, Tensor):
            raise TypeError("matmul: both operands must be tensors or arrays, not scalars")
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(
            f"matmul: both operands need at least one dimension, got shapes "
            f"{tuple(a.shape)} and {tuple(b.shape)}; use * for scalars."
        )
    k_a = a.shape[-1]
    k_b = b.shape[0] if b.ndim == 1 else b.shape[-2]
    if k_a != k_b:
        raise ValueError(
            f"matmul: shapes {tuple(a.shape)} and {tuple(b.shape)} are not "
            f"aligned: the last axis of the first ({k_a}) must equal the "
            f"{'only' if b.ndim == 1 else 'second-to-last'} axis of the "
            f"second ({k_b})."
        )
    if a.dtype != b.dtype:
        raise TypeError(
            f"matmul: dtypes differ ({a.dtype} and {b.dtype}); cast one with "
            ".float() or .double() so both match."
        )
    check_float("matmul", a)
    if a.ndim > 2 and b.ndim > 2:
        check_broadcast("matmul", a.shape[:-2], b.shape[:-2], shapes=True)
    return MatMul.apply(a, b)



