"""Operators and methods of Tensor, each a thin call into gradflow._ops.

In-place operators (``+=``, ``t[i] = v``, ``add_``, ...) follow PyTorch:

* on a tensor outside any graph (no grad needed, or under ``no_grad``) they
  change the array's memory and bump the version counter;
* on a tensor inside a graph they record the op out of place on a copy of
  the old value, then write the result into the tensor's own memory, so its
  views see it. The counter is bumped, so a record that saved the old value
  raises instead of using it. Through a view, the result is written back
  into the base as a recorded op too (gradflow._views);
* on a leaf that requires grad they raise, unless grad recording is off.
"""

import numpy as np

from . import _ops, _views
from . import _fastpath
from ._fastpath import fast_op
from ._ops import _shape as _shape_ops
from ._ops import _common, _index
from ._tensor import Tensor, make_tensor
from .autograd import _grad_mode
from .errors import GraphError


def _reflected(op):
    def reflected(self, other):
        return op(other, self)

    if op.__name__ in ("add", "sub", "mul", "div"):
        return fast_op(op.__name__, reflected, reflected=True)
    return reflected


_BINARY = {
    "__add__": _ops.add, "__sub__": _ops.sub, "__mul__": _ops.mul,
    "__truediv__": _ops.div, "__pow__": _ops.pow, "__matmul__": _ops.matmul,
}
for _name, _op in _BINARY.items():
    setattr(Tensor, _name, _op)
    setattr(Tensor, "__r" + _name[2:], _reflected(_op))

Tensor.__neg__ = _ops.neg
Tensor.__pos__ = lambda self: self
Tensor.__abs__ = _ops.abs
Tensor.__getitem__ = _ops.getitem


def _compare(name):
    numpy_op = getattr(np, name)

    def compare(self, other):
        other = _common.as_operand(other, self)
        other_data = other.data if isinstance(other, Tensor) else other
        _common.check_broadcast(name, self, other if isinstance(other, Tensor) else 0)
        return make_tensor(_array_op(self, numpy_op)(self.data, other_data))

    return compare


def _array_op(t, numpy_op):
    if isinstance(t.data, np.ndarray):
        return numpy_op
    from ._device import cupy_module

    return getattr(cupy_module(), numpy_op.__name__)


for _name, _numpy in (("__lt__", "less"), ("__le__", "less_equal"),
                      ("__gt__", "greater"), ("__ge__", "greater_equal"),
                      ("__eq__", "equal"), ("__ne__", "not_equal")):
    setattr(Tensor, _name, _compare(_numpy))


def _logical(numpy_name):
    numpy_op = getattr(np, numpy_name)

    def logical(self, other):
        other = _common.as_operand(other, self)
        other_data = other.data if isinstance(other, Tensor) else other
        return make_tensor(_array_op(self, numpy_op)(self.data, other_data))

    return logical


def _floor_divide(a, b):
    a_data = a.data if isinstance(a, Tensor) else a
    b_data = b.data if isinstance(b, Tensor) else b
    t = a if isinstance(a, Tensor) else b
    return make_tensor(_array_op(t, np.floor_divide)(a_data, b_data))


# Floor division carries no gradient (PyTorch defines none for it either).
Tensor.__floordiv__ = lambda self, other: _floor_divide(self, _common.as_operand(other, self))
Tensor.__rfloordiv__ = lambda self, other: _floor_divide(_common.as_operand(other, self), self)

Tensor.__and__ = Tensor.__rand__ = _logical("logical_and")
Tensor.__or__ = Tensor.__ror__ = _logical("logical_or")
Tensor.__xor__ = Tensor.__rxor__ = _logical("logical_xor")
Tensor.__invert__ = lambda self: make_tensor(_array_op(self, np.logical_not)(self.data))
Tensor.__hash__ = lambda self: id(self)


# -- in-place ops -------------------------------------------------------------

def _check_inplace(t, op):
    if t.grad_fn is None and t._requires_grad and _grad_mode.is_grad_enabled():
        raise GraphError(
            f"{op}: a leaf tensor that requires grad (shape {tuple(t.shape)}) "
            "cannot be changed in place while operations are recorded, because "
            "its gradient would no longer match its value. Wrap the update in "
            "`with gf.no_grad():`, or use an out-of-place op."
        )


def _records(t, other=None):
    if not _grad_mode.is_grad_enabled():
        return False
    other_grad = isinstance(other, Tensor) and other._requires_grad
    return t._requires_grad or other_grad


def _record_inplace(t, op, *args, name="in-place op"):
    """Record ``op(t, *args)`` out of place and store the result in ``t``."""
    if t._view is not None:
        _views.refresh(t)
    # The op reads a copy of t's old value, because t's memory is overwritten
    # below, and the copy carries its own version counter: the bump in
    # _assign must reach records that saved t earlier, but not this op.
    alias = make_tensor(t.data.copy(), t.grad_fn, t._out_index)
    alias._requires_grad = t._requires_grad
    _assign(t, op(alias, *args), name)
    return t


def _assign(t, value, op):
    """Write the recorded result ``value`` into ``t`` (and through views into bases)."""
    # t takes a later record as its grad_fn, and that record may have saved
    # t itself: a reference cycle, which the collector must see.
    _fastpath.track_records()
    value = _fit_result(t, value, op)
    if t._view is not None:
        base = t._view[0]
        _check_inplace(base, op)
        _assign(base, _views.write_back(t, value, op), op)
        _views.refresh(t)
        return
    try:
        t.data[...] = value.data
    except ValueError as exc:
        raise ValueError(f"{op}: the tensor's memory cannot be written ({exc}); "
                         "clone it first (t = t.clone()).") from None
    t.grad_fn = value.grad_fn
    t._out_index = value._out_index
    t._requires_grad = value._requires_grad
    t._version[0] += 1


