"""Selective checkpointing: keep the outputs of costly ops, recompute the rest.

A region run with a ``Policy`` is recorded as usual, once, under a pair of
saved-tensor hooks (``gf.autograd.graph.saved_tensors_hooks``). When a record
saves the output of an op that the policy does not keep, the pack hook tries
to store a recipe in its place: the op and the arguments it needs. A recipe
may only hold arrays that stay in memory anyway, so storing it saves the
whole output:

* an array the producing op saved for its own backward;
* the array of a leaf tensor (a parameter, the input batch);
* a Tensor that some record in a policy region saved as it is;
* another recipe, up to ``max_recomputed_ops`` ops in all.

Anything else is saved as it is. The unpack hook runs the recipe's forwards
when backward reads the value. In a chain of Linear and GELU blocks, each
GELU output that the next Linear saves becomes "GELU of the Linear output
that the GELU saved", so a block keeps one array in place of two.

Recomputed values equal the originals bit for bit, because an op's forward is
a function of its arguments alone (dropout draws its mask outside the op and
passes it in).
NOTE: a custom ``Function`` whose forward draws random numbers or reads
state that changes would be recomputed wrongly. Keep such an op in
``Policy(keep=...)`` so that its output is saved as it is.
"""

import contextlib
import weakref

from .. import memory
from .._tensor import Tensor, make_tensor
from ..autograd import _function, graph
from ..errors import InplaceModificationError

__all__ = ["Policy"]

# A Tensor that a record in a policy region saved as it is, by (id of its
# record, output index), while something else keeps it alive. The Tensor
# holds its record, so the id is not reused meanwhile.
_saved_as_is = weakref.WeakValueDictionary()
# Functions whose forward reads more than its arguments; see never_replayed.
_never_replayed = set()


class Policy:
    """The ops whose outputs a checkpointed region keeps instead of recomputing.

    ``keep`` is a sequence of ``gf.autograd.Function`` subclasses, and the
    default keeps matrix products. The outputs of all other ops are
    recomputed in backward where that frees memory, at most
    ``max_recomputed_ops`` op forwards for each saved array that backward
    reads (0 recomputes nothing). Pass it as ``gf.checkpoint(fn, x, policy=...)``.

    >>> policy = gf.checkpoint.Policy()          # keep matmul outputs
    >>> y = gf.checkpoint(block, x, policy=policy)
    """

    def __init__(self, keep=None, max_recomputed_ops=4):
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
        if (isinstance(max_recomputed_ops, bool)
                or not isinstance(max_recomputed_ops, int) or max_recomputed_ops < 0):
            raise ValueError(
                "Policy: max_recomputed_ops must be a non-negative int, got "
                f"{max_recomputed_ops!r}."
            )
        self.keep = frozenset(keep)
        self.max_recomputed_ops = max_recomputed_ops

    def __repr__(self):
        names = sorted(op.__name__ for op in self.keep)
        return (f"Policy(keep=[{', '.join(names)}], "
                f"max_recomputed_ops={self.max_recomputed_ops})")


class _Replay:
    """How to run one recorded op's forward again, without holding any array.

    ``arguments`` has one (kind, value) pair per forward argument: ("saved",
    index into ``ctx.saved``), ("input", argument position, read through the
    record's edge) or ("constant", the value itself).
    """

    __slots__ = ("function", "arguments", "kwargs")

    def __init__(self, function, arguments, kwargs):
        self.function = function
        self.arguments = arguments
        self.kwargs = kwargs


class _Recipe:
    """A saved array stored as the op that makes it and that op's arguments.

    ``arguments`` holds Tensors, arrays, nested recipes and constants.
    ``versions`` holds a (counter, version) pair for each Tensor read, so an
    in-place change made after the forward is caught, not recomputed from.
    """

    __slots__ = ("function", "arguments", "kwargs", "index", "versions", "ops")

    def __init__(self, function, arguments, kwargs, index, versions, ops):
        self.function = function
        self.arguments = arguments
        self.kwargs = kwargs
        self.index = index
        self.versions = versions
        self.ops = ops

    def held_arrays(self):
        """Return the arrays this recipe keeps alive (the ledger counts them)."""
        arrays = []
        for value in self.arguments:
            if isinstance(value, _Recipe):
                arrays += value.held_arrays()
            elif isinstance(value, Tensor):
                arrays.append(value.data)
            elif hasattr(value, "shape"):
                arrays.append(value)
        return arrays

    def compute(self):
        """Run the forwards again and return the array the recipe stands for."""
        for counter, version in self.versions:
            if counter[0] != version:
                raise InplaceModificationError(
                    f"a tensor that '{self.function.__name__}' read in the "
                    "forward was modified in place before backward recomputed "
                    f"that op (version {counter[0]}, expected {version}). Use "
                    "an out-of-place op or clone the tensor before changing it."
                )
        arrays = [_argument_array(value) for value in self.arguments]
        ctx = _function.Context()
        ctx.function = self.function
        ctx.needs_input_grad = (False,) * len(arrays)
        out = self.function.forward(ctx, *arrays, **self.kwargs)
        return out[self.index] if type(out) is tuple else out


