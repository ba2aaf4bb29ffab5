"""Selective checkpointing: keep the outputs of costly ops, recompute the rest.

A region run with a ``Policy`` is recorded as usual, once, under a pair of
saved-tensor hooks (``gf.autograd.graph.saved_tensors_hooks``). When a record
saves the output of an op that the policy does not keep, the pack hook tries
to store a recipe in its place: the op and the arguments it needs. A recipe
may only hold arrays that stay in memory anyway, so storing it saves the
whole output:

* an array the producing op saved for its own backward;
* the array a leaf tensor (a parameter, the input batch) had when the
  producing op was recorded, which the recipe keeps alive also after the
  leaf is given a new array;
* the array of a Tensor that some record in a policy region saved as it is;
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
# refers to its record, so the id is not reused meanwhile.
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

    ``arguments`` has one tuple per forward argument: ("saved", index into
    ``ctx.saved``, and for a saved Tensor a weak reference to the array the
    forward read), ("input", argument position, read through the record's
    edge to another record), ("leaf", weak reference to the leaf's array,
    the leaf's version counter, its version when the op was recorded) or
    ("constant", the value itself).
    """

    __slots__ = ("function", "arguments", "kwargs")

    def __init__(self, function, arguments, kwargs):
        self.function = function
        self.arguments = arguments
        self.kwargs = kwargs


class _Recipe:
    """A saved array stored as the op that makes it and that op's arguments.

    ``arguments`` holds arrays, nested recipes and constants, never a Tensor,
    because assigning a new array to a Tensor's ``.data`` after the forward
    must not change what is recomputed. ``versions`` holds a (counter,
    version) pair for each Tensor whose array is read, so an in-place change
    made after the forward is caught, not recomputed from.
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
            elif hasattr(value, "shape"):
                arrays.append(value)
        return arrays

    def is_current(self):
        """Return True when no array this recipe reads was changed in place."""
        if any(counter[0] != version for counter, version in self.versions):
            return False
        return all(value.is_current() for value in self.arguments
                   if isinstance(value, _Recipe))

    def compute(self):
        """Run the forwards again and return the array the recipe stands for."""
        for counter, version in self.versions:
            if counter[0] != version:
                name = self.function.__name__
                raise InplaceModificationError(
                    f"a tensor that '{name}' read in the forward was modified "
                    "in place before backward recomputed that op for the "
                    f"checkpoint policy (version {counter[0]}, expected "
                    f"{version}). Change it after backward, use an "
                    "out-of-place op (or assign a new array to .data), or add "
                    f"{name} to Policy(keep=...) so that its output is saved."
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
    _function.record_hooks.append(_pin_input_arrays)
    try:
        with graph.saved_tensors_hooks(pack, _unpack):
            yield
    finally:
        _function.record_hooks.remove(_pin_input_arrays)
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


def _pin_input_arrays(record):
    """Note in the record's replay the arrays its forward read from Tensors.

    It runs as a record hook, right after the op's forward, while each input
    Tensor still has the array (and a leaf the version) that the forward
    read. Code may assign a new array to ``.data`` or change it in place
    later, before a recipe is built from this record or before backward
    runs it.
    """
    replay = record.__dict__.get("_replay")
    if replay is None:
        return
    arguments = []
    for argument in replay.arguments:
        kind, value = argument[0], argument[1]
        if kind == "input":
            edge = record.edges[value]
            if edge is not None and type(edge) is not tuple:
                counter = edge._version
                argument = ("leaf", weakref.ref(edge.data), counter, counter[0])
        elif kind == "saved":
            saved = record.saved[value]
            if type(saved) is _function._Packed and saved.unpack_hook is _unpack:
                saved = saved.packed
            if isinstance(saved, Tensor):
                argument = ("saved", value, weakref.ref(saved.data))
        arguments.append(argument)
    replay.arguments = tuple(arguments)


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
    for argument in replay.arguments:
        kind, value = argument[0], argument[1]
        if kind == "constant":
            arguments.append(value)
            continue
        if kind == "saved":
            array_ref = argument[2] if len(argument) > 2 else None
            source = _saved_source(record, value, versions, budget, array_ref)
        elif kind == "leaf":
            source = _leaf_source(argument, versions)
        else:
            source = _input_source(record, value, versions, budget)
        if source is None:
            return None
        if isinstance(source, _Recipe):
            ops += source.ops
        arguments.append(source)
    if any(counter[0] != version for counter, version in versions):
        # Changed in place since the forward read it: the value to save can
        # no longer be recomputed, so it is saved as it is.
        return None
    return _Recipe(replay.function, tuple(arguments), replay.kwargs, index,
                   tuple(versions), ops)


def _saved_source(record, index, versions, budget, array_ref=None):
    value = record.saved[index]
    if type(value) is _function._Packed:
        if value.unpack_hook is not _unpack:
            return None
        value = value.packed
        if isinstance(value, _Recipe):
            if not value.is_current():
                return None
            # Recomputing it again costs its ops once more.
            budget[0] -= value.ops
            return value if budget[0] >= 0 else None
    if isinstance(value, Tensor):
        for saved_index, counter, version in record._saved_versions:
            if saved_index == index:
                versions.append((counter, version))
        # The array the forward read, when _pin_input_arrays noted it. None
        # means that the Tensor was given a new array and the old one is gone.
        return value.data if array_ref is None else array_ref()
    return value


def _leaf_source(argument, versions):
    # The array the forward read. It lives as long as the leaf keeps it,
    # and the recipe keeps it alive after the leaf is given a new array.
    _, array_ref, counter, version = argument
    array = array_ref()
    if array is None:
        return None
    versions.append((counter, version))
    return array


def _input_source(record, position, versions, budget):
    edge = record.edges[position]
    if type(edge) is not tuple:
        # No gradient flows to it (None), or a leaf that _pin_input_arrays
        # did not see. Either way, nothing vouches for its array.
        return None
    producer, index = edge
    kinds = producer._saved_kinds or ()
    if index in kinds and not producer._released:
        return _saved_source(producer, kinds.index(index), versions, budget)
    tensor = _saved_as_is.get((id(producer), index))
    if tensor is not None and tensor._version[0] == 0:
        versions.append((tensor._version, 0))
        return tensor.data
    return _build(producer, index, budget)
