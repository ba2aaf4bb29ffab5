"""Adam and AdamW: adaptive moment estimation, with coupled or decoupled decay."""

import math

from .. import _device
from ._optimizer import Optimizer, check_betas, check_nonnegative, zeros_state

__all__ = ["Adam", "AdamW"]


class Adam(Optimizer):
    """Adam, with the update rule of ``torch.optim.Adam``.

    For each parameter ``p`` with gradient ``g``, step ``t`` (counting from
    1) does::

        g = -g if maximize else g
        g = g + weight_decay * p
        m = m + (1 - beta1) * (g - m)
        v = beta2 * v + (1 - beta2) * g * g
        v_max = max(v_max, v)                         (amsgrad only)
        denom = sqrt(v or v_max) / sqrt(1 - beta2**t) + eps
        p = p - lr / (1 - beta1**t) * m / denom

    ``m``, ``v`` and ``v_max`` are the states ``"exp_avg"``,
    ``"exp_avg_sq"`` and ``"max_exp_avg_sq"``, and ``t`` is ``"step"``, an int.

    >>> opt = gf.optim.Adam(model.parameters(), lr=1e-3)
    """

    decoupled_weight_decay = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, amsgrad=False, maximize=False):
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize,
        )
        super().__init__(params, defaults)

    def _check_options(self, group):
        name = type(self).__name__
        for option in ("lr", "eps", "weight_decay"):
            check_nonnegative(name, option, group[option])
        check_betas(name, group["betas"])

    def _update(self, param, grad, state, group):
        lr, weight_decay = group["lr"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        if group["maximize"]:
            grad = -grad
        if weight_decay != 0:
            if self.decoupled_weight_decay:
                param *= 1 - lr * weight_decay
            else:
                grad = grad + weight_decay * param
        if not state:
            _init_state(state, param, group["amsgrad"])
        state["step"] += 1
        step = state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"].data, state["exp_avg_sq"].data
        exp_avg += (1 - beta1) * (grad - exp_avg)
        exp_avg_sq *= beta2
        exp_avg_sq += (1 - beta2) * grad * grad
        xp = _device.array_module(param)
        second_moment = exp_avg_sq
        if group["amsgrad"]:
            second_moment = state["max_exp_avg_sq"].data
            xp.maximum(second_moment, exp_avg_sq, out=second_moment)
        step_size = lr / (1 - beta1**step)
        denom = xp.sqrt(second_moment) / math.sqrt(1 - beta2**step) + group["eps"]
        param -= step_size * exp_avg / denom


class AdamW(Adam):
    """Adam with decoupled weight decay, the update rule of ``torch.optim.AdamW``.

    Before the Adam step (which then adds no ``weight_decay * p`` to the
    gradient), each parameter shrinks as ``p = p * (1 - lr * weight_decay)``.

    >>> opt = gf.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    """

    decoupled_weight_decay = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=1e-2, amsgrad=False, maximize=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize)


def _init_state(state, param, amsgrad):
    state["step"] = 0
    state["exp_avg"] = zeros_state(param)
    state["exp_avg_sq"] = zeros_state(param)
    if amsgrad:
        state["max_exp_avg_sq"] = zeros_state(param)

