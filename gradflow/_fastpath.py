"""The optional C extension, gradflow._C, and the switch that binds it.

gradflow runs in pure Python when the extension is missing (it did not
compile) or when ``GRADFLOW_PURE_PYTHON=1`` is set before import. With it,
the elementwise ops on CPU float tensors (``+ - * /``, negation, exp, log,
sqrt, sin, cos, tanh, sigmoid, relu) record themselves in C, the plain
backward walk runs in C, and the grad-mode flag lives in C. The Python
code stays the reference: every case the C path does not cover calls it,
and both give bitwise equal results.

The extension also keeps the arenas that Python's object allocator frees
(csrc/arenas.c), so that a graph built after the last one was freed reuses
their pages instead of faulting in new ones. ``GRADFLOW_ARENA_CACHE_MB``,
set before import, says how much it keeps (default 256 MiB; 0 turns the
cache off).
"""

import contextlib
import os

ARENA_CACHE_MB = 256

__all__ = [
    "arena_cache_limit", "extension", "fast_op", "fast_path", "bind", "enabled", "set_enabled", "track_records",
]

extension = None
if os.environ.get("GRADFLOW_PURE_PYTHON", "") in ("", "0"):
    try:
        from . import _C as extension
    except ImportError:  # not compiled: the pure-Python path serves
        extension = None


def fast_op(name, fallback, reflected=False):
    """Return ``fallback`` with a C path for op ``name``, if the extension is there.

    ``reflected`` builds the operator form ``__rsub__(self, other)``, which
    computes ``other - self``.
    """
    if extension is None:
        return fallback
    return extension.FastOp(name, fallback, reflected)


def fast_path(name):
    """Decorate the Python function of op ``name`` with the C path (see fast_op)."""
    return lambda fallback: fast_op(name, fallback)


def bind():
    """Hand the extension gradflow's classes, hook lists and helpers."""
    if extension is None:
        return
    import gradflow_kernels
    import numpy as np

    from . import _device, _tensor, _views
    from ._ops import _activation, _arith, _unary
    from .autograd import _engine, _function, _namespace
    from .nn import _conv

    functions = {
        "add": _arith.Add, "sub": _arith.Sub, "mul": _arith.Mul,
        "div": _arith.Div, "neg": _arith.Neg, "exp": _unary.Exp,
        "log": _unary.Log, "sqrt": _unary.Sqrt, "sin": _unary.Sin,
        "cos": _unary.Cos, "tanh": _unary.Tanh, "sigmoid": _unary.Sigmoid,
        "relu": _activation.Relu,
    }
    ufuncs = {
        "exp": np.exp, "log": np.log, "sqrt": np.sqrt, "sin": np.sin,
        "cos": np.cos, "tanh": np.tanh, "relu": np.maximum,
    }
    extension.bind(
        tensor=_tensor.Tensor,
        context=_function.Context,
        function_globals=vars(_function),
        engine_globals=vars(_engine),
        functions=functions,
        ufuncs=ufuncs,
        numpy=np,
        numpy_namespace=_namespace.array_namespace(np),
        array_namespace=_namespace.array_namespace,
        stable_sigmoid=_unary.stable_sigmoid,
        # The activation backward formulas switch to the fused kernels at
        # this size, so the C loops stop there too.
        small_size=gradflow_kernels.CPU_MIN_SIZE,
        helpers={
            "python_apply": _function.python_apply,
            "make_tensor": _tensor.make_tensor,
            "array_module": _device.array_module,
            "refresh_view": _views.refresh,
            "check_devices": _tensor._check_devices,
        },
        # Classes that ops keep on their records for bookkeeping, which
        # refer to nothing but numbers and tuples.
        inert_types=(_device.Device, _conv.Geometry),
    )
    # Function.apply's bookkeeping in C; it calls the Python apply for the
    # cases it does not cover (hooks, anomaly detection, set_enabled(False)).
    _function.Function.apply = classmethod(extension.apply)
    set_enabled(True)
    if not extension.arena_cache_info()["installed"]:
        extension.cache_arenas(arena_cache_limit(os.environ))


def arena_cache_limit(environ):
    """Return the arena cache's limit in MiB: ``GRADFLOW_ARENA_CACHE_MB``, or the default."""
    setting = environ.get("GRADFLOW_ARENA_CACHE_MB", "").strip()
    if not setting:
        return ARENA_CACHE_MB
    try:
        limit = int(setting)
    except ValueError:
        limit = -1
    if limit < 0:
        raise ValueError(
            "GRADFLOW_ARENA_CACHE_MB must be a whole number of MiB, 0 or more "
            f"(0 turns the arena cache off); got {setting!r}"
        )
    return limit


def track_records():
    """Put the records of the C ops under Python's cyclic garbage collector.

    They start outside it, because collecting passes over a large graph of
    small ops cost more than the ops. A graph has no reference cycles until
    something refers from an earlier object to a later one: a hook's
    closure, a .grad that carries a graph, or a backward with
    create_graph=True. Those call this first, and from then on, for the rest
    of the process, every live and every new record is tracked, so that
    such cycles are collected.
    """
    if extension is not None:
        extension.track_records()


def set_enabled(enabled):
    """Switch the C ops and the C backward walk on or off; return the old setting.

    With them off, every op and backward runs the Python reference path
    (the grad-mode flag stays in C). Tests use this to compare both paths.
    Without the extension this does nothing and returns False.
    """
    if extension is None:
        return False
    from .autograd import _engine

    previous = extension.set_fast_ops(enabled)
    _engine.fast_backward = extension.run_backward if enabled else None
    return previous


@contextlib.contextmanager
def enabled(flag):
    """Run a block with the C ops and the C backward walk on or off (``set_enabled``)."""
    previous = set_enabled(flag)
    try:
        yield
    finally:
        set_enabled(previous)
