"""Checkpointing of one region: run it unrecorded, recompute it inside backward.

``checkpoint(fn, *args)`` leaves a single record on the tape. Its forward runs
``fn`` with recording off and keeps only the Tensors the region reads from
outside (its arguments and the tensors ``fn`` captures, such as parameters).
Its backward re-runs ``fn`` with recording on, then backpropagates through
that fresh graph and returns the gradients of those outside tensors.

The recomputed graph must stop at the region's edge, because the engine walks
every record it can reach. So each outside tensor that has a graph of its own
is replaced, inside the recomputation, by a leaf proxy that shares its array.
Under ``create_graph=True`` the proxies are spliced back to the real tensors
afterwards, so higher-order gradients flow past the region. The record then
points at that recomputed graph. A later backward that reaches the record
(a second-order one) passes its gradients into that graph instead of
recomputing again. There they are summed with the gradients that the first
backward's graph sends to the same values, as without checkpointing.

Gradients equal those without checkpointing bit for bit on the CPU when each
tensor's contributions are summed in the same order.
NOTE: a tensor read in three or more places, split across regions, may get
its contributions summed in another order, so its gradient may differ in the
last bits. The same holds for a region output that a second-order backward
reaches by three or more paths, because the paths from outside the region
are summed first, at the record.
"""

import contextlib
import threading

from .. import _random, memory
from .._tensor import Tensor, make_tensor
from ..autograd import Function, _engine, _function, _grad_mode
from ..errors import GraphError
from ._policy import never_replayed, selective_region

__all__ = ["checkpoint", "is_recomputing", "recompute_count"]

_state = threading.local()
_TENSOR = object()


def is_recomputing():
    """Return True while a checkpoint re-runs its forward inside backward.

    A stateful layer (a running mean, a step counter) checks it to skip the
    update that the original forward already made.
    """
    return getattr(_state, "depth", 0) > 0


def recompute_count():
    """Return how many region recomputations this thread has run so far."""
    return getattr(_state, "recomputed", 0)


def checkpoint(fn, *args, preserve_rng_state=True, policy=None, **kwargs):
    """Call ``fn(*args, **kwargs)`` without keeping its activations for backward.

    Only the Tensors that ``fn`` reads from outside are kept, and backward
    runs ``fn`` again with recording on. With ``preserve_rng_state`` the random
    state of every device is restored before that second run, so dropout
    draws the same mask.

    With ``policy`` (a ``Policy``) checkpointing is selective instead: ``fn``
    runs once, recorded, and keeps the outputs of the ops the policy names.
    A value that another op saves is stored as a recipe where it can be
    recomputed from what stays in memory anyway, and backward recomputes it
    op by op when it reads it. ``fn`` is not called again.

    ``fn`` may return a Tensor or a tuple or list mixing Tensors and other
    values. It must run the same ops on the second call as on the first.
    Under ``gf.no_grad`` this simply returns ``fn(*args, **kwargs)``.

    >>> y = gf.checkpoint(block, x)   # block's activations are recomputed
    """
    if not _grad_mode.is_grad_enabled():
        return fn(*args, **kwargs)
    if policy is not None:
        with selective_region(policy):
            return fn(*args, **kwargs)
    region = _Region(fn, args, kwargs, preserve_rng_state)
    outputs = region.run_unrecorded()
    externals = region.external_tensors()
    if not any(t._requires_grad for t in externals):
        return outputs
    return region.attach(outputs, externals)


