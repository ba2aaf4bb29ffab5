"""The backward engine: walks the tape in reverse topological order.

The walk is iterative (no recursion, so a chain of any length works) and
counts, for every record it can reach, how many downstream uses feed it. A
record runs only once all of them have delivered their gradient, so the
gradient of a value used several times is summed before it flows further.
"""

import gc
import sys

import numpy as np

from .. import _fastpath
from ..errors import GraphError
from . import _grad_mode
from ._function import Context

__all__ = ["run_backward"]

Tensor = None  # set by gradflow._tensor
make_tensor = None
tensor_namespace = None
array_namespace = None

# Called as anomaly_hook(record, grad_outputs, grad_inputs) after every
# backward while gradflow.anomaly's detection is on; None otherwise.
anomaly_hook = None

# The C extension's walk, set by gradflow._fastpath.bind(); it runs a plain
# backward (no create_graph, no inputs, no anomaly detection) as _run does.
fast_backward = None


def run_backward(roots, root_grads, retain_graph, create_graph, inputs=None,
                 allow_unused=False):
    """Backpropagate ``root_grads`` from the Tensors ``roots``.

    With ``inputs`` None, gradients accumulate into ``.grad`` of the leaves
    (``Tensor.backward``). Otherwise the gradients of ``inputs`` are returned
    and no ``.grad`` changes (``gradflow.grad``).
    """
    if create_graph:
        # The gradients will carry graphs that refer back into this one.
        _fastpath.track_records()
    # The walk allocates many small containers while the whole graph is
    # alive, and each automatic collection would traverse that graph again.
    # The walk creates no reference cycles, so collection waits until it ends.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _run(roots, root_grads, retain_graph, create_graph, inputs,
                    allow_unused)
    finally:
        if collecting:
            gc.enable()


def _run(roots, root_grads, retain_graph, create_graph, inputs, allow_unused):
    if retain_graph is None:
        retain_graph = create_graph
    if (fast_backward is not None and inputs is None and not create_graph
            and anomaly_hook is None):
        # NotImplemented: the graph contains a node that is not a record, which
        # the walk below handles (or rejects with its own error).
        if fast_backward(list(roots), list(root_grads), retain_graph) is None:
            return None
    captures = _capture_table(inputs) if inputs is not None else None
    results = {}
    buffers = {}
    leaf_grads = []
    for root, grad in zip(roots, root_grads):
        if root.grad_fn is None:
            _deliver_leaf(root, grad, captures, results, leaf_grads, create_graph)
        else:
            _add_to_buffer(buffers, root.grad_fn, root._out_index, grad)

    dependencies = _count_dependencies(buffers)
    ready = [node for node in buffers if dependencies.get(node, 0) == 0]
    with _grad_mode.set_grad_enabled(create_graph):
        while ready:
            node = ready.pop()
            slots = buffers.pop(node)
            if len(slots) == 1 and slots[0] is not None:
                grads = slots
            else:
                grads = _collect_output_grads(node, slots, create_graph)
            if node._hooks or node._retained or captures:
                _run_output_hooks(node, grads, captures, results)
            if create_graph:
                grad_inputs = _call_backward(node, grads, create_graph)
            else:
                # The first-order path of _call_backward, inline: it runs once
                # per record.
                node.xp = array_namespace(node.array_module)
                grad_inputs = node.function.backward(node, *grads)
                if type(grad_inputs) is not tuple:
                    grad_inputs = (grad_inputs,)
                if len(grad_inputs) != len(node.edges):
                    _raise_gradient_count(node, grad_inputs)
            if anomaly_hook is not None:
                anomaly_hook(node, grads, grad_inputs)
            if not retain_graph:
                node.release()
            for edge, meta, grad in zip(node.edges, node.input_meta, grad_inputs):
                if edge is None:
                    continue
                if grad is None:
                    if type(edge) is tuple:
                        _skip_edge(edge[0], dependencies, buffers, ready)
                    continue
                if grad.shape != meta[0] or grad.dtype != meta[1]:
                    grad = _fit_to_input(node, grad, meta)
                if type(edge) is tuple:
                    parent = edge[0]
                    _add_to_buffer(buffers, parent, edge[1], grad)
                    dependencies[parent] -= 1
                    if dependencies[parent] == 0:
                        ready.append(parent)
                else:
                    _deliver_leaf(edge, grad, captures, results, leaf_grads,
                                  create_graph)
    # The loop's last gradients would otherwise count as holders of the
    # arrays that _store_leaf_grads may keep without a copy.
    grad = grads = slots = grad_inputs = None
    _store_leaf_grads(leaf_grads, create_graph)
    if inputs is None:
        return None
    return _gather_results(inputs, results, allow_unused)


