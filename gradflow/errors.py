"""Exceptions for misuse of the autograd graph.

Bad input values raise the built-in ``ValueError``, ``TypeError`` or
``RuntimeError``; the classes here mark mistakes in how the graph is used,
so callers can tell the two apart. Each subclasses ``RuntimeError``, which is
what PyTorch raises in the same situations.
"""

__all__ = [
    "AnomalyError", "GraphError", "GraphFreedError", "InplaceModificationError",
    "PerformanceWarning",
]


class GraphError(RuntimeError):
    """A backward or grad call that the recorded graph cannot serve."""


class GraphFreedError(GraphError):
    """Backward reached a record whose saved arrays were already released."""


class InplaceModificationError(GraphError):
    """An array saved for backward was changed in place after it was saved."""


class AnomalyError(RuntimeError):
    """Anomaly detection found a NaN or Inf (see ``gradflow.anomaly``).

    ``op`` is the op's name, ``phase`` is "forward" or "backward", ``source``
    is the ``(filename, lineno)`` of the user code that created the op (None
    when unknown), and ``from_input`` is True when the value was already
    non-finite in an input rather than produced by the op.
    """

    def __init__(self, message, op=None, phase=None, source=None, from_input=False):
        super().__init__(message)
        self.op = op
        self.phase = phase
        self.source = source
        self.from_input = from_input


class PerformanceWarning(UserWarning):
    """gradflow fell off a fast path (a copy, a fallback kernel) for this input."""
