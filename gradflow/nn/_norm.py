"""Normalization: batch norm over (N, C, ...) and layer norm over trailing axes.

Both are written with gradflow's differentiable ops (mean, var, sqrt and
arithmetic), so their gradients of every order come from those ops. The
running statistics of batch norm are updated in place on the buffers'
arrays, outside the graph.
"""

import numbers

import numpy as np

from .. import _ops
from .._factories import ones, zeros
from .._tensor import Tensor
from ._module import Module, Parameter

__all__ = [
    "batch_norm", "layer_norm", "BatchNorm1d", "BatchNorm2d", "LayerNorm",
]


# -- functional forms ---------------------------------------------------


def _channel_shape(x):
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def _check_channel_tensor(op, name, t, channels):
    if t is not None and tuple(t.shape) != (channels,):
        raise ValueError(
            f"{op}: {name} must have shape ({channels},) for an input with "
            f"{channels} channels, got {tuple(t.shape)}."
        )


def _update_running(running, batch_value, momentum):
    """Set ``running`` to (1 - momentum) * running + momentum * batch_value in place."""
    array = running.data
    array *= 1 - momentum
    array += momentum * batch_value.reshape(array.shape).astype(array.dtype)
    running._version[0] += 1


def _batch_statistics(op, x, axes, running_mean, running_var, momentum):
    count = x.data.size // x.shape[1]
    if count <= 1:
        raise ValueError(
            f"{op}: training needs more than one value per channel, got input "
            f"of shape {tuple(x.shape)}. Use a larger batch, or eval() mode."
        )
    mean = _ops.mean(x, axis=axes, keepdims=True)
    var = _ops.var(x, axis=axes, keepdims=True, correction=0)
    if running_mean is not None:
        _update_running(running_mean, mean.data, momentum)
    if running_var is not None:
        # The running estimate uses the unbiased variance, as PyTorch does.
        _update_running(running_var, var.data * (count / (count - 1)), momentum)
    return mean, var


def batch_norm(input, running_mean, running_var, weight=None, bias=None,
               training=False, momentum=0.1, eps=1e-5):
    """Normalize ``input`` (N, C, ...) per channel, then scale and shift.

    In training the mean and biased variance over every axis but C
    normalize the batch, and ``running_mean`` / ``running_var`` (C,), when
    given, move toward the batch mean and unbiased variance by
    ``momentum``. Otherwise the running statistics normalize the input.

    >>> x = gf.randn(8, 3)
    >>> F.batch_norm(x, None, None, training=True).mean(dim=0).abs().max().item() < 1e-5
    True
    """
    op = "batch_norm"
    if input.ndim < 2:
        raise ValueError(f"{op}: expected input (N, C, ...), got shape "
                         f"{tuple(input.shape)}.")
    channels = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        _check_channel_tensor(op, name, t, channels)
    shape = _channel_shape(input)
    if training:
        axes = (0,) + tuple(range(2, input.ndim))
        mean, var = _batch_statistics(op, input, axes, running_mean, running_var,
                                      momentum)
    elif running_mean is None or running_var is None:
        raise ValueError(f"{op}: running_mean and running_var are required when "
                         "training=False.")
    else:
        mean, var = running_mean.reshape(shape), running_var.reshape(shape)
    out = (input - mean) / _ops.sqrt(var + eps)
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


def _normalized_axes(op, input, normalized_shape):
    count = len(normalized_shape)
    if input.ndim < count or tuple(input.shape[input.ndim - count:]) \
            != normalized_shape:
        raise ValueError(
            f"{op}: normalized_shape {normalized_shape} must match the last "
            f"axes of the input, got input shape {tuple(input.shape)}."
        )
    return tuple(range(input.ndim - count, input.ndim))


