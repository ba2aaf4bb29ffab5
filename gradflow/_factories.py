"""Tensor factories: zeros, ones, full, arange, linspace, eye and random draws."""

import numpy as np

from . import _device, _random
from ._tensor import _DEFAULT_FLOAT, make_tensor

__all__ = [
    "zeros", "ones", "full", "empty", "zeros_like", "ones_like", "full_like",
    "arange", "linspace", "eye", "rand", "randn", "randint", "rand_like",
    "randn_like", "randperm",
]


def _shape(shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    for n in shape:
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"invalid shape {shape}: sizes must be non-negative ints")
    return tuple(int(n) for n in shape)


def _finish(array, requires_grad):
    out = make_tensor(array)
    if requires_grad:
        out.requires_grad = True
    return out


def _place(device, dtype):
    dev = _device.device(device or "cpu")
    return dev, np.dtype(dtype) if dtype is not None else _DEFAULT_FLOAT


def _create(fill, shape, dtype, device, requires_grad):
    dev, dtype = _place(device, dtype)
    with dev:
        return _finish(fill(dev.xp)(_shape(shape), dtype=dtype), requires_grad)


def zeros(*shape, dtype=None, device=None, requires_grad=False):
    """Return a tensor of zeros (float32 unless ``dtype`` is given)."""
    return _create(lambda xp: xp.zeros, shape, dtype, device, requires_grad)


def ones(*shape, dtype=None, device=None, requires_grad=False):
    """Return a tensor of ones."""
    return _create(lambda xp: xp.ones, shape, dtype, device, requires_grad)


def empty(*shape, dtype=None, device=None, requires_grad=False):
    """Return an uninitialised tensor."""
    return _create(lambda xp: xp.empty, shape, dtype, device, requires_grad)


def full(shape, fill_value, dtype=None, device=None, requires_grad=False):
    """Return a tensor of ``shape`` filled with ``fill_value``.

    Without ``dtype``, the dtype follows the value as in PyTorch: bool for a
    bool, int64 for an int, float32 for a float.
    """
    shape = shape if isinstance(shape, (tuple, list)) else (shape,)
    if dtype is None and isinstance(fill_value, (bool, np.bool_)):
        dtype = np.bool_
    elif dtype is None and isinstance(fill_value, (int, np.integer)):
        dtype = np.int64
    dev, dtype = _place(device, dtype)
    with dev:
        return _finish(dev.xp.full(_shape(shape), fill_value, dtype=dtype), requires_grad)


def _like(t, dtype, device):
    return (dtype or t.dtype), (device or t.device)


def zeros_like(t, dtype=None, device=None, requires_grad=False):
    dtype, device = _like(t, dtype, device)
    return zeros(t.shape, dtype=dtype, device=device, requires_grad=requires_grad)


def ones_like(t, dtype=None, device=None, requires_grad=False):
    dtype, device = _like(t, dtype, device)
    return ones(t.shape, dtype=dtype, device=device, requires_grad=requires_grad)


def full_like(t, fill_value, dtype=None, device=None, requires_grad=False):
    dtype, device = _like(t, dtype, device)
    return full(t.shape, fill_value, dtype=dtype, device=device,
                requires_grad=requires_grad)


def arange(start, end=None, step=1, dtype=None, device=None, requires_grad=False):
    """Return evenly spaced values in [start, end), as ``range`` would give.

    The dtype is int64 when all arguments are ints, else float32.
    """
    if end is None:
        start, end = 0, start
    if step == 0:
        raise ValueError("arange: step must not be zero")
    integral = all(isinstance(v, (int, np.integer)) for v in (start, end, step))
    dtype = dtype or (np.int64 if integral else _DEFAULT_FLOAT)
    dev = _device.device(device or "cpu")
    with dev:
        return _finish(dev.xp.arange(start, end, step, dtype=dtype), requires_grad)


def linspace(start, end, steps, dtype=None, device=None, requires_grad=False):
    """Return ``steps`` evenly spaced values from start to end, inclusive."""
    dev, dtype = _place(device, dtype)
    with dev:
        return _finish(dev.xp.linspace(start, end, steps, dtype=dtype), requires_grad)


def eye(n, m=None, dtype=None, device=None, requires_grad=False):
    """Return the n x m identity matrix."""
    dev, dtype = _place(device, dtype)
    with dev:
        return _finish(dev.xp.eye(n, m, dtype=dtype), requires_grad)


def _draw(dev, method, shape, dtype, **kwargs):
    gen = _random.generator_for(dev).draw()
    with dev:
        values = getattr(gen, method)(size=shape, **kwargs)
    if dtype is not None and values.dtype != dtype:
        values = values.astype(dtype)
    return values


def rand(*shape, dtype=None, device=None, requires_grad=False, generator=None):
    """Return uniform samples from [0, 1)."""
    dev, dtype = _place(device, dtype)
    return _finish(_draw(dev, "random", _shape(shape), dtype), requires_grad)


def randn(*shape, dtype=None, device=None, requires_grad=False, generator=None):
    """Return samples from the standard normal distribution."""
    dev, dtype = _place(device, dtype)
    return _finish(_draw(dev, "standard_normal", _shape(shape), dtype), requires_grad)


def randint(low, high=None, size=(), dtype=np.int64, device=None):
    """Return integers drawn uniformly from [low, high)."""
    if high is None:
        low, high = 0, low
    if high <= low:
        raise ValueError(f"randint: high ({high}) must be greater than low ({low})")
    dev = _device.device(device or "cpu")
    size = _shape(size if isinstance(size, (tuple, list)) else (size,))
    return make_tensor(_draw(dev, "integers", size, np.dtype(dtype), low=low, high=high))


def randperm(n, dtype=np.int64, device=None):
    """Return a random permutation of 0..n-1."""
    dev = _device.device(device or "cpu")
    gen = _random.generator_for(dev).draw()
    with dev:
        return make_tensor(gen.permutation(n).astype(dtype))


def rand_like(t, dtype=None, device=None, requires_grad=False):
    dtype, device = _like(t, dtype, device)
    return rand(t.shape, dtype=dtype, device=device, requires_grad=requires_grad)


def randn_like(t, dtype=None, device=None, requires_grad=False):
    dtype, device = _like(t, dtype, device)
    return randn(t.shape, dtype=dtype, device=device, requires_grad=requires_grad)



