"""Fused kernels that gradflow's ops call through one seam each.

This package knows arrays only (NumPy and CuPy), never gradflow Tensors.
``fused_activation_backward`` returns the input gradient of an activation
computed in one pass, or None when no fused kernel applies, in which case
the caller runs its generic array expression instead.
"""

__all__ = ["fused_activation_backward"]


def fused_activation_backward(name, saved, grad_output, **params):
    """Return the input gradient of activation ``name``, or None.

    ``saved`` is the array the activation kept for backward (its input for
    gelu, silu, softplus and leaky_relu, its output for relu, sigmoid and
    tanh) and ``grad_output`` the incoming gradient of the same shape.
    """
    # TODO: no fused kernel is registered yet, so every activation takes the
    # generic array expression in gradflow._ops._activation.
    return None
