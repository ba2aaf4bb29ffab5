"""Custom operations: ``Function`` and the ``Context`` record it leaves on the tape.

Every built-in op is a ``Function`` too, so this file is the whole contract
between an op and the backward engine:

* ``forward(ctx, *args, **kwargs)`` receives the arrays (NumPy or CuPy) of
  the Tensor arguments and every other argument unchanged, and returns an
  array or a tuple of arrays.
* ``backward(ctx, *grad_outputs)`` returns one gradient per positional
  argument of ``forward`` (None for non-Tensor arguments and for inputs that
  need no gradient). The engine sums each gradient back to its input's shape,
  so a broadcasting op may return a gradient of the broadcast shape.
* ``ctx.save_for_backward(*arrays)`` keeps what backward needs, and
  ``ctx.saved_tensors`` returns it.

Backward normally sees arrays. When the backward pass itself is recorded
(``create_graph=True``) it sees Tensors instead, so a formula written with
``ctx.xp`` (the array module, or gradflow's Tensor functions under
``create_graph``) and Python operators serves both cases.
"""

import numpy as np
from numpy import ndarray

from .._device import array_module
from .._fastpath import extension
from ..errors import GraphFreedError, InplaceModificationError
from . import _grad_mode

__all__ = ["Function", "Context", "once_differentiable"]

# Set by gradflow._tensor at import, to avoid an import cycle.
Tensor = None
make_tensor = None
check_devices = None
refresh_view = None

# Called with each new record when non-empty (the saved-tensor ledger uses it).
record_hooks = []

# Called with the Tensor arguments of each op that runs unrecorded although
# one of them requires grad (checkpointing finds captured parameters so).
unrecorded_hooks = []

# While non-empty, its last entry runs each forward in place of cls.forward,
# as hook(cls, ctx, arrays, kwargs) (checkpointing's selective policy).
forward_hooks = []

# Called with each record right after backward freed its saved arrays.
release_hooks = []

# The (pack_hook, unpack_hook) pairs of the active gf.autograd.graph
# saved_tensors_hooks blocks, innermost last. Only the last pair applies.
saved_tensors_hooks = []

# Called as anomaly_hook(ctx, args, outputs) after every forward while
# gradflow.anomaly's detection is on; None otherwise.
anomaly_hook = None


