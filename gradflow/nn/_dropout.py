"""Dropout: zero elements at random in training and rescale the survivors."""

import numbers

import numpy as np

from .. import _random
from .._ops._common import check_float
from ..autograd import Function

__all__ = ["dropout", "check_dropout_p"]


class Dropout(Function):
    @staticmethod
    def forward(ctx, x, scaled_mask):
        # Saved rather than kept in an attribute, so backward frees the mask.
        ctx.save_for_backward(scaled_mask)
        return x * scaled_mask

    @staticmethod
    def backward(ctx, grad):
        (scaled_mask,) = ctx.saved_tensors
        return grad * scaled_mask, None


def check_dropout_p(op, p):
    """Return ``p`` as a float after checking that it lies in [0, 1]."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{op}: p must be a float in [0, 1], got {p!r}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(
            f"{op}: p is the probability of zeroing an element and must be in "
            f"[0, 1], got {p}"
        )
    return float(p)


def _scaled_mask(x, p):
    """Draw the mask that keeps each element with probability 1 - p, times 1/(1-p)."""
    device = x.device
    generator = _random.generator_for(device).draw()
    draw_dtype = x.dtype if x.dtype != np.float16 else np.dtype(np.float32)
    with device:
        uniform = generator.random(size=x.shape, dtype=draw_dtype)
        keep = uniform >= p
        if p == 1.0:
            return (keep * 0).astype(x.dtype)
        return (keep * (1.0 / (1.0 - p))).astype(x.dtype)


def dropout(x, p=0.5, training=True):
    """Zero each element with probability ``p`` and scale the rest by 1/(1-p).

    Outside training, or with ``p=0``, it returns ``x`` itself. The mask is
    drawn from gradflow's generator of ``x``'s device, so ``gf.manual_seed``
    and ``gf.set_rng_state`` reproduce it.

    >>> y = gf.nn.functional.dropout(gf.ones(4), p=0.5)
    """
    from .._tensor import Tensor

    p = check_dropout_p("dropout", p)
    if not isinstance(x, Tensor):
        raise TypeError(f"dropout: x must be a Tensor, got {type(x).__name__}")
    check_float("dropout", x)
    if not training or p == 0.0:
        return x
    return Dropout.apply(x, _scaled_mask(x, p))
