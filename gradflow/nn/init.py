"""In-place weight initializers that draw from gradflow's generators.

Each ``*_`` function overwrites its tensor's array in place, outside
autograd (as under ``no_grad``), keeps its ``requires_grad``, and returns
it. Draws come from the generator
of the tensor's device, so ``gf.manual_seed`` makes them reproducible.

>>> w = gf.nn.Parameter(gf.empty(64, 32))
>>> w = gf.nn.init.kaiming_uniform_(w, nonlinearity="relu")
"""

import math
import numbers

import numpy as np

from .. import _random
from .._special import erf
from .._tensor import Tensor

__all__ = [
    "calculate_gain", "uniform_", "normal_", "constant_", "zeros_", "ones_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_",
    "orthogonal_", "trunc_normal_",
]

_LINEAR_GAIN = (
    "linear", "identity", "sigmoid", "conv1d", "conv2d", "conv3d",
    "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
)


def calculate_gain(nonlinearity, param=None):
    """Return the standard-deviation gain recommended for ``nonlinearity``.

    linear, identity, the conv names and sigmoid: 1; tanh: 5/3; relu:
    sqrt(2); leaky_relu with slope ``param`` (default 0.01):
    sqrt(2 / (1 + param^2)); selu: 3/4.
    """
    if nonlinearity in _LINEAR_GAIN:
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3.0
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        return math.sqrt(2.0 / (1.0 + _leaky_slope(param) ** 2))
    if nonlinearity == "selu":
        return 0.75
    raise ValueError(
        f"calculate_gain: unsupported nonlinearity {nonlinearity!r}; expected one "
        f"of {', '.join(_LINEAR_GAIN)}, tanh, relu, leaky_relu or selu"
    )


def _leaky_slope(param):
    if param is None:
        return 0.01
    if isinstance(param, bool) or not isinstance(param, numbers.Real):
        raise ValueError(
            f"calculate_gain: the leaky_relu slope must be a number, got {param!r}"
        )
    return float(param)


def _fans(op, tensor):
    """Return (fan_in, fan_out) of a weight of shape (out, in, *kernel)."""
    if tensor.ndim < 2:
        raise ValueError(
            f"{op}: fan-in and fan-out need a tensor with at least 2 dimensions "
            f"(out_features, in_features, *kernel), got shape {tuple(tensor.shape)}. "
            "Use uniform_ or normal_ for biases and other 1-D tensors."
        )
    receptive_field = math.prod(tensor.shape[2:])
    # A zero fan (an empty tensor) becomes 1, and _fill_with writes nothing.
    fan_in = max(tensor.shape[1] * receptive_field, 1)
    fan_out = max(tensor.shape[0] * receptive_field, 1)
    return fan_in, fan_out


def _fan(op, tensor, mode):
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"{op}: mode must be 'fan_in' or 'fan_out', got {mode!r}")
    fan_in, fan_out = _fans(op, tensor)
    return fan_in if mode == "fan_in" else fan_out


def _check_tensor(op, tensor):
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{op}: expected a Tensor, got {type(tensor).__name__}")
    if tensor.dtype.kind != "f":
        raise TypeError(
            f"{op}: expected a floating-point tensor, got dtype {tensor.dtype}"
        )


def _fill_with(tensor, method, scale, shift):
    """Overwrite ``tensor``'s array with scale * draw + shift from its generator."""
    if tensor.data.size == 0:
        return tensor
    device = tensor.device
    generator = _random.generator_for(device).draw()
    draw_dtype = tensor.dtype if tensor.dtype != np.float16 else np.dtype(np.float32)
    with device:
        values = getattr(generator, method)(size=tensor.shape, dtype=draw_dtype)
        tensor.data[...] = values * scale + shift
    # An in-place write: graphs that saved the old values must notice.
    tensor._version[0] += 1
    return tensor


