"""Views: tensors that share their base's memory, and in-place ops through them.

A view op (reshape, permute, basic indexing, broadcast_to) marks its output
with ``_view = (base, kind, arg, version)``: the base Tensor, how the view
was taken, and the base's version counter at that moment (view and base
share one counter). Two rules keep autograd exact, as PyTorch's views do:

* An in-place op on a view that autograd records writes the new value back
  into the base as a recorded op (an index_put, or the inverse reshape or
  permutation), so the base's graph sees the change.
* A view whose counter moved since it was taken was changed through its base
  or a sibling view. The next recorded op that reads it first takes the
  view again from the base (``refresh``), so its graph is current.
"""

from . import _fastpath
from .errors import GraphError

__all__ = ["mark_view", "refresh", "write_back"]


def _owner(array):
    # NumPy and CuPy point a view's .base at the array that owns the memory.
    return array if array.base is None else array.base


def mark_view(out, base, kind, arg):
    """Mark ``out`` as a view of ``base`` when its array shares base's memory.

    A reshape that had to copy returns an array with a .base of its own (the
    copy), so the owner of the memory is compared, not just "is a view".
    """
    if out.data.base is not None and _owner(out.data) is _owner(base.data):
        out._version = base._version
        out._view = (base, kind, arg, base._version[0])
    return out


def _derive(base, kind, arg):
    from . import _ops

    if kind == "reshape":
        return _ops.reshape(base, arg)
    if kind == "permute":
        return _ops.permute(base, arg)
    if kind == "index":
        return _ops.getitem(base, arg)
    return _ops.broadcast_to(base, arg)


def refresh(t):
    """Take the view ``t`` again from its base, if the base changed since."""
    base, kind, arg, version = t._view
    if version == t._version[0]:
        return
    if base._view is not None:
        refresh(base)
    fresh = _derive(base, kind, arg)
    # t takes a later record as its grad_fn, which can close a cycle.
    _fastpath.track_records()
    t.data = fresh.data
    t.grad_fn = fresh.grad_fn
    t._out_index = fresh._out_index
    t._requires_grad = fresh._requires_grad
    t._view = (base, kind, arg, t._version[0])


def write_back(t, value, op):
    """Return the base of view ``t`` with ``value`` written where ``t`` looks.

    The result is a recorded, out-of-place op on the base's current value.
    """
    from . import _ops

    base, kind, arg, _ = t._view
    if kind == "broadcast":
        raise GraphError(
            f"{op}: this tensor is a broadcast view (several elements share "
            "one memory location), so it cannot be changed in place. Clone it "
            "first (t = t.clone())."
        )
    if kind == "reshape":
        return _ops.reshape(value, base.shape)
    if kind == "permute":
        inverse = [0] * len(arg)
        for position, axis in enumerate(arg):
            inverse[axis] = position
        return _ops.permute(value, tuple(inverse))
    return _ops.index_put(base, arg, value)
