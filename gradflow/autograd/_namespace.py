"""The ``ctx.xp`` that backward formulas are written against.

During a plain backward, ``ctx.xp`` is an ``ArrayNamespace``: NumPy or CuPy,
plus the few functions they lack. During a recorded backward
(``create_graph=True``) it is a ``TensorNamespace`` with the same names and
signatures, whose functions are gradflow's differentiable ops. One formula
therefore serves first- and higher-order gradients.
"""

import functools

import numpy as np

from .. import _special

__all__ = ["array_namespace", "tensor_namespace"]


class ArrayNamespace:
    """NumPy or CuPy, with ``erf``, ``sigmoid`` and ``index_scatter`` added."""

    def __init__(self, xp):
        self._xp = xp

    def __getattr__(self, name):
        value = getattr(self._xp, name)
        setattr(self, name, value)  # later lookups skip __getattr__
        return value

    @staticmethod
    def erf(x):
        return _special.erf(x)

    def sigmoid(self, x):
        from .._ops._unary import stable_sigmoid

        return stable_sigmoid(self._xp, x)

    @staticmethod
    def index_scatter(grad, shape, index):
        from .._ops._index import IndexScatter

        return IndexScatter.forward(None, grad, shape, index)


class TensorNamespace:
    """The functions of ``ArrayNamespace`` as differentiable gradflow ops."""

    def __init__(self, xp):
        self._xp = xp
        import gradflow as gf

        for name in (
            "exp", "log", "sqrt", "abs", "sign", "sin", "cos", "tanh",
            "sigmoid", "erf", "where", "maximum", "minimum", "sum",
            "broadcast_to", "reshape", "swapaxes", "transpose", "matmul",
            "expand_dims", "concatenate", "stack", "square", "log1p", "mean",
        ):
            setattr(self, name, getattr(gf, name))

    def _wrap(self, array):
        from .._tensor import make_tensor

        return make_tensor(array)

    def zeros(self, shape, dtype=None):
        return self._wrap(self._xp.zeros(shape, dtype=dtype))

    def ones(self, shape, dtype=None):
        return self._wrap(self._xp.ones(shape, dtype=dtype))

    def zeros_like(self, t):
        return self._wrap(self._xp.zeros_like(t.data))

    def ones_like(self, t):
        return self._wrap(self._xp.ones_like(t.data))

    def asarray(self, value, dtype=None):
        return self._wrap(self._xp.asarray(value, dtype=dtype))

    def __getattr__(self, name):
        # Constants and dtypes (xp.float32, xp.pi) mean the same in both modes.
        value = getattr(self._xp, name)
        if callable(value) and not isinstance(value, type):
            raise AttributeError(
                f"ctx.xp.{name} has no differentiable gradflow version, so it "
                "cannot be used in a backward recorded with create_graph=True. "
                "Write the formula with gradflow ops, or mark the backward "
                "@gf.autograd.once_differentiable."
            )
        return value

    @staticmethod
    def index_scatter(grad, shape, index):
        from .._ops._index import IndexScatter

        return IndexScatter.apply(grad, shape, index)


@functools.lru_cache(maxsize=8)
def array_namespace(xp):
    return ArrayNamespace(xp if xp is not None else np)


@functools.lru_cache(maxsize=8)
def tensor_namespace(xp):
    return TensorNamespace(xp if xp is not None else np)
