"""Softmax and log-softmax along one axis, each as its own stable Function."""

from .._ops._common import check_float, normalize_axes
from .._ops._unary import ctx_xp
from ..autograd import Function

__all__ = ["softmax", "log_softmax"]


def _shifted(x, axis):
    # NOTE: subtracting the maximum keeps exp() from overflowing. Softmax is
    # unchanged by the shift, and log-softmax needs no correction for it.
    return x - x.max(axis=axis, keepdims=True)


class Softmax(Function):
    @staticmethod
    def forward(ctx, x, axis):
        exps = ctx_xp(x).exp(_shifted(x, axis))
        out = exps / exps.sum(axis=axis, keepdims=True)
        ctx.save_for_backward(out)
        ctx.axis = axis
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        inner = ctx.xp.sum(grad * out, axis=ctx.axis, keepdims=True)
        return out * (grad - inner), None


class LogSoftmax(Function):
    @staticmethod
    def forward(ctx, x, axis):
        xp = ctx_xp(x)
        shifted = _shifted(x, axis)
        out = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
        ctx.save_for_backward(out)
        ctx.axis = axis
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        xp = ctx.xp
        total = xp.sum(grad, axis=ctx.axis, keepdims=True)
        return grad - xp.exp(out) * total, None


def _apply(function, name, x, dim, axis):
    from .._tensor import Tensor, tensor

    x = x if isinstance(x, Tensor) else tensor(x)
    check_float(name, x)
    dim = _resolve_dim(name, dim, axis)
    if x.ndim == 0:
        # A 0-d tensor is one class: softmax is 1 and log-softmax is 0.
        normalize_axes(name, dim, 0)
        return function.apply(x.reshape(1), 0).reshape(())
    (axis,) = normalize_axes(name, dim, x.ndim)
    return function.apply(x, axis)


def _resolve_dim(name, dim, axis):
    """Return the one axis given as PyTorch's ``dim`` or NumPy's ``axis``."""
    if dim is not None and axis is not None:
        raise TypeError(f"{name}: pass dim= or axis=, not both")
    if dim is None and axis is None:
        return -1
    return dim if dim is not None else axis


def softmax(x, dim=None, *, axis=None):
    """Return exp(x) / sum(exp(x)) along one axis, computed without overflow.

    The axis is given as ``dim`` or ``axis`` (not both) and defaults to the
    last one.

    >>> gf.nn.functional.softmax(gf.tensor([0.0, 0.0]))
    tensor([0.5, 0.5])
    """
    return _apply(Softmax, "softmax", x, dim, axis)


def log_softmax(x, dim=None, *, axis=None):
    """Return log(softmax(x)) as x - max - log(sum(exp(x - max))).

    The axis is given as ``dim`` or ``axis`` (not both) and defaults to the
    last one.
    """
    return _apply(LogSoftmax, "log_softmax", x, dim, axis)
