"""Exceptions for misuse of the autograd graph.

Bad input values raise the built-in ``ValueError``, ``TypeError`` or
``RuntimeError``; the classes here mark mistakes in how the graph is used,
so callers can tell the two apart. Each subclasses ``RuntimeError``, which is
what PyTorch raises in the same situations.
"""

__all__ = ["GraphError", "GraphFreedError", "InplaceModificationError", "PerformanceWarning"]


class GraphError(RuntimeError):
    """A backward or grad call that the recorded graph cannot serve."""


class GraphFreedError(GraphError):
    """Backward reached a record whose saved arrays were already released."""


class InplaceModificationError(GraphError):
    """An array saved for backward was changed in place after it was saved."""


class PerformanceWarning(UserWarning):
    """gradflow fell off a fast path (a copy, a fallback kernel) for this input."""
