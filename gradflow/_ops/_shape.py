"""Shape ops: reshape, permute, broadcast, squeeze, concatenation and splitting,
plus dtype casts, copies and device moves.

Ops that return a view of their input (reshape, permute, expand, squeeze)
mark it as one (gradflow._views), so an in-place change through either is
seen by autograd through both.
"""

import math

import numpy as np

from .. import _device
from .._views import mark_view
from ..autograd import Function
from ._common import normalize_axes
from ._unary import ctx_xp

__all__ = [
    "reshape", "permute", "transpose", "swapaxes", "broadcast_to", "expand",
    "squeeze", "unsqueeze", "expand_dims", "flatten", "cat", "concatenate",
    "stack", "split", "chunk", "cast", "clone",
]


class Reshape(Function):
    @staticmethod
    def forward(ctx, x, shape):
        ctx.in_shape = x.shape
        return x.reshape(shape)

    @staticmethod
    def backward(ctx, grad):
        return ctx.xp.reshape(grad, ctx.in_shape), None


class Permute(Function):
    @staticmethod
    def forward(ctx, x, axes):
        ctx.axes = axes
        return x.transpose(axes)

    @staticmethod
    def backward(ctx, grad):
        inverse = tuple(int(i) for i in np.argsort(ctx.axes))
        return ctx.xp.transpose(grad, inverse), None


class BroadcastTo(Function):
    @staticmethod
    def forward(ctx, x, shape):
        return ctx_xp(x).broadcast_to(x, shape)

    @staticmethod
    def backward(ctx, grad):
        # The engine sums the gradient back to the input's shape.
        return grad, None


class Concatenate(Function):
    @staticmethod
    def forward(ctx, axis, *arrays):
        ctx.axis = axis
        ctx.sizes = tuple(a.shape[axis] for a in arrays)
        return ctx_xp(*arrays).concatenate(arrays, axis=axis)

    @staticmethod
    def backward(ctx, grad):
        bounds = np.cumsum(ctx.sizes)[:-1].tolist()
        pieces = _split_at(grad, bounds, ctx.axis)
        return (None, *pieces)


class Stack(Function):
    @staticmethod
    def forward(ctx, axis, *arrays):
        ctx.axis = axis
        ctx.count = len(arrays)
        return ctx_xp(*arrays).stack(arrays, axis=axis)

    @staticmethod
    def backward(ctx, grad):
        axis = ctx.axis
        index = (slice(None),) * axis
        return (None, *(grad[index + (i,)] for i in range(ctx.count)))


class Split(Function):
    @staticmethod
    def forward(ctx, x, bounds, axis):
        ctx.axis = axis
        return tuple(_split_at(x, bounds, axis))

    @staticmethod
    def backward(ctx, *grads):
        return ctx.xp.concatenate(list(grads), axis=ctx.axis), None, None


def _split_at(array, bounds, axis):
    pieces = []
    start = 0
    index = [slice(None)] * array.ndim
    for stop in list(bounds) + [array.shape[axis]]:
        index[axis] = slice(start, stop)
        pieces.append(array[tuple(index)])
        start = stop
    return pieces


