"""Indexing: ``x[index]`` and ``x[index] = value``, basic and advanced.

A repeated index in advanced indexing accumulates its gradient (the scatter
is an add, not an assignment).
"""

import numpy as np

from .._views import mark_view
from ..autograd import Function
from ._unary import ctx_xp

__all__ = ["getitem", "index_put"]


class GetItem(Function):
    @staticmethod
    def forward(ctx, x, index):
        ctx.in_shape, ctx.index = x.shape, index
        return x[index]

    @staticmethod
    def backward(ctx, grad):
        return ctx.xp.index_scatter(grad, ctx.in_shape, ctx.index), None


class IndexScatter(Function):
    """zeros(shape) with ``grad`` added at ``index``: the adjoint of GetItem."""

    @staticmethod
    def forward(ctx, grad, shape, index):
        if ctx is not None:
            ctx.index = index
        xp = ctx_xp(grad)
        out = xp.zeros(shape, dtype=grad.dtype)
        if _is_basic(index):
            out[index] = grad
        elif xp is np:
            np.add.at(out, index, grad)
        else:
            import cupyx

            cupyx.scatter_add(out, index, grad)
        return out

    @staticmethod
    def backward(ctx, grad):
        from .._tensor import Tensor

        if isinstance(grad, Tensor):
            return GetItem.apply(grad, ctx.index), None, None
        return grad[ctx.index], None, None


class IndexPut(Function):
    """``x`` with ``value`` written at ``index``, as a new array."""

    @staticmethod
    def forward(ctx, x, value, index):
        ctx.index = index
        out = x.copy()
        out[index] = value
        return out

    @staticmethod
    def backward(ctx, grad):
        index = ctx.index
        need_x, need_value, _ = ctx.needs_input_grad
        grad_value = grad[index] if need_value else None
        grad_x = None
        if need_x:
            mask = ctx.xp.ones(grad.shape, dtype=grad.dtype)
            mask[index] = 0
            grad_x = grad * mask
        return grad_x, grad_value, None


def _is_basic(index):
    parts = index if isinstance(index, tuple) else (index,)
    return all(
        p is None or p is Ellipsis or isinstance(p, (slice, int, np.integer))
        for p in parts
    )


def normalize_index(index, shape, xp):
    """Unwrap Tensors in ``index`` and turn bool masks into integer arrays."""
    from .._tensor import Tensor

    parts = index if isinstance(index, tuple) else (index,)
    out = []
    for part in parts:
        if isinstance(part, Tensor):
            part = part.data
        elif isinstance(part, list):
            part = xp.asarray(part)
        if hasattr(part, "dtype") and part.dtype.kind == "b":
            out.extend(part.nonzero())
        elif hasattr(part, "dtype") and part.dtype.kind not in "iu":
            raise IndexError(
                f"tensors used as indices must be integer or bool, got dtype "
                f"{part.dtype}"
            )
        else:
            out.append(part)
    return tuple(out) if isinstance(index, tuple) or len(out) != 1 else out[0]


def getitem(x, index):
    """Return ``x[index]`` (slices, ints, None, Ellipsis, int or bool arrays)."""
    xp = ctx_xp(x.data)
    index = normalize_index(index, x.shape, xp)
    shown = index
    if _is_basic(index):
        parts = index if isinstance(index, tuple) else (index,)
        if Ellipsis not in parts:
            # x[2] alone would give a NumPy scalar (a copy); x[2, ...] gives a
            # 0-d view, so a write through it reaches x.
            index = parts + (Ellipsis,)
    try:
        out = GetItem.apply(x, index)
    except IndexError as exc:
        raise IndexError(f"index {shown!r} is invalid for a tensor of shape "
                         f"{tuple(x.shape)}: {exc}") from None
    if _is_basic(index):
        mark_view(out, x, "index", index)
    return out


def index_put(x, index, value):
    """Return a copy of ``x`` with ``value`` written at ``index`` (differentiable)."""
    from ._common import as_operand

    value = as_operand(value, x)
    xp = ctx_xp(x.data)
    index = normalize_index(index, x.shape, xp)
    return IndexPut.apply(x, value, index)