class _Region:
    """The function, arguments and random state of one checkpointed call."""

    def __init__(self, fn, args, kwargs, preserve_rng_state):
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.preserve_rng_state = preserve_rng_state
        self.rng_states = None
        self.touched = []
        self.structure = None

    def tensors(self):
        """Return the Tensor arguments, positional then keyword."""
        values = list(self.args) + list(self.kwargs.values())
        return [v for v in values if isinstance(v, Tensor)]

    def run_unrecorded(self):
        """Run ``fn`` with recording off, noting the outside tensors it reads."""
        if self.preserve_rng_state:
            for t in self.tensors():
                _random.generator_for(t.device)
            self.rng_states = _random.all_rng_states()
        # NOTE: the hook lists are global, so two threads that checkpoint at
        # the same time would see each other's captured tensors.
        _function.unrecorded_hooks.append(self._note_touched)
        try:
            with _grad_mode.no_grad():
                outputs = self.fn(*self.args, **self.kwargs)
        finally:
            _function.unrecorded_hooks.remove(self._note_touched)
        return outputs

    def _note_touched(self, tensors):
        self.touched.extend(t for t in tensors if t._requires_grad)

    def external_tensors(self):
        """Return the arguments and captured tensors, each once, in a fixed order."""
        seen = set()
        externals = []
        for t in self.tensors() + self.touched:
            if id(t) not in seen:
                seen.add(id(t))
                externals.append(t)
        self.touched = []
        # From here on the arguments live in the record's saved tensors only.
        _number_slots(self, externals)
        return externals

    def attach(self, outputs, externals):
        """Return ``outputs`` as outputs of one checkpoint record on the tape."""
        single = isinstance(outputs, Tensor)
        items = [outputs] if single else _output_items(outputs)
        arrays = tuple(v.data for v in items if isinstance(v, Tensor))
        if not arrays:
            raise TypeError(
                "checkpoint: fn returned no Tensor, so nothing can carry a "
                f"gradient (got {type(outputs).__name__}). Return the Tensors "
                "that later code differentiates."
            )
        # The template keeps the non-Tensor outputs; _TENSOR marks the others.
        template = [_TENSOR if isinstance(v, Tensor) else v for v in items]
        self.structure = (single, type(outputs), template, len(externals))
        self.pending = arrays
        try:
            # One None argument per output Tensor reserves an edge that a
            # create_graph backward points at the recomputed output.
            placeholders = [None] * self.output_count()
            tensors = _Checkpoint.apply(self, *externals, *placeholders)
        finally:
            self.pending = None
        return self.rebuild_outputs(tensors)

    def output_count(self):
        return sum(1 for v in self.structure[2] if v is _TENSOR)

    def rebuild_outputs(self, tensors):
        single, kind, template, _ = self.structure
        if single:
            return tensors
        tensors = iter(tensors if isinstance(tensors, tuple) else (tensors,))
        values = [next(tensors) if v is _TENSOR else v for v in template]
        return tuple(values) if kind is tuple else values

    def recompute(self, externals):
        """Run ``fn`` again with recording on; return its Tensor outputs and records."""
        proxies = _proxies_for(externals)
        args, kwargs = self._arguments(externals, proxies)
        records = []
        _function.record_hooks.append(records.append)
        try:
            with self._replaying():
                outputs = self.fn(*args, **kwargs)
        finally:
            _function.record_hooks.remove(records.append)
        items = [outputs] if isinstance(outputs, Tensor) else _output_items(outputs)
        tensors = [v for v in items if isinstance(v, Tensor)]
        if len(tensors) != self.output_count():
            raise GraphError(
                f"checkpoint: fn returned {len(tensors)} Tensor(s) when "
                "recomputed in backward, but a different number in the "
                "forward. fn must run the same ops both times."
            )
        _cut_region_edges(records, proxies)
        return tensors, records, proxies

    def _arguments(self, externals, proxies):
        def substitute(value):
            if isinstance(value, _Slot):
                t = externals[value.index]
                return proxies.get(_edge_key(t), t)
            return value

        args = tuple(substitute(v) for v in self.args)
        kwargs = {k: substitute(v) for k, v in self.kwargs.items()}
        return args, kwargs

    @contextlib.contextmanager
    def _replaying(self):
        _state.recomputed = recompute_count() + 1
        states = self.rng_states if self.preserve_rng_state else None
        with recomputing(states), _grad_mode.enable_grad():
            yield


@contextlib.contextmanager
def recomputing(rng_states=None):
    """Mark the block as a recomputation, replaying ``rng_states`` when given.

    ``is_recomputing()`` returns True inside the block. ``rng_states`` (from
    ``_random.all_rng_states``) become the random state of every device for
    the block, and the states from before it come back on exit.
    """
    current = None
    if rng_states is not None:
        current = _random.all_rng_states()
        _random.set_all_rng_states(rng_states)
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
        if current is not None:
            _random.set_all_rng_states(current)


class _Slot:
    """Marks where a Tensor argument sits, so the region does not hold it."""

    __slots__ = ("index",)

    def __init__(self, index):
        self.index = index


def _number_slots(region, externals):
    """Replace the Tensor arguments of ``region`` by their index in ``externals``."""
    index = {id(t): i for i, t in enumerate(externals)}

    def slot(value):
        return _Slot(index[id(value)]) if isinstance(value, Tensor) else value

    region.args = tuple(slot(v) for v in region.args)
    region.kwargs = {k: slot(v) for k, v in region.kwargs.items()}


@never_replayed
class _Checkpoint(Function):
    """The tape record of a checkpointed region."""

    @staticmethod
    def forward(ctx, region, *arrays):
        ctx.region = region
        count = ctx.external_count = region.structure[3]
        ctx.passes_through = False
        outputs = region.pending
        ctx.save_for_backward(*arrays[:count])
        integer = [o for o in outputs if o.dtype.kind not in "fc"]
        if integer:
            ctx.mark_non_differentiable(*integer)
        return outputs[0] if region.structure[0] else outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        if ctx.passes_through:
            ctx._check_readable()
            return _pass_through(ctx, grad_outputs)
        # Raises if freed or changed in place since the forward.
        externals = list(ctx._saved_values())
        create_graph = isinstance(grad_outputs[0], Tensor)
        grads, outputs = _backward_region(
            ctx.region, externals, grad_outputs, create_graph
        )
        if outputs is not None:
            _point_at_recomputed(ctx, outputs)
        return (None, *grads, *([None] * len(grad_outputs)))


