"""Reductions: sum, mean, var, std, max/min, logsumexp and norm.

Each takes ``axis`` (None, an int or a tuple) and ``keepdims``; PyTorch's
``dim`` and ``keepdim`` are accepted as aliases.
"""

import collections
import math

import numpy as np

from ..autograd import Function
from ._common import check_float, normalize_axes
from ._unary import ctx_xp

__all__ = [
    "sum", "mean", "var", "std", "max", "min", "amax", "amin", "argmax",
    "argmin", "logsumexp", "norm",
]

MinMax = collections.namedtuple("MinMax", ["values", "indices"])


def _keepdims_shape(shape, axes):
    if axes is None:
        return (1,) * len(shape)
    return tuple(1 if i in axes else n for i, n in enumerate(shape))


def _expand_grad(xp, grad, shape, axes, keepdims):
    """Broadcast a reduced gradient back over the reduced axes."""
    if not keepdims:
        grad = xp.reshape(grad, _keepdims_shape(shape, axes))
    return xp.broadcast_to(grad, shape)


def _count(shape, axes):
    if axes is None:
        return math.prod(shape)
    return math.prod(shape[a] for a in axes)


def _sum(x, axes, keepdims):
    # float16 sums accumulate in float32 (as PyTorch's do), because a half
    # float overflows past 65504; the caller casts the result back.
    if x.dtype == np.float16:
        return x.sum(axis=axes, keepdims=keepdims, dtype=np.float32)
    return x.sum(axis=axes, keepdims=keepdims)





class Sum(Function):
    @staticmethod
    def forward(ctx, x, axes, keepdims):
        ctx.in_shape, ctx.axes, ctx.keepdims = x.shape, axes, keepdims
        with np.errstate(over="ignore"):  # a float16 total past 65504 is inf
            if x.dtype.kind in "iub":
                return x.sum(axis=axes, keepdims=keepdims, dtype=np.int64)
            return _sum(x, axes, keepdims).astype(x.dtype, copy=False)

    @staticmethod
    def backward(ctx, grad):
        axes, keepdims = ctx.axes, ctx.keepdims
        return _expand_grad(ctx.xp, grad, ctx.in_shape, axes, keepdims), None, None


class Mean(Function):
    @staticmethod
    def forward(ctx, x, axes, keepdims):
        ctx.in_shape, ctx.axes, ctx.keepdims = x.shape, axes, keepdims
        count = _count(x.shape, axes)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = _sum(x, axes, keepdims) / (count or float("nan"))
        return out.astype(x.dtype, copy=False)

    @staticmethod
    def backward(ctx, grad):
        axes, keepdims = ctx.axes, ctx.keepdims
        count = _count(ctx.in_shape, axes)
        grad = _expand_grad(ctx.xp, grad, ctx.in_shape, axes, keepdims)
        return grad / count if count else grad, None, None


def _variance(x, axes, keepdims, correction):
    """Return the variance of the array ``x``; NaN where N - correction <= 0."""
    work = x.astype(np.float32) if x.dtype == np.float16 else x
    centered = work - work.mean(axis=axes, keepdims=True)
    dof = _count(x.shape, axes) - correction
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (centered * centered).sum(axis=axes, keepdims=keepdims)
        out = out / dof if dof > 0 else out * np.nan
    return out.astype(x.dtype, copy=False)


def _variance_grad(xp, x, grad, axes, keepdims, correction):
    dof = _count(x.shape, axes) - correction
    # NOTE: with no degrees of freedom left the variance is NaN, and so is its
    # gradient, as in PyTorch.
    factor = 2 / dof if dof > 0 else float("nan")
    centered = x - xp.mean(x, axis=axes, keepdims=True)
    return _expand_grad(xp, grad, x.shape, axes, keepdims) * centered * factor


class Var(Function):
    @staticmethod
    def forward(ctx, x, axes, keepdims, correction):
        ctx.axes, ctx.keepdims, ctx.correction = axes, keepdims, correction
        ctx.save_for_backward(x)
        return _variance(x, axes, keepdims, correction)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        grad_x = _variance_grad(ctx.xp, x, grad, ctx.axes, ctx.keepdims, ctx.correction)
        return grad_x, None, None, None


