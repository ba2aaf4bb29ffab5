"""Run a chain of layers under a binomial schedule, as one record on the tape.

The forward runs the schedule's first sweep unrecorded, storing snapshots,
and records only the last step. The backward runs the rest of the schedule:
it advances from snapshots, and for each step in reverse order records the
step, backpropagates one step and frees its graph. The layers may read
parameters (leaf tensors), which are found while the forward runs.

The first run of each step saves the random state of every device, and
each later run of that step (all of them inside backward) restores it and
counts as a recomputation for ``is_recomputing()``. So dropout draws the
same mask every time and BatchNorm updates its running statistics once.
"""

import contextlib

from .. import _random, memory
from .._tensor import Tensor, make_tensor
from ..autograd import Function, _engine, _function, _grad_mode
from ._policy import never_replayed
from ._region import recomputing
from ._revolve import binomial_schedule
from ._sequential import chain

__all__ = ["run_binomial"]


def run_binomial(layers, x, snapshots, counter=None):
    """Apply ``layers`` to ``x``, reversed in backward by the binomial schedule."""
    actions = binomial_schedule(len(layers), snapshots)
    first_reverse = next(i for i, a in enumerate(actions) if a[0] == "reverse")
    runner = _Runner(layers, actions, first_reverse, counter)
    if not _grad_mode.is_grad_enabled():
        return chain(layers)(x)
    state, last = runner.forward_sweep(x)
    params = runner.parameters
    if not x._requires_grad and not any(p._requires_grad for p in params):
        return last[1].detach()
    runner.last = last
    return _Binomial.apply(runner, x, *params)


class _Runner:
    def __init__(self, layers, actions, first_reverse, counter):
        self.layers = layers
        self.actions = actions
        self.first_reverse = first_reverse
        self.counter = counter if counter is not None else {}
        self.counter.setdefault("advances", 0)
        self.parameters = []
        self.snapshots = {}
        self.rng_states = {}
        self.last = None

    def advance(self, index, state):
        self.counter["advances"] += 1
        with _grad_mode.no_grad(), self.running(index):
            return self.layers[index](state)

    def running(self, index):
        """Return the context for a run of step ``index``: its first, or a replay."""
        states = self.rng_states.get(index)
        if states is not None:
            return recomputing(states)
        self.rng_states[index] = _random.all_rng_states()
        return contextlib.nullcontext()

    def forward_sweep(self, x):
        # State 0 is the chain's input, which the record saves as its
        # argument. The snapshots dict keeps the others.
        self.input = x
        touched = []

        def note(tensors):
            touched.extend(t for t in tensors if t._requires_grad)

        _random.generator_for(x.device)
        _function.unrecorded_hooks.append(note)
        try:
            state = x.detach()
            self.snapshots = {}
            for kind, index in self.actions[: self.first_reverse]:
                if kind == "advance":
                    state = self.advance(index, state)
                elif kind == "store":
                    self.snapshots[index] = state.data
        finally:
            _function.unrecorded_hooks.remove(note)
        index = self.actions[self.first_reverse][1]
        last = self.record_step(index, state, touched)
        self.parameters = _unique_leaves(touched)
        return state, last

    def restore(self, ctx, index):
        array = self.input.data if index == 0 else ctx.snapshots[index]
        return make_tensor(array)

    def record_step(self, index, state, touched):
        # A leaf input keeps counting as leaf memory. Any other state is an
        # activation although the step reads it through a fresh leaf.
        if state.data is not self.input.data or self.input.grad_fn is not None:
            memory.mark_activation(state.data)
        with self.running(index):
            return _record_step(self.layers[index], state, touched)


def _record_step(layer, state, touched):
    """Run one step recorded on a fresh leaf and return (leaf, output)."""
    leaf = make_tensor(state.data)
    leaf._requires_grad = True
    records = []
    _function.record_hooks.append(records.append)
    try:
        with _grad_mode.enable_grad():
            out = layer(leaf)
    finally:
        _function.record_hooks.remove(records.append)
    for record in records:
        for edge in record.edges:
            if type(edge) is tuple and edge[0] not in records:
                raise NotImplementedError(
                    "checkpoint plan (binomial schedule): a layer reads a "
                    "tensor with a graph of its own from outside the chain, "
                    "but only parameters (leaf tensors) are supported there."
                )
            if edge is not None and type(edge) is not tuple and edge is not leaf:
                touched.append(edge)
    return leaf, out


def _unique_leaves(tensors):
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen and t.grad_fn is None and t._requires_grad:
            seen.add(id(t))
            out.append(t)
    return out


@never_replayed
class _Binomial(Function):
    """The tape record of a chain run under the binomial schedule."""

    @staticmethod
    def forward(ctx, runner, x, *params):
        ctx.runner = runner
        ctx.save_for_backward(x)
        ctx.snapshots = runner.snapshots
        ctx.last = runner.last
        runner.last = None
        return ctx.last[1].data

    @staticmethod
    def backward(ctx, grad_output):
        if isinstance(grad_output, Tensor):
            raise NotImplementedError(
                "checkpoint plan (binomial schedule): create_graph=True is not "
                "supported. Use gf.checkpoint or checkpoint_sequential for "
                "higher-order gradients."
            )
        runner = ctx.runner
        params = runner.parameters
        totals = {}
        grad = _step_backward(ctx.last, grad_output, params, totals)
        ctx.last = None
        memory.notify_attributes_changed(ctx)
        grad = _run_rest(ctx, runner, grad, totals)
        ctx.snapshots = {}
        memory.notify_attributes_changed(ctx)
        grad_x = grad if ctx.needs_input_grad[1] else None
        return (None, grad_x, *(totals.get(id(p)) for p in params))


def _run_rest(ctx, runner, grad, totals):
    state = None
    for kind, index in runner.actions[runner.first_reverse + 1:]:
        if kind == "advance":
            state = runner.advance(index, state)
        elif kind == "store":
            ctx.snapshots[index] = state.data
            memory.notify_attributes_changed(ctx)
        elif kind == "restore":
            state = runner.restore(ctx, index)
        elif kind == "drop":
            del ctx.snapshots[index]
            memory.notify_attributes_changed(ctx)
        else:
            step = runner.record_step(index, state, [])
            grad = _step_backward(step, grad, runner.parameters, totals)
            # Drop the step's graph now, so arrays its records keep in plain
            # attributes are freed before the next step is recorded.
            del step
    return grad


def _step_backward(step, grad, params, totals):
    leaf, out = step
    found = _engine.run_backward(
        [out], [grad], retain_graph=False, create_graph=False,
        inputs=[leaf, *params], allow_unused=True,
    )
    for param, g in zip(params, found[1:]):
        if g is not None:
            key = id(param)
            totals[key] = g.data if key not in totals else totals[key] + g.data
    return found[0].data