def uniform_(tensor, a=0.0, b=1.0):
    """Fill ``tensor`` with samples from the uniform distribution on [a, b)."""
    _check_tensor("uniform_", tensor)
    if a > b:
        raise ValueError(f"uniform_: a ({a}) must not exceed b ({b})")
    return _fill_with(tensor, "random", scale=b - a, shift=a)


def normal_(tensor, mean=0.0, std=1.0):
    """Fill ``tensor`` with samples from the normal distribution N(mean, std^2)."""
    _check_tensor("normal_", tensor)
    if std < 0:
        raise ValueError(f"normal_: std must be non-negative, got {std}")
    return _fill_with(tensor, "standard_normal", scale=std, shift=mean)


def constant_(tensor, val):
    """Fill ``tensor`` with the value ``val``."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"constant_: expected a Tensor, got {type(tensor).__name__}")
    tensor.data[...] = val
    tensor._version[0] += 1
    return tensor


def zeros_(tensor):
    """Fill ``tensor`` with zeros."""
    return constant_(tensor, 0)


def ones_(tensor):
    """Fill ``tensor`` with ones."""
    return constant_(tensor, 1)


def xavier_uniform_(tensor, gain=1.0):
    """Fill ``tensor`` from U(-a, a), a = gain * sqrt(6 / (fan_in + fan_out)).

    This is the Glorot (Xavier) scheme, which keeps the variance of
    activations and of gradients roughly equal across layers.
    """
    _check_tensor("xavier_uniform_", tensor)
    fan_in, fan_out = _fans("xavier_uniform_", tensor)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return _fill_with(tensor, "random", scale=2 * bound, shift=-bound)


def xavier_normal_(tensor, gain=1.0):
    """Fill ``tensor`` from N(0, std^2), std = gain * sqrt(2 / (fan_in + fan_out))."""
    _check_tensor("xavier_normal_", tensor)
    fan_in, fan_out = _fans("xavier_normal_", tensor)
    std = gain * math.sqrt(2.0 / (fan_in + fan_out))
    return _fill_with(tensor, "standard_normal", scale=std, shift=0.0)


def kaiming_uniform_(tensor, a=0.0, mode="fan_in", nonlinearity="leaky_relu"):
    """Fill ``tensor`` from U(-b, b), b = gain * sqrt(3 / fan).

    This is the He (Kaiming) scheme. ``fan`` is fan-in or fan-out per
    ``mode``, and the gain is ``calculate_gain(nonlinearity, a)``
    with ``a`` the negative slope of a leaky ReLU.
    """
    _check_tensor("kaiming_uniform_", tensor)
    fan = _fan("kaiming_uniform_", tensor, mode)
    bound = calculate_gain(nonlinearity, a) * math.sqrt(3.0 / fan)
    return _fill_with(tensor, "random", scale=2 * bound, shift=-bound)


def kaiming_normal_(tensor, a=0.0, mode="fan_in", nonlinearity="leaky_relu"):
    """Fill ``tensor`` from N(0, std^2), std = gain / sqrt(fan).

    ``a``, ``mode`` and ``nonlinearity`` mean what they do in kaiming_uniform_.
    """
    _check_tensor("kaiming_normal_", tensor)
    fan = _fan("kaiming_normal_", tensor, mode)
    std = calculate_gain(nonlinearity, a) / math.sqrt(fan)
    return _fill_with(tensor, "standard_normal", scale=std, shift=0.0)


def orthogonal_(tensor, gain=1.0):
    """Fill ``tensor`` with a random (semi-)orthogonal matrix times ``gain``.

    A tensor of shape (rows, *rest) is viewed as a (rows, cols) matrix with
    cols = prod(rest). Its rows are orthonormal when rows <= cols, and its
    columns otherwise. The matrix is the Q factor of the QR decomposition of
    a standard normal draw, with the signs fixed so that R has a positive
    diagonal, which makes Q uniform over the orthogonal matrices (Haar).
    The QR decomposition runs in float64.

    >>> w = gf.nn.init.orthogonal_(gf.empty(3, 5))
    >>> np.allclose((w @ w.T).numpy(), np.eye(3), atol=1e-6)
    True
    """
    _check_tensor("orthogonal_", tensor)
    if tensor.ndim < 2:
        raise ValueError(
            "orthogonal_: expected a tensor with at least 2 dimensions, got "
            f"shape {tuple(tensor.shape)}. Use normal_ for 1-D tensors."
        )
    if tensor.data.size == 0:
        return tensor
    rows = tensor.shape[0]
    cols = tensor.data.size // rows
    device = tensor.device
    generator = _random.generator_for(device).draw()
    xp = device.xp
    with device:
        draw = generator.standard_normal(size=(rows, cols), dtype=np.float64)
        # QR of a tall matrix: transpose a wide draw, and transpose Q back.
        q, r = xp.linalg.qr(draw.T if rows < cols else draw)
        q = q * xp.where(xp.diagonal(r) < 0, -1.0, 1.0)
        q = q.T if rows < cols else q
        tensor.data[...] = (gain * q).reshape(tensor.shape)
    tensor._version[0] += 1
    return tensor


def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
    """Fill ``tensor`` from N(mean, std^2) truncated to [a, b].

    ``a`` and ``b`` are absolute bounds, not multiples of ``std``. Samples
    come from the inverse of the normal CDF applied to uniform draws between
    CDF(a) and CDF(b), computed in float64, so no draw is rejected.

    NOTE: when [a, b] lies far in one tail (more than about 8 std from
    ``mean``), CDF(a) and CDF(b) round to the same float64 value and the
    samples pile up at a bound.

    >>> w = gf.nn.init.trunc_normal_(gf.empty(256), std=0.02, a=-0.04, b=0.04)
    >>> bool((w.abs() <= 0.04).all())
    True
    """
    _check_tensor("trunc_normal_", tensor)
    if not std > 0:
        raise ValueError(f"trunc_normal_: std must be positive, got {std}")
    if not a < b:
        raise ValueError(f"trunc_normal_: a ({a}) must be less than b ({b})")
    if tensor.data.size == 0:
        return tensor
    low = _normal_cdf((a - mean) / std)
    high = _normal_cdf((b - mean) / std)
    device = tensor.device
    generator = _random.generator_for(device).draw()
    xp = device.xp
    with device:
        uniform = generator.random(size=tensor.shape, dtype=np.float64)
        # 2 * CDF(z) - 1 = erf(z / sqrt(2)), so z = sqrt(2) * erfinv(2p - 1).
        tiny = np.finfo(np.float64).eps
        y = xp.clip(2 * (low + (high - low) * uniform) - 1, -1 + tiny, 1 - tiny)
        values = mean + std * math.sqrt(2.0) * _erfinv(xp, y)
        tensor.data[...] = xp.clip(values, a, b)
    tensor._version[0] += 1
    return tensor


def _normal_cdf(z):
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


# Constant of Winitzki's closed-form approximation of erfinv (S. Winitzki, "A
# handy approximation for the error function and its inverse", 2008), whose
# relative error is below about 2e-3.
_WINITZKI_A = 0.147


def _erfinv(xp, y):
    """Return erfinv(y) for float64 ``y`` in (-1, 1), to about float64 precision."""
    log_term = xp.log1p(-y * y)
    first = 2.0 / (math.pi * _WINITZKI_A) + log_term / 2.0
    x = xp.sign(y) * xp.sqrt(xp.sqrt(first * first - log_term / _WINITZKI_A) - first)
    # Newton's method on erf(x) = y, whose derivative is 2 / sqrt(pi) * exp(-x^2),
    # converges quadratically from the approximation, so three steps suffice.
    for _ in range(3):
        x = x - (erf(x) - y) / (2.0 / math.sqrt(math.pi) * xp.exp(-x * x))
    return x