def never_replayed(function):
    """Mark a ``Function`` whose forward a recipe must not run again.

    The records of checkpointed regions are such ops: their forward reads
    state that the region prepared for that one call.
    """
    _never_replayed.add(function)
    return function


def _argument_array(value):
    if isinstance(value, _Recipe):
        return value.compute()
    if isinstance(value, Tensor):
        return value.data
    return value


@contextlib.contextmanager
def selective_region(policy):
    """Record the block, saving recipes in place of recomputable arrays."""
    if not isinstance(policy, Policy):
        raise TypeError(
            f"checkpoint: policy must be a gf.checkpoint.Policy, got "
            f"{type(policy).__name__}."
        )

    def forward(cls, ctx, arrays, kwargs):
        out = _run_below(forward, cls, ctx, arrays, kwargs)
        # An enclosing region's hook ran below this one; this policy decides.
        ctx.__dict__.pop("_replay", None)
        if cls not in policy.keep and cls not in _never_replayed:
            replay = _replay_for(cls, ctx, arrays, kwargs)
            if replay is not None:
                ctx.__dict__["_replay"] = replay
        return out

    def pack(tensor):
        recipe = _recipe_for(tensor, policy.max_recomputed_ops)
        if recipe is not None:
            return recipe
        if tensor.grad_fn is not None:
            _saved_as_is[(id(tensor.grad_fn), tensor._out_index)] = tensor
        return tensor

    _function.forward_hooks.append(forward)
    try:
        with graph.saved_tensors_hooks(pack, _unpack):
            yield
    finally:
        _function.forward_hooks.remove(forward)


def _unpack(packed):
    if not isinstance(packed, _Recipe):
        return packed
    array = packed.compute()
    memory.note_recomputed(array)
    return make_tensor(array)


def _run_below(hook, cls, ctx, arrays, kwargs):
    # Forward hooks nest (a policy region inside another), so each one hands
    # the op to the hook installed before it.
    hooks = _function.forward_hooks
    index = hooks.index(hook)
    if index > 0:
        return hooks[index - 1](cls, ctx, arrays, kwargs)
    return cls.forward(ctx, *arrays, **kwargs)


def _replay_for(cls, ctx, arrays, kwargs):
    """Return a ``_Replay`` for this call, or None when it cannot be replayed."""
    if any(_holds_array(value) for value in kwargs.values()):
        return None
    arguments = []
    for position, value in enumerate(arrays):
        if not hasattr(value, "shape"):
            if _holds_array(value):
                # A constant must not keep arrays alive behind the ledger.
                return None
            arguments.append(("constant", value))
            continue
        index = next((i for i, s in enumerate(ctx.saved) if s is value), None)
        if index is not None:
            arguments.append(("saved", index))
        else:
            arguments.append(("input", position))
    return _Replay(cls, tuple(arguments), dict(kwargs))


def _holds_array(value):
    if isinstance(value, (list, tuple)):
        return any(_holds_array(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_array(v) for v in value.values())
    return hasattr(value, "shape")


def _recipe_for(tensor, max_ops):
    """Return a ``_Recipe`` for a Tensor about to be saved, or None."""
    record = tensor.grad_fn
    if record is None or tensor._version[0] != 0:
        return None
    if tensor._out_index in (record._saved_kinds or ()):
        # Its own record saves this output, so it stays in memory anyway.
        return None
    return _build(record, tensor._out_index, [max_ops])


def _build(record, index, budget):
    replay = record.__dict__.get("_replay")
    if replay is None or record._released:
        return None
    budget[0] -= 1
    if budget[0] < 0:
        return None
    ops = 1
    arguments = []
    versions = []
    for kind, value in replay.arguments:
        if kind == "constant":
            arguments.append(value)
            continue
        if kind == "saved":
            source = _saved_source(record, value, versions, budget)
        else:
            source = _input_source(record, value, versions, budget)
        if source is None:
            return None
        if isinstance(source, _Recipe):
            ops += source.ops
        arguments.append(source)
    return _Recipe(replay.function, tuple(arguments), replay.kwargs, index,
                   tuple(versions), ops)


def _saved_source(record, index, versions, budget):
    value = record.saved[index]
    if type(value) is _function._Packed:
        if value.unpack_hook is not _unpack:
            return None
        value = value.packed
        if isinstance(value, _Recipe):
            # Recomputing it again costs its ops once more.
            budget[0] -= value.ops
            return value if budget[0] >= 0 else None
    if isinstance(value, Tensor):
        for saved_index, counter, version in record._saved_versions:
            if saved_index == index:
                versions.append((counter, version))
    return value


def _input_source(record, position, versions, budget):
    edge = record.edges[position]
    if edge is None:
        return None
    if type(edge) is not tuple:
        # A leaf: its array lives as long as the leaf does.
        versions.append((edge._version, edge._version[0]))
        return edge
    producer, index = edge
    kinds = producer._saved_kinds or ()
    if index in kinds and not producer._released:
        return _saved_source(producer, kinds.index(index), versions, budget)
    tensor = _saved_as_is.get((id(producer), index))
    if tensor is not None and tensor._version[0] == 0:
        versions.append((tensor._version, 0))
        return tensor
    return _build(producer, index, budget)