def _point_at_recomputed(ctx, outputs):
    # The engine reads ctx.edges again after this backward returns, but the
    # placeholder edges receive None from it, so only later passes use them.
    first = 1 + ctx.external_count
    for k, output in enumerate(outputs):
        if output.grad_fn is not None:
            edge = (output.grad_fn, output._out_index)
        elif output._requires_grad:
            edge = output
        else:
            continue
        ctx.edges[first + k] = edge
        ctx.input_meta[first + k] = (output.data.shape, output.data.dtype)
    ctx.passes_through = True


def _pass_through(ctx, grad_outputs):
    """Return the gradients of a record that now leads into its recomputed graph."""
    count = ctx.external_count
    grads = [None] * (1 + count)
    for i in range(1, 1 + count):
        # The engine counts an edge to a record as one gradient that record
        # waits for, so it gets zeros. The real gradient of that tensor
        # arrives through the recomputed graph.
        if type(ctx.edges[i]) is tuple:
            shape, dtype = ctx.input_meta[i]
            grads[i] = ctx.xp.zeros(shape, dtype=dtype)
    return (*grads, *grad_outputs)


def _backward_region(region, externals, grad_outputs, create_graph):
    """Recompute the region and backpropagate through it.

    Returns the gradients of ``externals`` and, under ``create_graph``, the
    recomputed outputs (None otherwise, or when nothing was backpropagated).
    """
    outputs, records, proxies = region.recompute(externals)
    roots, root_grads = [], []
    for output, grad in zip(outputs, grad_outputs):
        if output._requires_grad:
            roots.append(output)
            root_grads.append(grad)
    targets = [proxies.get(_edge_key(t), t) for t in externals]
    wanted = [i for i, t in enumerate(externals) if t._requires_grad]
    grads = [None] * len(externals)
    if not roots or not wanted:
        return grads, None
    _function.record_hooks.append(records.append)
    try:
        found = _engine.run_backward(
            roots, root_grads, retain_graph=create_graph, create_graph=create_graph,
            inputs=[targets[i] for i in wanted], allow_unused=True,
        )
    finally:
        _function.record_hooks.remove(records.append)
    if create_graph:
        _splice_proxies(records, proxies)
    for i, grad in zip(wanted, found):
        if grad is not None:
            grads[i] = grad if create_graph else grad.data
    return grads, (outputs if create_graph else None)


def _edge_key(t):
    return None if t.grad_fn is None else (t.grad_fn, t._out_index)


def _proxies_for(externals):
    """Map each outside tensor that has a graph to a leaf sharing its array."""
    proxies = {}
    for t in externals:
        key = _edge_key(t)
        if key is not None and key not in proxies:
            proxy = t.detach()
            proxy._requires_grad = True
            memory.mark_activation(t.data)
            proxy._hooks = None
            proxies[key] = proxy
    return proxies


def _cut_region_edges(records, proxies):
    # An edge from a recomputed record to a record outside the region (a
    # captured tensor with a graph) is pointed at that tensor's proxy. The
    # edges are copied into a new list first, because an elementwise op's C
    # record keeps them in a tuple.
    inside = set(records)
    for record in records:
        edges = record.edges = list(record.edges)
        for i, edge in enumerate(edges):
            if type(edge) is tuple and edge[0] not in inside:
                proxy = proxies.get(edge)
                if proxy is None:
                    raise GraphError(
                        f"checkpoint: the recomputed op '{record.name}' reads a "
                        "tensor from outside the region that the forward did "
                        "not read. fn must run the same ops both times."
                    )
                edges[i] = proxy


def _splice_proxies(records, proxies):
    # Under create_graph the gradients' own graph must reach the real
    # tensors, so every edge to a proxy goes back to its tensor's record, and
    # each proxy takes that record as its grad_fn for records made later.
    by_id = {id(p): key for key, p in proxies.items()}
    for record in records:
        edges = record.edges = list(record.edges)
        for i, edge in enumerate(edges):
            key = by_id.get(id(edge))
            if key is not None and type(edge) is not tuple:
                edges[i] = key
    for key, proxy in proxies.items():
        proxy.grad_fn, proxy._out_index = key


def _output_items(outputs):
    if isinstance(outputs, (tuple, list)):
        return list(outputs)
    raise TypeError(
        "checkpoint: fn must return a Tensor or a tuple or list of values, got "
        f"{type(outputs).__name__}."
    )
