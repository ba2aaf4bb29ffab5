"""Selective checkpointing: keep the outputs of costly ops, recompute the rest.

Inside a region run with a ``Policy``, the first (unrecorded) forward stores
the output of every op whose ``Function`` class the policy names, in call
order. The recomputation in backward takes those outputs from the store in
place of running the op again, so only the other ops (elementwise ones, by
intention) are recomputed.

A kept op's record still needs what its backward reads. An op qualifies when
everything it saves is one of its own inputs (a matrix product saves its two
operands), because the replay can then save the recomputed inputs without
running the op. An op that saves anything else is recomputed as usual.
"""

import contextlib

from ..autograd import _function
from ..errors import GraphError

__all__ = ["Policy"]


class Policy:
    """The ops whose outputs a checkpointed region keeps instead of recomputing.

    ``keep`` is a sequence of ``gf.autograd.Function`` subclasses, and the
    default keeps matrix products. Pass it as ``gf.checkpoint(fn, x, policy=...)``.

    >>> policy = gf.checkpoint.Policy()          # keep matmul outputs
    >>> y = gf.checkpoint(block, x, policy=policy)
    """

    def __init__(self, keep=None):
        if keep is None:
            from .._ops._arith import MatMul
            from ..nn._layers import LinearFunction

            keep = (MatMul, LinearFunction)
        keep = tuple(keep)
        for op in keep:
            if not (isinstance(op, type) and issubclass(op, _function.Function)):
                raise TypeError(
                    f"Policy: keep must list gf.autograd.Function subclasses, got "
                    f"{op!r}; e.g. Policy(keep=[gf._ops._arith.MatMul])."
                )
        self.keep = frozenset(keep)

    def __repr__(self):
        names = sorted(op.__name__ for op in self.keep)
        return f"Policy(keep=[{', '.join(names)}])"


class _Kept:
    """One call of a kept op: class, input shapes, output, saved inputs, attributes.

    ``attributes`` are the plain ctx attributes the forward set (an axis, a
    shape), which the replayed record needs as its backward reads them.
    """

    __slots__ = ("op", "shapes", "output", "saved_inputs", "is_tuple", "attributes")

    def __init__(self, op, shapes, output, saved_inputs, attributes=None):
        self.op = op
        self.shapes = shapes
        self.output = output
        self.saved_inputs = saved_inputs
        self.is_tuple = isinstance(output, tuple)
        self.attributes = attributes or {}

    def arrays(self):
        if self.output is None:
            return []
        return list(self.output) if self.is_tuple else [self.output]

    def without_arrays(self):
        # The record keeps the arrays; the region keeps only their count.
        count = len(self.arrays()) if self.output is not None else None
        entry = _Kept(self.op, self.shapes, count, self.saved_inputs, self.attributes)
        entry.is_tuple = self.is_tuple
        return entry


def _shapes(arrays):
    return tuple(getattr(a, "shape", None) for a in arrays)


@contextlib.contextmanager
def recording_kept_outputs(policy, store):
    """Append a ``_Kept`` to ``store`` for each call of an op ``policy`` keeps."""
    if policy is None:
        yield
        return

    def forward(cls, ctx, arrays, kwargs):
        if cls in policy.keep:
            # This pass runs unrecorded, where an op saves nothing for
            # backward; a kept op must save what the replayed record reads.
            ctx.needs_input_grad = (True,) * len(arrays)
        out = _run_below(forward, cls, ctx, arrays, kwargs)
        if cls in policy.keep:
            saved_inputs = _saved_input_positions(ctx, arrays)
            output = out if saved_inputs is not None else None
            attributes = dict(ctx.__dict__)
            store.append(_Kept(cls, _shapes(arrays), output, saved_inputs, attributes))
        return out

    _function.forward_hooks.append(forward)
    try:
        yield
    finally:
        _function.forward_hooks.remove(forward)


def _run_below(hook, cls, ctx, arrays, kwargs):
    # Forward hooks nest (a policy region inside another), so each one hands
    # the ops it does not serve itself to the hook installed before it.
    hooks = _function.forward_hooks
    index = hooks.index(hook)
    if index > 0:
        return hooks[index - 1](cls, ctx, arrays, kwargs)
    return cls.forward(ctx, *arrays, **kwargs)


def _saved_input_positions(ctx, arrays):
    positions = []
    for value in ctx.saved:
        for i, array in enumerate(arrays):
            if value is array:
                positions.append(i)
                break
        else:
            return None
    return tuple(positions)


@contextlib.contextmanager
def replaying_kept_outputs(policy, store, arrays):
    """Serve the kept ops from ``arrays`` (the kept outputs, flattened in order)."""
    if policy is None:
        yield
        return
    position = [0, 0]

    def forward(cls, ctx, inputs, kwargs):
        if cls not in policy.keep:
            return _run_below(forward, cls, ctx, inputs, kwargs)
        entry = _next_entry(store, position, cls, inputs)
        if entry.output is None:
            return _run_below(forward, cls, ctx, inputs, kwargs)
        ctx.save_for_backward(*(inputs[i] for i in entry.saved_inputs))
        ctx.__dict__.update(entry.attributes)
        start = position[1]
        position[1] += entry.output
        outputs = arrays[start:position[1]]
        return tuple(outputs) if entry.is_tuple else outputs[0]

    _function.forward_hooks.append(forward)
    try:
        yield
    finally:
        _function.forward_hooks.remove(forward)


def _next_entry(store, position, cls, inputs):
    index = position[0]
    position[0] += 1
    entry = store[index] if index < len(store) else None
    if entry is None or entry.op is not cls or entry.shapes != _shapes(inputs):
        raise GraphError(
            f"checkpoint: call {index} of a kept op in the recomputation is "
            f"'{cls.__name__}' with input shapes {_shapes(inputs)}, which does "
            "not match the forward. fn must run the same ops both times."
        )
    return entry
