"""Input checks and conversions shared by the op families."""

import numbers

import gradflow_kernels
import numpy as np

from .._tensor import Tensor, _to_array, make_tensor

__all__ = ["as_operand", "check_broadcast", "check_float", "matmul_arrays", "normalize_axes"]


def matmul_arrays(a, b):
    """Return ``a @ b`` of two NumPy or CuPy arrays.

    Large float products of matrices or batches of matrices on the CPU go
    to MKL when it is installed (see ``gradflow_kernels.matmul``). Every
    other product is the array library's.
    """
    if a.ndim >= 2 and b.ndim >= 2:
        out = gradflow_kernels.matmul(a, b)
        if out is not None:
            return out
    return a @ b


def as_operand(value, other):
    """Return ``value`` as an operand of a binary op whose other side is ``other``.

    Tensors pass through and Python numbers stay numbers (so they take the
    tensor's dtype); arrays and lists become constant Tensors on the other
    operand's device when it is a Tensor.
    """
    if isinstance(value, Tensor):
        return value
    if isinstance(value, numbers.Number):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, np.generic):
            return value
        return value.item()
    if isinstance(value, (list, tuple)) or hasattr(value, "__array_interface__") \
            or hasattr(value, "__cuda_array_interface__"):
        device = other.device if isinstance(other, Tensor) else None
        return make_tensor(_to_array(value, None, device, copy=False))
    raise TypeError(
        f"unsupported operand of type {type(value).__name__}; expected a "
        "Tensor, an array or a number"
    )


def check_broadcast(op, a, b, shapes=False):
    """Raise a ValueError naming ``op`` when ``a`` and ``b`` do not broadcast."""
    shape_a = a if shapes else getattr(a, "shape", ())
    shape_b = b if shapes else getattr(b, "shape", ())
    if shape_a == shape_b:
        return
    # Aligned from the right, each pair of sizes must be equal or contain a 1
    # (np.broadcast_shapes' rule, without its cost of building arrays).
    if not all(m == n or m == 1 or n == 1
               for m, n in zip(reversed(shape_a), reversed(shape_b))):
        raise ValueError(
            f"{op}: shapes {tuple(shape_a)} and {tuple(shape_b)} cannot be "
            "broadcast together (each axis, aligned from the right, must be "
            "equal or 1). Reshape or unsqueeze one operand."
        )


def check_float(op, t):
    """Raise a TypeError naming ``op`` unless ``t`` has a floating dtype."""
    if t.data.dtype.kind != "f":
        raise TypeError(
            f"{op}: expected a floating-point tensor, got dtype {t.data.dtype} "
            f"(shape {tuple(t.shape)}). Convert it with .float() or .double()."
        )


def normalize_axes(op, axis, ndim):
    """Return ``axis`` (None, int or sequence) as a sorted tuple of axes, or None."""
    if axis is None:
        return None
    if ndim == 0:
        # A 0-d tensor accepts axis 0 or -1, as in PyTorch, and reduces nothing.
        for a in axis if isinstance(axis, (list, tuple)) else (axis,):
            _one_axis(op, a, 0)
        return None
    if isinstance(axis, (list, tuple)):
        axes = tuple(_one_axis(op, a, ndim) for a in axis)
        if len(set(axes)) != len(axes):
            raise ValueError(f"{op}: axis {tuple(axis)} repeats an axis")
        return tuple(sorted(axes))
    return (_one_axis(op, axis, ndim),)


def _one_axis(op, axis, ndim):
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{op}: axis must be an int or a tuple of ints, got {axis!r}")
    bound = max(ndim, 1)
    if not -bound <= axis < bound:
        raise IndexError(
            f"{op}: axis {axis} is out of range for a tensor with {ndim} "
            f"dimension(s) (valid: {-bound} to {bound - 1})."
        )
    return int(axis) % bound