class Std(Function):
    @staticmethod
    def forward(ctx, x, axes, keepdims, correction):
        ctx.axes, ctx.keepdims, ctx.correction = axes, keepdims, correction
        out = ctx_xp(x).sqrt(_variance(x, axes, keepdims, correction))
        ctx.save_for_backward(x, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, out = ctx.saved_tensors
        xp = ctx.xp
        # NOTE: d std = d var / (2 std). Where std is 0 (a constant input) the
        # gradient is 0, PyTorch's choice, instead of 0 / 0.
        grad_var = xp.where(out == 0, 0, grad / (2 * xp.where(out == 0, 1, out)))
        grad_x = _variance_grad(xp, x, grad_var, ctx.axes, ctx.keepdims, ctx.correction)
        return grad_x, None, None, None


class MaxMin(Function):
    """The max (or min) over axes; ties share the gradient evenly."""

    @staticmethod
    def forward(ctx, x, axes, keepdims, largest):
        ctx.axes, ctx.keepdims = axes, keepdims
        out = x.max(axis=axes, keepdims=True) if largest else x.min(axis=axes, keepdims=True)
        ctx.save_for_backward(x, out)
        return out if keepdims else out.reshape(
            tuple(n for i, n in enumerate(x.shape) if axes is not None and i not in axes)
        )

    @staticmethod
    def backward(ctx, grad):
        x, out = ctx.saved_tensors
        axes, keepdims = ctx.axes, ctx.keepdims
        xp = ctx.xp
        hits = x == out
        ties = xp.sum(hits.astype(x.dtype), axis=axes, keepdims=True)
        grad = _expand_grad(xp, grad, x.shape, axes, keepdims)
        return xp.where(hits, grad, 0) / ties, None, None, None


class TakeAlong(Function):
    """Values at ``indices`` along one axis (the gradient goes to those places only)."""

    @staticmethod
    def forward(ctx, x, indices, axis):
        ctx.in_shape, ctx.indices, ctx.axis = x.shape, indices, axis
        return ctx_xp(x).take_along_axis(x, indices, axis=axis)

    @staticmethod
    def backward(ctx, grad):
        xp = ctx.xp
        index = _along_axis_index(ctx.indices, ctx.axis)
        return xp.index_scatter(grad, ctx.in_shape, index), None, None


def _along_axis_index(indices, axis):
    array_xp = ctx_xp(indices)
    grids = array_xp.ogrid[tuple(slice(0, n) for n in indices.shape)]
    grids = list(np.broadcast_arrays(*grids)) if array_xp is np else list(grids)
    grids[axis] = indices
    return tuple(grids)


class LogSumExp(Function):
    @staticmethod
    def forward(ctx, x, axes, keepdims):
        xp = ctx_xp(x)
        ctx.axes, ctx.keepdims = axes, keepdims
        shift = x.max(axis=axes, keepdims=True)
        shift = xp.where(xp.isfinite(shift), shift, 0)
        # An all -inf slice sums to 0 and its log is -inf, with no warning.
        with np.errstate(divide="ignore"):
            out = xp.log(xp.exp(x - shift).sum(axis=axes, keepdims=True)) + shift
        out = out if keepdims else xp.squeeze(out, axis=axes)
        ctx.save_for_backward(x, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, out = ctx.saved_tensors
        axes, keepdims = ctx.axes, ctx.keepdims
        xp = ctx.xp
        grad = _expand_grad(xp, grad, x.shape, axes, keepdims)
        out = xp.reshape(out, _keepdims_shape(x.shape, axes))
        # A row of only -inf gives -inf - -inf = nan, PyTorch's value there too.
        with np.errstate(invalid="ignore"):
            return grad * xp.exp(x - out), None, None


class Norm(Function):
    """The vector p-norm over ``axes`` (p = 2 over all elements by default)."""

    @staticmethod
    def forward(ctx, x, p, axes, keepdims):
        xp = ctx_xp(x)
        ctx.p, ctx.axes, ctx.keepdims = p, axes, keepdims
        magnitude = xp.abs(x)
        if p == math.inf:
            out = magnitude.max(axis=axes, keepdims=True)
        elif p == 1:
            out = magnitude.sum(axis=axes, keepdims=True)
        elif p == 2:
            out = xp.sqrt((x * x).sum(axis=axes, keepdims=True))
        else:
            out = (magnitude**p).sum(axis=axes, keepdims=True) ** (1.0 / p)
        out = out if keepdims else xp.squeeze(out, axis=axes)
        ctx.save_for_backward(x, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, out = ctx.saved_tensors
        p, axes, keepdims = ctx.p, ctx.axes, ctx.keepdims
        xp = ctx.xp
        grad = _expand_grad(xp, grad, x.shape, axes, keepdims)
        out = xp.reshape(out, _keepdims_shape(x.shape, axes))
        if p == 1:
            return grad * xp.sign(x), None, None, None
        if p == math.inf:
            magnitude = xp.abs(x)
            hits = magnitude == out
            ties = xp.sum(hits.astype(x.dtype), axis=axes, keepdims=True)
            return xp.where(hits, grad * xp.sign(x), 0) / ties, None, None, None
        # NOTE: the gradient at the zero vector is 0 (PyTorch's choice), so the
        # norm is divided only where it is nonzero.
        safe = xp.where(out == 0, 1, out)
        if p == 2:
            scale = x / safe
        else:
            scale = x * xp.abs(x) ** (p - 2) / safe ** (p - 1)
        return xp.where(out == 0, 0, grad * scale), None, None, None


def _reduce_args(op, x, axis, keepdims, dim, keepdim):
    from .._tensor import Tensor, tensor

    if not isinstance(x, Tensor):
        x = tensor(x)
    if dim is not None:
        if axis is not None:
            raise TypeError(f"{op}: pass axis= or dim=, not both")
        axis = dim
    keepdims = bool(keepdims or keepdim)
    return x, normalize_axes(op, axis, x.ndim), keepdims


def sum(x, axis=None, keepdims=False, *, dim=None, keepdim=False):
    """Return the sum over ``axis`` (all axes when None)."""
    x, axes, keepdims = _reduce_args("sum", x, axis, keepdims, dim, keepdim)
    if x.dtype.kind == "b":
        x = x.astype(np.int64)
    return Sum.apply(x, axes, keepdims)


def mean(x, axis=None, keepdims=False, *, dim=None, keepdim=False):
    """Return the arithmetic mean over ``axis``."""
    x, axes, keepdims = _reduce_args("mean", x, axis, keepdims, dim, keepdim)
    check_float("mean", x)
    return Mean.apply(x, axes, keepdims)


def _correction(op, correction, unbiased, ddof):
    given = [v for v in (correction, unbiased, ddof) if v is not None]
    if len(given) > 1:
        raise TypeError(f"{op}: pass only one of correction=, unbiased= and ddof=")
    if unbiased is not None:
        return 1 if unbiased else 0
    if ddof is not None:
        return ddof
    return 1 if correction is None else correction


def var(x, axis=None, keepdims=False, *, correction=None, unbiased=None, ddof=None,
        dim=None, keepdim=False):
    """Return the variance over ``axis``.

    The default divides by N - 1 (``correction=1``), as PyTorch does; NumPy's
    ``ddof=0`` (or ``unbiased=False``) divides by N.
    """
    x, axes, keepdims = _reduce_args("var", x, axis, keepdims, dim, keepdim)
    check_float("var", x)
    return Var.apply(x, axes, keepdims, _correction("var", correction, unbiased, ddof))


def std(x, axis=None, keepdims=False, *, correction=None, unbiased=None, ddof=None,
        dim=None, keepdim=False):
    """Return the standard deviation over ``axis`` (N - 1 divisor by default).

    The gradient is 0 where the standard deviation is 0, as in PyTorch.
    """
    x, axes, keepdims = _reduce_args("std", x, axis, keepdims, dim, keepdim)
    check_float("std", x)
    return Std.apply(x, axes, keepdims, _correction("std", correction, unbiased, ddof))


def _max_min(op, largest, x, axis, keepdims, dim, keepdim):
    # One int axis (positional, axis= or dim=) gives (values, indices), as
    # PyTorch's x.max(1) does, so `values, indices = x.max(1)` unpacks right.
    single = axis if dim is None else dim
    torch_style = isinstance(single, (int, np.integer)) and not isinstance(single, bool)
    x, axes, keepdims = _reduce_args(op, x, axis, keepdims, dim, keepdim)
    if x.data.size == 0:
        raise ValueError(f"{op}: the tensor of shape {tuple(x.shape)} has no elements")
    if not torch_style:
        return MaxMin.apply(x, axes, keepdims, largest)
    # PyTorch's x.max(dim=d) returns (values, indices) and sends the gradient
    # to the index it reports, not to every tie.
    if axes is None or len(axes) != 1:
        raise TypeError(f"{op} with one int axis takes a single axis")
    axis_index = axes[0] if x.ndim else 0
    picker = x.data.argmax if largest else x.data.argmin
    indices = picker(axis=axis_index, keepdims=True) if x.ndim else x.data.reshape(()) * 0
    if not x.ndim:
        return MinMax(MaxMin.apply(x, None, keepdims, largest), _const(indices))
    values = TakeAlong.apply(x, indices, axis_index)
    if not keepdims:
        from ._shape import squeeze

        values = squeeze(values, axis_index)
        indices = indices.squeeze(axis_index)
    return MinMax(values, _const(indices))


def _const(array):
    from .._tensor import make_tensor

    return make_tensor(array)


def max(x, axis=None, keepdims=False, *, dim=None, keepdim=False):
    """Return the maximum over ``axis``.

    Over all elements (``axis=None``) or a tuple of axes, returns the values,
    and ties share the gradient evenly. Over one int axis (``x.max(1)``,
    ``axis=1`` or ``dim=1``), returns ``(values, indices)`` as PyTorch does,
    and the gradient goes to the reported index. ``amax`` always returns
    values only.
    """
    return _max_min("max", True, x, axis, keepdims, dim, keepdim)


def min(x, axis=None, keepdims=False, *, dim=None, keepdim=False):
    """Return the minimum over ``axis``; see ``max`` for ``dim=``."""
    return _max_min("min", False, x, axis, keepdims, dim, keepdim)


def amax(x, axis=None, keepdims=False, *, dim=None, keepdim=False):
    """Return the maximum values over ``axis`` (never indices)."""
    x, axes, keepdims = _reduce_args("amax", x, axis, keepdims, dim, keepdim)
    return MaxMin.apply(x, axes, keepdims, True)


def amin(x, axis=None, keepdims=False, *, dim=None, keepdim=False):
    """Return the minimum values over ``axis`` (never indices)."""
    x, axes, keepdims = _reduce_args("amin", x, axis, keepdims, dim, keepdim)
    return MaxMin.apply(x, axes, keepdims, False)


def _arg(op, largest, x, axis, keepdims, dim, keepdim):
    x, axes, keepdims = _reduce_args(op, x, axis, keepdims, dim, keepdim)
    if axes is not None and len(axes) != 1:
        raise TypeError(f"{op} takes a single axis or None")
    data = x.data
    if axes is None:
        result = (data.argmax() if largest else data.argmin())
        result = result.reshape((1,) * x.ndim) if keepdims else result
    else:
        picker = data.argmax if largest else data.argmin
        result = picker(axis=axes[0], keepdims=keepdims)
    return _const(result)


def argmax(x, axis=None, keepdims=False, *, dim=None, keepdim=False):
    """Return the indices of the maxima over one axis (or of the flattened tensor)."""
    return _arg("argmax", True, x, axis, keepdims, dim, keepdim)


def argmin(x, axis=None, keepdims=False, *, dim=None, keepdim=False):
    """Return the indices of the minima over one axis (or of the flattened tensor)."""
    return _arg("argmin", False, x, axis, keepdims, dim, keepdim)


def logsumexp(x, axis=None, keepdims=False, *, dim=None, keepdim=False):
    """Return log(sum(exp(x))) over ``axis``, computed without overflow."""
    x, axes, keepdims = _reduce_args("logsumexp", x, axis, keepdims, dim, keepdim)
    check_float("logsumexp", x)
    return LogSumExp.apply(x, axes, keepdims)


def norm(x, p=2, axis=None, keepdims=False, *, ord=None, dim=None, keepdim=False):
    """Return the vector p-norm over ``axis`` (all elements by default).

    ``p`` (or NumPy's ``ord``) may be any positive number or ``math.inf``;
    "fro" means 2. The gradient at the zero vector is 0.
    """
    if ord is not None:
        p = ord
    if p == "fro":
        p = 2
    if not isinstance(p, (int, float)) or p <= 0:
        raise ValueError(f"norm: p must be a positive number or inf, got {p!r}")
    x, axes, keepdims = _reduce_args("norm", x, axis, keepdims, dim, keepdim)
    check_float("norm", x)
    return Norm.apply(x, float(p), axes, keepdims)