class Cast(Function):
    @staticmethod
    def forward(ctx, x, dtype):
        ctx.in_dtype = x.dtype
        return x.astype(dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad.astype(ctx.in_dtype), None


class Clone(Function):
    @staticmethod
    def forward(ctx, x):
        return x.copy()

    @staticmethod
    def backward(ctx, grad):
        return grad


class ToDevice(Function):
    """An explicit move between devices; the gradient moves back."""

    @staticmethod
    def forward(ctx, x, target):
        ctx.source = _device.device_of_array(x)
        return _move(x, target)

    @staticmethod
    def backward(ctx, grad):
        from .._tensor import Tensor

        if isinstance(grad, Tensor):
            return ToDevice.apply(grad, ctx.source), None
        return _move(grad, ctx.source), None


def _move(array, target):
    if target.type == "cpu":
        return array if isinstance(array, np.ndarray) else array.get()
    with target:
        return target.xp.asarray(array)


def _tensor(x):
    from .._tensor import Tensor, tensor

    return x if isinstance(x, Tensor) else tensor(x)


class Fill(Function):
    """A tensor of ``x``'s shape and dtype filled with ``value``; x's gradient is 0."""

    @staticmethod
    def forward(ctx, x, value):
        return ctx_xp(x).full_like(x, value)

    @staticmethod
    def backward(ctx, grad):
        return ctx.xp.zeros_like(grad), None


class CopyFrom(Function):
    """``source`` broadcast to ``x``'s shape and cast to its dtype."""

    @staticmethod
    def forward(ctx, x, source):
        out = ctx_xp(x).empty_like(x)
        out[...] = source
        return out

    @staticmethod
    def backward(ctx, grad):
        # The engine sums the gradient to the source's shape and dtype.
        return None, grad


def _shape_arg(shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return tuple(int(n) for n in shape)


def reshape(x, *shape):
    """Return ``x`` with a new shape of the same size; one axis may be -1."""
    x = _tensor(x)
    shape = _shape_arg(shape)
    known = math.prod(n for n in shape if n != -1)
    valid = shape.count(-1) <= 1 and (
        known == x.data.size if -1 not in shape else known and x.data.size % known == 0
    )
    if not valid and not (-1 in shape and x.data.size == 0):
        raise ValueError(
            f"reshape: cannot reshape a tensor of shape {tuple(x.shape)} "
            f"({x.data.size} elements) into shape {shape}."
        )
    if shape == x.shape:
        return x
    return mark_view(Reshape.apply(x, shape), x, "reshape", shape)


def permute(x, *axes):
    """Return ``x`` with its axes reordered (``axes`` is a permutation)."""
    x = _tensor(x)
    axes = _shape_arg(axes)
    if sorted(a % max(x.ndim, 1) for a in axes) != list(range(x.ndim)):
        raise ValueError(
            f"permute: {axes} is not a permutation of the {x.ndim} axes of a "
            f"tensor of shape {tuple(x.shape)}."
        )
    axes = tuple(a % x.ndim for a in axes)
    if axes == tuple(range(x.ndim)):
        return x
    return mark_view(Permute.apply(x, axes), x, "permute", axes)


def transpose(x, dim0=None, dim1=None, axes=None):
    """Swap two axes (PyTorch's ``transpose(x, 0, 1)``), or permute by ``axes``.

    With no axis given, reverses the axes as NumPy's ``transpose`` does.
    """
    x = _tensor(x)
    if axes is not None:
        return permute(x, axes)
    if dim0 is None and dim1 is None:
        return permute(x, tuple(range(x.ndim - 1, -1, -1)))
    if isinstance(dim0, (tuple, list)):
        return permute(x, dim0)
    return swapaxes(x, dim0, dim1)


def swapaxes(x, axis0, axis1):
    """Return ``x`` with axes ``axis0`` and ``axis1`` exchanged."""
    x = _tensor(x)
    if x.ndim == 0:
        normalize_axes("swapaxes", [axis0], 0)
        return x
    a = normalize_axes("swapaxes", axis0, x.ndim)[0]
    b = normalize_axes("swapaxes", axis1, x.ndim)[0]
    order = list(range(x.ndim))
    order[a], order[b] = order[b], order[a]
    return permute(x, tuple(order))


def broadcast_to(x, shape):
    """Return ``x`` broadcast to ``shape`` (a read-only view)."""
    x = _tensor(x)
    shape = _shape_arg((shape,))
    try:
        np.broadcast_shapes(x.shape, shape)
        valid = np.broadcast_shapes(x.shape, shape) == shape
    except ValueError:
        valid = False
    if not valid:
        raise ValueError(
            f"broadcast_to: a tensor of shape {tuple(x.shape)} cannot be "
            f"broadcast to shape {shape}."
        )
    if shape == x.shape:
        return x
    return mark_view(BroadcastTo.apply(x, shape), x, "broadcast", shape)


def expand(x, *shape):
    """PyTorch's ``expand``: like broadcast_to, where -1 keeps an axis's size."""
    x = _tensor(x)
    shape = list(_shape_arg(shape))
    offset = len(shape) - x.ndim
    for i, n in enumerate(shape):
        if n == -1:
            if i < offset:
                raise ValueError("expand: -1 is not allowed for a new leading axis")
            shape[i] = x.shape[i - offset]
    return broadcast_to(x, tuple(shape))


def squeeze(x, axis=None, *, dim=None):
    """Remove axes of length 1 (all of them, or those in ``axis``).

    An axis that is not of length 1 is left alone, as in PyTorch.
    """
    x = _tensor(x)
    axis = dim if dim is not None else axis
    axes = normalize_axes("squeeze", axis, x.ndim)
    if axes is None:
        axes = tuple(i for i, n in enumerate(x.shape) if n == 1) if x.ndim else ()
    shape = tuple(n for i, n in enumerate(x.shape) if not (i in axes and n == 1))
    return reshape(x, shape)


def unsqueeze(x, axis):
    """Insert an axis of length 1 at position ``axis`` (may be negative)."""
    x = _tensor(x)
    ndim = x.ndim + 1
    if not -ndim <= axis < ndim:
        raise IndexError(
            f"unsqueeze: axis {axis} is out of range for the result's {ndim} "
            f"dimensions (valid: {-ndim} to {ndim - 1})."
        )
    axis %= ndim
    shape = x.shape[:axis] + (1,) + x.shape[axis:]
    return reshape(x, shape)


def expand_dims(x, axis):
    """NumPy's name for ``unsqueeze``."""
    return unsqueeze(x, axis)


def flatten(x, start_dim=0, end_dim=-1):
    """Merge axes ``start_dim`` to ``end_dim`` (inclusive) into one."""
    x = _tensor(x)
    if x.ndim == 0:
        return reshape(x, (1,))
    start, end = (normalize_axes("flatten", [a], x.ndim)[0] for a in (start_dim, end_dim))
    if start > end:
        raise ValueError(f"flatten: start_dim {start_dim} comes after end_dim {end_dim}")
    shape = x.shape[:start] + (math.prod(x.shape[start:end + 1]),) + x.shape[end + 1:]
    return reshape(x, shape)


def _sequence(op, tensors):
    if not isinstance(tensors, (list, tuple)) or not tensors:
        raise ValueError(f"{op}: expected a non-empty list or tuple of tensors")
    return [_tensor(t) for t in tensors]


def cat(tensors, axis=0, *, dim=None):
    """Join tensors along an existing axis; all other axes must match."""
    tensors = _sequence("cat", tensors)
    axis = dim if dim is not None else axis
    first = tensors[0]
    axis = normalize_axes("cat", axis, first.ndim)
    axis = 0 if axis is None else axis[0]
    for i, t in enumerate(tensors):
        if t.ndim != first.ndim or any(
            a != b for j, (a, b) in enumerate(zip(t.shape, first.shape)) if j != axis
        ):
            raise ValueError(
                f"cat: tensor {i} has shape {tuple(t.shape)}, which does not "
                f"match tensor 0's shape {tuple(first.shape)} outside axis {axis}."
            )
    if len({t.dtype for t in tensors}) > 1:
        dtype = np.result_type(*[t.dtype for t in tensors])
        tensors = [t.astype(dtype) for t in tensors]
    return Concatenate.apply(axis, *tensors)


def concatenate(tensors, axis=0):
    """NumPy's name for ``cat``."""
    return cat(tensors, axis)


def stack(tensors, axis=0, *, dim=None):
    """Join tensors of one shape along a new axis."""
    tensors = _sequence("stack", tensors)
    axis = dim if dim is not None else axis
    shapes = {t.shape for t in tensors}
    if len(shapes) > 1:
        raise ValueError(
            f"stack: all tensors must have one shape, got {sorted(shapes)}"
        )
    ndim = tensors[0].ndim + 1
    if not -ndim <= axis < ndim:
        raise IndexError(f"stack: axis {axis} is out of range for {ndim} dimensions")
    return Stack.apply(axis % ndim, *tensors)


def split(x, split_size_or_sections, axis=0, *, dim=None):
    """Split ``x`` along ``axis`` into pieces (PyTorch's semantics).

    An int gives pieces of that size (the last may be smaller); a list gives
    the size of each piece, which must add up to the axis's length.
    """
    x = _tensor(x)
    axis = dim if dim is not None else axis
    axis = normalize_axes("split", axis, x.ndim)[0]
    length = x.shape[axis]
    sizes = split_size_or_sections
    if isinstance(sizes, int):
        if sizes <= 0:
            raise ValueError(f"split: the piece size must be positive, got {sizes}")
        sizes = [sizes] * (length // sizes) + ([length % sizes] if length % sizes else [])
    sizes = list(sizes)
    if sum(sizes) != length or any(s < 0 for s in sizes):
        raise ValueError(
            f"split: sizes {sizes} do not add up to the length {length} of "
            f"axis {axis} (shape {tuple(x.shape)})."
        )
    bounds = np.cumsum(sizes)[:-1].tolist()
    pieces = Split.apply(x, bounds, axis)
    return pieces if isinstance(pieces, tuple) else (pieces,)


def chunk(x, chunks, axis=0, *, dim=None):
    """Split ``x`` into ``chunks`` pieces of near-equal size (PyTorch's rule)."""
    x = _tensor(x)
    axis = dim if dim is not None else axis
    axis = normalize_axes("chunk", axis, x.ndim)[0]
    if chunks <= 0:
        raise ValueError(f"chunk: chunks must be positive, got {chunks}")
    size = -(-x.shape[axis] // chunks)
    return split(x, max(size, 1), axis)


def cast(x, dtype):
    """Return ``x`` converted to ``dtype``; float-to-float casts carry the gradient."""
    x = _tensor(x)
    dtype = np.dtype(dtype)
    if dtype == x.dtype:
        return x
    if dtype.kind != "f":
        from .._tensor import make_tensor

        return make_tensor(x.data.astype(dtype))
    return Cast.apply(x, dtype)


def clone(x):
    """Return a copy of ``x`` that stays connected to the graph."""
    return Clone.apply(_tensor(x))