def _skip_edge(parent, dependencies, buffers, ready):
    """Count an edge that carried no gradient as delivered.

    A record becomes ready once every use of its outputs has reported, with
    a gradient or without. One that ends up with no gradient at all never
    runs, but still reports to its own parents, so they are not left
    waiting for it.
    """
    stack = [parent]
    while stack:
        node = stack.pop()
        if node not in dependencies:
            # An edge attached during this walk (a checkpoint connects its
            # recomputed outputs so), which no count included.
            continue
        dependencies[node] -= 1
        if dependencies[node]:
            continue
        if node in buffers:
            ready.append(node)
        else:
            stack.extend(edge[0] for edge in node.edges if type(edge) is tuple)


def _capture_table(inputs):
    # gf.grad's inputs, keyed by where their gradient is known in full: the
    # leaf Tensor itself, or the (record, output index) that produced it.
    table = {}
    for position, t in enumerate(inputs):
        key = id(t) if t.grad_fn is None else (t.grad_fn, t._out_index)
        table.setdefault(key, []).append(position)
    return table


def _count_dependencies(starts):
    # A record enters the table on its first edge, so the table also marks
    # what the walk has seen; the starts are marked beforehand.
    dependencies = {}
    count_of = dependencies.get
    stack = list(starts)
    while stack:
        node = stack.pop()
        for edge in node.edges:
            if type(edge) is tuple:
                parent = edge[0]
                count = count_of(parent)
                if count is None:
                    dependencies[parent] = 1
                    if parent not in starts:
                        stack.append(parent)
                else:
                    dependencies[parent] = count + 1
    return dependencies


def _add_to_buffer(buffers, node, index, grad):
    slots = buffers.get(node)
    if slots is None:
        slots = buffers[node] = [None] * len(node.out_meta)
    current = slots[index]
    slots[index] = grad if current is None else _sum_grads(current, grad)


def _sum_grads(current, grad):
    """Return the sum of two gradients of one output (the C walk uses it too)."""
    return current + grad


def _collect_output_grads(node, slots, create_graph):
    # Outputs that received no gradient get zeros, so every backward sees one
    # gradient per output.
    grads = []
    for grad, (shape, dtype) in zip(slots, node.out_meta):
        if grad is None:
            xp = _namespace_for(node, create_graph)
            grad = xp.zeros(shape, dtype=dtype)
        grads.append(grad)
    return grads


def _namespace_for(node, create_graph):
    if create_graph:
        return tensor_namespace(node.array_module)
    return array_namespace(node.array_module)


def _run_output_hooks(node, grads, captures, results):
    if node._hooks:
        for index, hooks in node._hooks.items():
            for hook in hooks:
                replaced = hook(_as_tensor(grads[index]))
                if replaced is not None:
                    grads[index] = _unwrap_like(replaced, grads[index])
    if node._retained and captures is None:
        for index, ref in node._retained.items():
            target = ref()
            if target is not None:
                _accumulate_into(target, grads[index], detach=True)
    if captures:
        for index in range(len(grads)):
            for position in captures.get((node, index), ()):
                results[position] = grads[index]


def _call_backward(node, grads, create_graph):
    backward = node.function.backward
    if create_graph and getattr(backward, "once_differentiable", False):
        grads = [g.data for g in grads]
        with _grad_mode.no_grad():
            node.xp = _namespace_for(node, False)
            out = backward(node, *grads)
    elif create_graph:
        grads = [g if isinstance(g, Tensor) else make_tensor(g) for g in grads]
        node.xp = _namespace_for(node, True)
        out = backward(node, *grads)
    else:
        node.xp = _namespace_for(node, False)
        out = backward(node, *grads)
    if type(out) is not tuple:
        out = (out,)
    if len(out) != len(node.edges):
        _raise_gradient_count(node, out)
    return out


def _raise_gradient_count(node, out):
    raise GraphError(
        f"backward of '{node.name}' returned {len(out)} gradient(s), but "
        f"its forward took {len(node.edges)} positional argument(s); "
        "return one gradient (or None) per argument."
    )


def _fit_to_input(node, grad, meta):
    """Sum a broadcast gradient back to its input's shape and dtype."""
    shape, dtype = meta
    if grad.shape != shape:
        grad = _sum_to_shape(node, grad, shape)
    if grad.dtype != dtype:
        grad = grad.astype(dtype)
    return grad