def _fit_result(t, value, op):
    if value.shape != t.shape:
        raise ValueError(
            f"{op}: the result's shape {tuple(value.shape)} differs from the "
            f"tensor's shape {tuple(t.shape)}; the other operand may broadcast "
            "to the tensor but not enlarge it."
        )
    if value.dtype != t.dtype:
        _check_cast(op, value.dtype, t.dtype)
        value = value.astype(t.dtype)
    return value


def _check_cast(op, result_dtype, dtype):
    if not np.can_cast(result_dtype, dtype, casting="same_kind"):
        raise TypeError(
            f"{op}: the result has dtype {result_dtype}, which cannot be stored "
            f"in place in a tensor of dtype {dtype}. Use an out-of-place op "
            f"(t = t + x) or convert the tensor first (t = t.float())."
        )


def _inplace(op, name, numpy_name):
    def method(self, other):
        _check_inplace(self, name)
        other = _common.as_operand(other, self)
        if _records(self, other):
            return _record_inplace(self, op, other, name=name)
        other_data = other.data if isinstance(other, Tensor) else other
        _check_cast(name, np.result_type(self.data, other_data), self.data.dtype)
        _common.check_broadcast(name, self, other if isinstance(other, Tensor) else 0)
        result_shape = np.broadcast_shapes(self.shape, np.shape(other_data))
        if result_shape != self.shape:
            raise ValueError(
                f"{name}: an operand of shape {np.shape(other_data)} would "
                f"enlarge the tensor of shape {tuple(self.shape)} in place."
            )
        numpy_op = _array_op(self, getattr(np, numpy_name))
        numpy_op(self.data, other_data, out=self.data, casting="same_kind")
        self._version[0] += 1
        return self

    method.__name__ = name
    return method


for _names, _op, _numpy in (
    (("__iadd__", "add_"), _ops.add, "add"),
    (("__isub__", "sub_"), _ops.sub, "subtract"),
    (("__imul__", "mul_"), _ops.mul, "multiply"),
    (("__itruediv__", "div_"), _ops.div, "true_divide"),
):
    for _name in _names:
        setattr(Tensor, _name, _inplace(_op, _name, _numpy))


def _zero_(self):
    """Fill this tensor with zeros in place."""
    _check_inplace(self, "zero_")
    if _records(self):
        return _record_inplace(self, _shape_ops.Fill.apply, 0, name="zero_")
    self.data[...] = 0
    self._version[0] += 1
    return self


def _fill_(self, value):
    """Fill this tensor with ``value`` (a number or a 0-d tensor) in place."""
    if isinstance(value, Tensor):
        if value.ndim != 0:
            raise ValueError(
                f"fill_: the value must be a number or a 0-d tensor, got a "
                f"tensor of shape {tuple(value.shape)}; use copy_() to copy "
                "a tensor of values."
            )
        return self.copy_(value)
    _check_inplace(self, "fill_")
    if _records(self):
        return _record_inplace(self, _shape_ops.Fill.apply, value, name="fill_")
    self.data[...] = value
    self._version[0] += 1
    return self


def _copy_(self, source):
    """Copy ``source``'s values into this tensor in place (same device)."""
    _check_inplace(self, "copy_")
    source = _common.as_operand(source, self)
    if _records(self, source):
        return _record_inplace(self, _shape_ops.CopyFrom.apply, source, name="copy_")
    source_data = source.data if isinstance(source, Tensor) else source
    if isinstance(source, Tensor) and source.device != self.device:
        raise RuntimeError(
            f"copy_: source is on {source.device} but the tensor is on "
            f"{self.device}; move it with .to() first."
        )
    self.data[...] = source_data
    self._version[0] += 1
    return self


def _setitem(self, index, value):
    _check_inplace(self, "__setitem__")
    value = _common.as_operand(value, self)
    if _records(self, value):
        _record_inplace(self, _ops.index_put, index, value, name="__setitem__")
        return
    xp = np if isinstance(self.data, np.ndarray) else __import__("cupy")
    index = _index.normalize_index(index, self.shape, xp)
    self.data[index] = value.data if isinstance(value, Tensor) else value
    self._version[0] += 1


Tensor.zero_ = _zero_
Tensor.fill_ = _fill_
Tensor.copy_ = _copy_
Tensor.__setitem__ = _setitem


# -- method forms of the ops ----------------------------------------------------

for _name in (
    "exp", "log", "log1p", "sqrt", "square", "sin", "cos", "tanh", "sigmoid",
    "relu", "abs", "sign", "erf", "sum", "mean", "var", "std", "max", "min",
    "amax", "amin", "argmax", "argmin", "logsumexp", "norm", "reshape",
    "permute", "transpose", "swapaxes", "expand", "broadcast_to", "squeeze",
    "unsqueeze", "flatten", "split", "chunk", "clamp", "maximum", "minimum",
    "matmul", "pow",
):
    setattr(Tensor, _name, getattr(_ops, _name))

Tensor.view = _ops.reshape
Tensor.clip = _ops.clamp
Tensor.add = _ops.add
Tensor.sub = _ops.sub
Tensor.mul = _ops.mul
Tensor.div = _ops.div
Tensor.neg = _ops.neg
Tensor.gelu = _ops.gelu
Tensor.silu = _ops.silu
Tensor.softplus = _ops.softplus
Tensor.leaky_relu = _ops.leaky_relu


def _any(self, axis=None, keepdims=False):
    return make_tensor(self.data.any(axis=axis, keepdims=keepdims))


def _all(self, axis=None, keepdims=False):
    return make_tensor(self.data.all(axis=axis, keepdims=keepdims))


Tensor.any = _any
Tensor.all = _all