class Context(object if extension is None else extension.RecordBase):
    """The tape record of one operation, and the ``ctx`` its methods receive.

    Holds the edges to the records (or leaf Tensors) that produced the
    inputs, the arrays saved for backward, and the output metadata the engine
    needs to build zero gradients for unused outputs. It never holds its own
    outputs, so the graph has no reference cycles. With the C extension, its
    base class (``gradflow._C.RecordBase``) stores the C backward walk's
    place for the record and its links in the list of untracked records.
    """

    __slots__ = (
        "function", "edges", "input_meta", "needs_input_grad", "out_meta",
        "saved", "_saved_kinds", "_saved_versions", "_released", "_hooks",
        "_retained", "xp", "array_module", "_op", "__dict__",
        "__weakref__",
    )

    def __init__(self):
        self.saved = ()
        self._saved_kinds = None
        self._hooks = None
        self._retained = None
        self._released = False
        # The C extension's op code for records it made, whose backward it
        # can run itself; None for records made in Python.
        self._op = None

    @property
    def name(self):
        """The op's name, as error messages and the ledger print it."""
        return self.function.__name__ if self.function else "<no op>"

    def save_for_backward(self, *arrays):
        """Keep ``arrays`` (forward's inputs, outputs or temporaries) for backward."""
        self.saved = arrays

    # The arrays that mark_non_differentiable names stay in the record's
    # __dict__ until apply has read them. Few records have any, so a slot
    # for them would make every record larger.
    _non_diff = None

    def mark_non_differentiable(self, *arrays):
        """Declare outputs (by array identity) that carry no gradient."""
        self._non_diff = arrays

    @property
    def saved_tensors(self):
        """The saved values: arrays, or Tensors while backward is recorded."""
        if self._released or self._saved_versions:
            self._check_readable()
        kinds = self._saved_kinds
        if kinds is None:
            return self.saved
        if _grad_mode.is_grad_enabled():
            return tuple([self._unpack_tensor(i) for i in range(len(self.saved))])
        return tuple([
            _unpack_array(s) if kind == "input" or type(s) is _Packed else s
            for s, kind in zip(self.saved, kinds)
        ])

    def _saved_values(self):
        # The saved values as the record kept them before any pack hook ran:
        # Tensors for inputs, arrays for outputs and temporaries.
        self._check_readable()
        kinds = self._saved_kinds
        if kinds is None:
            return self.saved
        return tuple(
            self._unpack_tensor(i) if kind == "input" else _unpack_array(s)
            for i, (s, kind) in enumerate(zip(self.saved, kinds))
        )

    def _check_readable(self):
        if self._released:
            raise GraphFreedError(
                f"backward reached '{self.name}' a second time, but its saved "
                "arrays were already freed by the first backward. Pass "
                "retain_graph=True to the first backward (or gf.grad) if you "
                "need to run backward through this graph again."
            )
        if self._saved_versions:
            self._check_versions()

    def _unpack_tensor(self, i):
        value, kind = self.saved[i], self._saved_kinds[i]
        if type(value) is _Packed:
            return self._restore_graph(value, kind)
        if kind == "input":
            return value
        if isinstance(kind, int):
            # An output of this record: rebuild it pointing at this record, so a
            # recorded backward can differentiate through it.
            return make_tensor(value, self, kind)
        return make_tensor(value)

    def _restore_graph(self, packed, kind):
        # The unpack hook returns the content. The graph comes from the record:
        # an input gets the edge this record has to it, an output this record.
        data = packed.unpack().data
        if isinstance(kind, int):
            return make_tensor(data, self, kind)
        if kind != "input":
            return make_tensor(data)
        edge = self.edges[packed.position]
        if edge is None:
            return make_tensor(data)
        if type(edge) is tuple:
            return make_tensor(data, edge[0], edge[1])
        if data is edge.data:
            return edge
        # A leaf input with other content: a record whose gradient goes to
        # the leaf unchanged, so the content is the hook's and the gradient
        # the leaf's. It is recorded also with grad mode off, because a
        # checkpoint's first-order backward reads its inputs so and needs
        # the path to the leaf.
        with _grad_mode.enable_grad():
            return _UnpackedLeaf.apply(edge, data)

    def _check_versions(self):
        for index, counter, version in self._saved_versions:
            if counter[0] != version:
                kind = self._saved_kinds[index]
                role = "an input" if kind == "input" else "an output"
                raise InplaceModificationError(
                    f"a tensor that '{self.name}' saved for backward ({role}, "
                    f"shape {tuple(self.saved[index].shape)}) was modified in "
                    f"place after it was saved (version {counter[0]}, expected "
                    f"{version}). Use an out-of-place op (x = x + 1, not x += 1) "
                    "or clone the tensor before changing it."
                )

    def release(self):
        """Drop the saved arrays once backward no longer needs them."""
        self.saved = ()
        self._saved_kinds = None
        self._released = True
        for hook in release_hooks:
            hook(self)


class _Packed:
    """A saved value that a pack hook replaced, and how to get it back.

    ``position`` is the argument position of a saved input, whose edge gives
    the unpacked Tensor its graph again. ``shape`` is the saved value's, for
    error messages.
    """

    __slots__ = ("packed", "unpack_hook", "position", "shape")

    def __init__(self, packed, unpack_hook, position, shape):
        self.packed = packed
        self.unpack_hook = unpack_hook
        self.position = position
        self.shape = shape

    def unpack(self):
        """Run the unpack hook and return the Tensor it gives back."""
        with _grad_mode.no_grad():
            tensor = self.unpack_hook(self.packed)
        if not isinstance(tensor, Tensor):
            raise TypeError(
                "saved_tensors_hooks: unpack_hook must return a Tensor, got "
                f"{type(tensor).__name__}. Return the Tensor (or one with the "
                "same content) that pack_hook received."
            )
        return tensor


