"""Stateless neural-network functions: activations, softmax, dropout and losses.

>>> import gradflow.nn.functional as F
>>> F.relu(gf.tensor([-1.0, 2.0]))
tensor([0., 2.])
"""

from .._ops import gelu, leaky_relu, relu, sigmoid, silu, softplus, tanh
from ._dropout import dropout
from ._layers import linear
from ._loss import (
    binary_cross_entropy, binary_cross_entropy_with_logits, cross_entropy,
    mse_loss, nll_loss, one_hot,
)
from ._softmax import log_softmax, softmax

__all__ = [
    "binary_cross_entropy", "binary_cross_entropy_with_logits", "cross_entropy",
    "dropout", "gelu", "leaky_relu", "linear", "log_softmax", "mse_loss",
    "nll_loss", "one_hot", "relu", "sigmoid", "silu", "softmax", "softplus",
    "tanh",
]
from ._attention import scaled_dot_product_attention

__all__ += ["scaled_dot_product_attention"]
from ._conv import conv1d, conv2d
from ._embedding import embedding
from ._norm import batch_norm, layer_norm
from ._pool import adaptive_avg_pool2d, avg_pool2d, max_pool2d

__all__ += [
    "adaptive_avg_pool2d", "avg_pool2d", "batch_norm", "conv1d", "conv2d",
    "embedding", "layer_norm", "max_pool2d",
]
