"""gradflow's built-in differentiable operations, one family per module."""

from ._activation import gelu, leaky_relu, relu, silu, softplus
from ._arith import add, div, matmul, mul, neg, pow, sub
from ._index import getitem, index_put
from ._reduce import (
    amax, amin, argmax, argmin, logsumexp, max, mean, min, norm, std, sum, var,
)
from ._shape import (
    broadcast_to, cast, cat, chunk, clone, concatenate, expand, expand_dims,
    flatten, permute, reshape, split, squeeze, stack, swapaxes, transpose,
    unsqueeze,
)
from ._unary import (
    abs, clamp, cos, erf, exp, log, log1p, maximum, minimum, sigmoid, sign, sin,
    sqrt, square, tanh, where,
)

__all__ = [
    "abs", "add", "amax", "amin", "argmax", "argmin", "broadcast_to", "cast",
    "cat", "chunk", "clamp", "clone", "concatenate", "cos", "div", "erf", "exp",
    "expand", "expand_dims", "flatten", "gelu", "getitem", "index_put",
    "leaky_relu", "log", "log1p", "logsumexp", "matmul", "max", "maximum",
    "mean", "min", "minimum", "mul", "neg", "norm", "permute", "pow", "relu",
    "reshape", "sigmoid", "sign", "silu", "sin", "softplus", "split", "sqrt",
    "square", "squeeze", "stack", "std", "sub", "sum", "swapaxes", "tanh",
    "transpose", "unsqueeze", "var", "where",
]