def _unpack_array(value):
    if type(value) is _Packed:
        return value.unpack().data
    return value.data if isinstance(value, Tensor) else value


def once_differentiable(backward):
    """Mark a ``backward`` that works on arrays only.

    When such a backward would be recorded (``create_graph=True``), the engine
    runs it on arrays instead, and the gradients it returns carry no graph of
    their own; a second-order gradient through this op is then zero.
    """
    backward.once_differentiable = True
    return backward


class Function:
    """Base class of differentiable operations; subclass it and call ``apply``.

    >>> class Square(gf.autograd.Function):
    ...     @staticmethod
    ...     def forward(ctx, x):
    ...         ctx.save_for_backward(x)
    ...         return x * x
    ...     @staticmethod
    ...     def backward(ctx, grad_output):
    ...         (x,) = ctx.saved_tensors
    ...         return 2 * x * grad_output
    >>> y = Square.apply(gf.tensor([3.0], requires_grad=True))
    """

    @staticmethod
    def forward(ctx, *args, **kwargs):
        raise NotImplementedError("Function subclasses must define forward")

    @staticmethod
    def backward(ctx, *grad_outputs):
        raise NotImplementedError("Function subclasses must define backward")

    @classmethod
    def apply(cls, *args, **kwargs):
        """Run ``forward`` on the arrays of ``args`` and record it when needed."""
        # The C extension, when present, replaces this method with the same
        # steps in C, which call this one for every case they do not cover.
        # One pass over the arguments collects what both the unrecorded and the
        # recorded path need; this loop is the per-op overhead of gradflow.
        arrays = []
        needs = []
        requires_grad = False
        tensor_count = 0
        off_cpu = False
        for arg in args:
            if isinstance(arg, Tensor):
                if arg._view is not None and arg._view[3] != arg._version[0]:
                    refresh_view(arg)
                data = arg.data
                arrays.append(data)
                tensor_count += 1
                off_cpu = off_cpu or type(data) is not ndarray
                if arg._requires_grad:
                    requires_grad = True
                    needs.append(True)
                else:
                    needs.append(False)
            else:
                arrays.append(arg)
                needs.append(False)
        if off_cpu and tensor_count > 1:
            check_devices(cls, [arg for arg in args if isinstance(arg, Tensor)])

        record = requires_grad and _grad_mode.is_grad_enabled()
        ctx = Context()
        ctx.function = cls
        # Set before forward runs, so forward can skip saving what no
        # gradient will need.
        ctx.needs_input_grad = tuple(needs) if record else (False,) * len(args)
        if forward_hooks:
            out = forward_hooks[-1](cls, ctx, arrays, kwargs)
        else:
            out = cls.forward(ctx, *arrays, **kwargs)
        if anomaly_hook is not None:
            anomaly_hook(ctx, args, out)

        outputs = out if type(out) is tuple else (out,)
        for o in outputs:
            if type(o) is not ndarray and not hasattr(o, "shape"):
                raise TypeError(
                    f"forward of '{cls.__name__}' returned a "
                    f"{type(o).__name__}; it must return an array (NumPy or "
                    "CuPy) or a tuple of arrays."
                )
        if not record:
            if unrecorded_hooks and requires_grad:
                for hook in unrecorded_hooks:
                    hook([arg for arg in args if isinstance(arg, Tensor)])
            if type(out) is tuple:
                return tuple(make_tensor(o) for o in out)
            return make_tensor(out)

        _record(ctx, args, arrays, outputs, needs)
        if type(out) is tuple:
            results = tuple(make_tensor(o, ctx, i) for i, o in enumerate(outputs))
        else:
            results = (make_tensor(out, ctx, 0),)
        non_diff = ctx._non_diff
        if non_diff is not None:
            del ctx._non_diff
        if non_diff:
            for t in results:
                if any(t.data is a for a in non_diff):
                    t.grad_fn = None
                    t._requires_grad = False
        if ctx._saved_kinds is not None:
            _note_output_versions(ctx, results)
        if extension is not None:
            # What forward kept may refer to later tensors; see _C.note_record.
            extension.note_record(ctx)
        for hook in record_hooks:
            hook(ctx)
        return results if type(out) is tuple else results[0]


