"""``gradflow.grad`` and ``gradflow.autograd.backward``: the functional entry points."""

from . import _engine

__all__ = ["grad", "backward"]


def _as_list(values, what):
    from .._tensor import Tensor

    if isinstance(values, Tensor):
        return [values]
    values = list(values)
    for i, v in enumerate(values):
        if not isinstance(v, Tensor):
            raise TypeError(f"{what}[{i}] must be a Tensor, got {type(v).__name__}")
    return values


def _root_grads(outputs, grad_outputs, create_graph, where):
    from .._tensor import _root_gradient

    if grad_outputs is None:
        grad_outputs = [None] * len(outputs)
    else:
        grad_outputs = [grad_outputs] if not isinstance(grad_outputs, (list, tuple)) \
            else list(grad_outputs)
    if len(grad_outputs) != len(outputs):
        raise ValueError(
            f"{where}: got {len(grad_outputs)} grad_outputs for {len(outputs)} outputs"
        )
    keyword = "grad_outputs" if where == "gf.grad" else "grad_tensors"
    return [
        _root_gradient(o, g, create_graph, where, keyword)
        for o, g in zip(outputs, grad_outputs)
    ]


def grad(outputs, inputs, grad_outputs=None, retain_graph=None, create_graph=False,
         allow_unused=False):
    """Return the gradients of ``outputs`` with respect to ``inputs``.

    Unlike ``backward``, no ``.grad`` attribute changes. With
    ``create_graph=True`` the returned gradients are themselves recorded, so
    they can be differentiated again (Hessian-vector products and the like).

    >>> (dx,) = gf.grad((x ** 3).sum(), [x])
    """
    from ..errors import GraphError

    outputs = _as_list(outputs, "outputs")
    single = not isinstance(inputs, (list, tuple))
    inputs = _as_list(inputs, "inputs")
    for i, t in enumerate(inputs):
        if not t.requires_grad:
            raise GraphError(
                f"gf.grad: inputs[{i}] (shape {tuple(t.shape)}) does not require "
                "grad, so no gradient flows to it; set requires_grad=True on it."
            )
    for i, o in enumerate(outputs):
        if not o.requires_grad:
            raise GraphError(
                f"gf.grad: outputs[{i}] does not require grad; it was not "
                "computed from any input that requires grad."
            )
    roots = _root_grads(outputs, grad_outputs, create_graph, "gf.grad")
    result = _engine.run_backward(
        outputs, roots, retain_graph, create_graph, inputs=inputs,
        allow_unused=allow_unused,
    )
    return result if not single else result


def backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False):
    """Accumulate gradients of several ``tensors`` into the leaves' ``.grad``."""
    tensors = _as_list(tensors, "tensors")
    roots = _root_grads(tensors, grad_tensors, create_graph, "backward")
    _engine.run_backward(tensors, roots, retain_graph, create_graph)