def _as_shape(op, normalized_shape):
    if isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (normalized_shape,)
    shape = tuple(int(n) for n in normalized_shape)
    if any(n < 1 for n in shape):
        raise ValueError(f"{op}: normalized_shape must hold positive sizes, got "
                         f"{normalized_shape}")
    return shape


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Normalize ``input`` over its last ``len(normalized_shape)`` axes.

    The mean and biased variance are taken per leading index; ``weight`` and
    ``bias`` have shape ``normalized_shape``.

    >>> F.layer_norm(gf.randn(2, 5), (5,)).shape
    (2, 5)
    """
    op = "layer_norm"
    normalized_shape = _as_shape(op, normalized_shape)
    axes = _normalized_axes(op, input, normalized_shape)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != normalized_shape:
            raise ValueError(f"{op}: {name} must have shape {normalized_shape}, "
                             f"got {tuple(t.shape)}.")
    mean = _ops.mean(input, axis=axes, keepdims=True)
    var = _ops.var(input, axis=axes, keepdims=True, correction=0)
    out = (input - mean) / _ops.sqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


# -- layers -------------------------------------------------------------


def _is_recomputing():
    """Return True while a gradient checkpoint re-runs a forward pass."""
    try:
        from ..checkpoint import is_recomputing
    except ImportError:
        return False
    return is_recomputing()


class _BatchNorm(Module):
    _input_ranks = ()

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None):
        super().__init__()
        op = type(self).__name__
        if isinstance(num_features, bool) or not isinstance(num_features, int) \
                or num_features < 1:
            raise ValueError(f"{op}: num_features must be a positive int, got "
                             f"{num_features!r}")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        if affine:
            self.weight = Parameter(ones(num_features, device=device, dtype=dtype))
            self.bias = Parameter(zeros(num_features, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean",
                                 zeros(num_features, device=device, dtype=dtype))
            self.register_buffer("running_var",
                                 ones(num_features, device=device, dtype=dtype))
            self.register_buffer("num_batches_tracked",
                                 zeros(device=device, dtype=np.int64))
        else:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, None)

    def reset_running_stats(self):
        """Set the running mean to 0, the running variance to 1 and the count to 0."""
        if self.track_running_stats:
            self.running_mean.data[...] = 0
            self.running_var.data[...] = 1
            self.num_batches_tracked.data[...] = 0

    def reset_parameters(self):
        """Reset the running statistics, the weight to 1 and the bias to 0."""
        self.reset_running_stats()
        if self.affine:
            self.weight.data[...] = 1
            self.bias.data[...] = 0

    def _check_input(self, input):
        if not isinstance(input, Tensor) or input.ndim not in self._input_ranks:
            shape = tuple(input.shape) if isinstance(input, Tensor) else input
            raise ValueError(
                f"{type(self).__name__}: expected input of rank "
                f"{' or '.join(map(str, self._input_ranks))}, got {shape!r}."
            )
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}: input of shape {tuple(input.shape)} has "
                f"{input.shape[1]} channels on axis 1, but the layer was built "
                f"for num_features={self.num_features}."
            )

    def _momentum(self):
        """Return the update weight of this step, counting the batch if training."""
        if self.momentum is not None:
            return self.momentum
        # momentum=None: the running statistics are a cumulative average.
        return 1.0 / max(int(self.num_batches_tracked.data), 1)

    def forward(self, input):
        self._check_input(input)
        update = self.training and self.track_running_stats and not _is_recomputing()
        if update:
            self.num_batches_tracked.data += 1
        use_batch = self.training or not self.track_running_stats
        running_mean = running_var = None
        if update or not use_batch:
            running_mean, running_var = self.running_mean, self.running_var
        momentum = self._momentum() if self.track_running_stats else 0.0
        return batch_norm(input, running_mean, running_var, self.weight, self.bias,
                          use_batch, momentum, self.eps)

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")


class BatchNorm1d(_BatchNorm):
    """Batch normalization over (N, C) or (N, C, L) input; see ``batch_norm``.

    ``weight`` starts at 1 and ``bias`` at 0 (with ``affine``); the buffers
    ``running_mean`` (0), ``running_var`` (1) and ``num_batches_tracked``
    exist with ``track_running_stats``. ``momentum=None`` makes the running
    statistics a cumulative average over all training batches.

    >>> gf.nn.BatchNorm1d(4)(gf.randn(8, 4)).shape
    (8, 4)
    """

    _input_ranks = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch normalization over (N, C, H, W) input; see ``BatchNorm1d``.

    >>> gf.nn.BatchNorm2d(3)(gf.randn(2, 3, 4, 4)).shape
    (2, 3, 4, 4)
    """

    _input_ranks = (4,)


class LayerNorm(Module):
    """Layer normalization over the trailing ``normalized_shape`` axes.

    With ``elementwise_affine`` the layer has ``weight`` (ones) and, if
    ``bias``, ``bias`` (zeros), both of shape ``normalized_shape``.

    >>> gf.nn.LayerNorm(6)(gf.randn(2, 3, 6)).shape
    (2, 3, 6)
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True,
                 bias=True, device=None, dtype=None):
        super().__init__()
        self.normalized_shape = _as_shape("LayerNorm", normalized_shape)
        self.eps, self.elementwise_affine = eps, elementwise_affine
        shape = self.normalized_shape
        if elementwise_affine:
            self.weight = Parameter(ones(*shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        if elementwise_affine and bias:
            self.bias = Parameter(zeros(*shape, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def reset_parameters(self):
        """Set the weight to 1 and the bias to 0."""
        if self.weight is not None:
            self.weight.data[...] = 1
        if self.bias is not None:
            self.bias.data[...] = 0

    def forward(self, input):
        return layer_norm(input, self.normalized_shape, self.weight, self.bias,
                          self.eps)

    def extra_repr(self):
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}")