# The Python Function.apply, which the C extension's apply calls for the
# cases it does not cover after replacing Function.apply.
python_apply = Function.__dict__["apply"].__func__


class _UnpackedLeaf(Function):
    """The content an unpack hook returned for a saved leaf input.

    ``forward(ctx, leaf, content)`` returns ``content`` (an array passed as
    it is), and backward passes the gradient to ``leaf`` unchanged.
    """

    @staticmethod
    def forward(ctx, leaf, content):
        return content

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


def _record(ctx, args, arrays, outputs, needs):
    """Fill ``ctx`` with the edges and metadata that backward needs."""
    edges = []
    meta = []
    first = None
    for arg, need in zip(args, needs):
        if need:
            edges.append(arg if arg.grad_fn is None else (arg.grad_fn, arg._out_index))
            meta.append((arg.data.shape, arg.data.dtype))
            if first is None:
                first = arg.data
        else:
            edges.append(None)
            meta.append(None)
    ctx.edges = edges
    ctx.input_meta = meta
    ctx.array_module = np if type(first) is ndarray else array_module(first)
    ctx.out_meta = tuple([(o.shape, o.dtype) for o in outputs])
    if ctx.saved:
        _resolve_saved(ctx, args, arrays, outputs)


def _resolve_saved(ctx, args, arrays, outputs):
    # Each saved array is one of three kinds. A Tensor input is kept as the
    # Tensor, which also lets a recorded backward reach its graph. An output
    # of this op is kept as the array, because holding the output Tensor would
    # make a cycle. A temporary is kept as the array.
    saved = []
    kinds = []
    versions = []
    positions = []
    for i, value in enumerate(ctx.saved):
        kind = None
        position = None
        for index, array in enumerate(arrays):
            if value is array and isinstance(args[index], Tensor):
                arg = args[index]
                kind = "input"
                position = index
                versions.append((i, arg._version, arg._version[0]))
                value = arg
                break
        else:
            for j, out in enumerate(outputs):
                if value is out:
                    kind = j
                    break
        saved.append(value)
        kinds.append(kind)
        positions.append(position)
    if saved_tensors_hooks:
        saved = _pack_saved(saved, kinds, positions)
    ctx.saved = tuple(saved)
    ctx._saved_kinds = tuple(kinds)
    ctx._saved_versions = versions


def _pack_saved(saved, kinds, positions):
    """Pass each saved value through the innermost pack hook."""
    pack_hook, unpack_hook = saved_tensors_hooks[-1]
    packed = []
    for value, kind, position in zip(saved, kinds, positions):
        if kind != "input":
            if not hasattr(value, "shape"):
                # None or another non-array value: nothing to pack.
                packed.append(value)
                continue
            # The output Tensor does not exist yet, and holding it would
            # make a cycle, so the hook receives a Tensor of the array alone.
            value = make_tensor(value)
        with _grad_mode.no_grad():
            result = pack_hook(value)
        packed.append(_Packed(result, unpack_hook, position, value.shape))
    return packed


def _note_output_versions(ctx, results):
    for i, kind in enumerate(ctx._saved_kinds):
        if isinstance(kind, int):
            counter = results[kind]._version
            ctx._saved_versions.append((i, counter, counter[0]))