def _sum_to_shape(node, grad, shape):
    extra = grad.ndim - len(shape)
    if extra < 0:
        raise GraphError(
            f"backward of '{node.name}' returned a gradient of shape "
            f"{tuple(grad.shape)} for an input of shape {shape}."
        )
    axes = tuple(range(extra)) + tuple(
        extra + i for i, n in enumerate(shape) if n == 1 and grad.shape[extra + i] != 1
    )
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    if extra:
        grad = grad.reshape(shape)
    if grad.shape != shape:
        raise GraphError(
            f"backward of '{node.name}' returned a gradient of shape "
            f"{tuple(grad.shape)}, which does not broadcast to its input's "
            f"shape {shape}."
        )
    return grad


def _deliver_leaf(leaf, grad, captures, results, leaf_grads, create_graph):
    if captures is not None:
        for position in captures.get(id(leaf), ()):
            previous = results.get(position)
            results[position] = grad if previous is None else previous + grad
        return
    leaf_grads.append((leaf, grad))


def _store_leaf_grads(leaf_grads, create_graph):
    # A leaf may receive several contributions in one walk; hooks see their
    # sum, once, as PyTorch's accumulation node does.
    totals = {}
    order = []
    for leaf, grad in leaf_grads:
        key = id(leaf)
        if key in totals:
            totals[key][1] = totals[key][1] + grad
        else:
            totals[key] = [leaf, grad]
            order.append(key)
    # From here on ``totals`` holds the only references the walk made.
    leaf_grads.clear()
    for key in order:
        leaf, grad = totals.pop(key)
        if leaf._hooks:
            for hook in leaf._hooks:
                replaced = hook(_as_tensor(grad))
                if replaced is not None:
                    grad = _unwrap_like(replaced, grad)
        if leaf._grad is None and leaf._grad_buffer is None and _unshared(grad):
            # The array was made for this leaf alone, so it becomes the
            # gradient without the copy _accumulate_into would make.
            leaf.grad = make_tensor(grad)
            continue
        _accumulate_into(leaf, grad, detach=not create_graph)


def _unshared(grad):
    """True if ``grad`` is a NumPy array that only the caller's local refers to.

    Any other holder (another input given the same array, a view of it, the
    caller of backward who passed it as the root gradient, a hook that kept
    it) adds a reference.
    """
    return (
        type(grad) is np.ndarray and grad.base is None and grad.flags.writeable
        and sys.getrefcount(grad) <= _LOCAL_ONLY
    )


def _count_in_callee(array):
    return sys.getrefcount(array)


def _count_for_a_local():
    value = np.empty(0)
    return _count_in_callee(value)


# The count _unshared's sys.getrefcount gives for an array that one local of its
# caller refers to: the same call shape, measured, because the number
# differs between Python versions.
_LOCAL_ONLY = _count_for_a_local()


def _accumulate_into(target, grad, detach):
    if isinstance(grad, Tensor):
        if detach:
            grad = grad.data
        elif target.grad is None:
            # The same gradient Tensor may reach several leaves, so each gets
            # its own: a recorded copy when it carries a graph.
            if grad.grad_fn is None:
                target.grad = make_tensor(grad.data.copy())
            else:
                with _grad_mode.enable_grad():
                    target.grad = grad.clone()
            return
        else:
            target.grad = target.grad + grad
            return
    if target.grad is None:
        buffer = target._grad_buffer
        if buffer is not None and buffer._fill(target, grad):
            return
        # Copy, because the engine may hand the same array to several inputs
        # (an add passes its gradient through unchanged).
        target.grad = make_tensor(grad.copy())
    elif target.grad.grad_fn is not None:
        target.grad = target.grad + make_tensor(grad)
    else:
        target.grad.data += grad
        target.grad._version[0] += 1


def _as_tensor(grad):
    return grad if isinstance(grad, Tensor) else make_tensor(grad)


def _unwrap_like(replaced, original):
    if isinstance(original, Tensor):
        return replaced if isinstance(replaced, Tensor) else make_tensor(replaced)
    return replaced.data if isinstance(replaced, Tensor) else replaced


def _gather_results(inputs, results, allow_unused):
    out = []
    for position, t in enumerate(inputs):
        grad = results.get(position)
        if grad is None and not allow_unused:
            raise GraphError(
                f"input {position} (shape {tuple(t.shape)}) of gf.grad is not "
                "reached by backward from the outputs, so it has no gradient. "
                "Pass allow_unused=True to get None for it instead."
            )
        if grad is not None and not isinstance(grad, Tensor):
            grad = make_tensor(grad)
        out.append(grad)
    return tuple(out)
