"""Reverse-mode automatic differentiation: the tape, its records and the engine.

``Function`` is the extension API (how to define a new differentiable op);
``grad``, ``backward`` and the grad-mode switches are the user API;
``graph.saved_tensors_hooks`` changes how records keep what they save.
"""

from . import graph
from ._api import backward, grad
from ._function import Context, Function, once_differentiable
from ._grad_mode import enable_grad, is_grad_enabled, no_grad, set_grad_enabled
from ._gradcheck import gradcheck

__all__ = [
    "Context", "Function", "backward", "enable_grad", "grad", "gradcheck", "graph",
    "is_grad_enabled", "no_grad", "once_differentiable", "set_grad_enabled",
]
