"""Stochastic gradient descent, with optional momentum and Nesterov momentum."""

from .._tensor import make_tensor
from ._optimizer import Optimizer, check_nonnegative

__all__ = ["SGD"]


class SGD(Optimizer):
    """Stochastic gradient descent, with the update rule of ``torch.optim.SGD``.

    For each parameter ``p`` with gradient ``g``, one step does::

        g = -g if maximize else g
        g = g + weight_decay * p
        b = g                                   (first step)
        b = momentum * b + (1 - dampening) * g  (later steps)
        g = g + momentum * b if nesterov else b (only when momentum != 0)
        p = p - lr * g

    ``b`` is the state ``"momentum_buffer"``.

    >>> opt = gf.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> opt.zero_grad()
    >>> loss.backward()
    >>> opt.step()
    """

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0,
                 weight_decay=0.0, nesterov=False, maximize=False):
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening,
            weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
        )
        super().__init__(params, defaults)

    def _check_options(self, group):
        for option in ("lr", "momentum", "dampening", "weight_decay"):
            check_nonnegative("SGD", option, group[option])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                "SGD: nesterov=True needs momentum > 0 and dampening = 0, got "
                f"momentum={group['momentum']!r}, dampening={group['dampening']!r}."
            )

    def _update(self, param, grad, state, group):
        if group["maximize"]:
            grad = -grad
        if group["weight_decay"] != 0:
            grad = grad + group["weight_decay"] * param
        momentum = group["momentum"]
        if momentum != 0:
            buffer = state.get("momentum_buffer")
            if buffer is None:
                buffer = state["momentum_buffer"] = make_tensor(grad.copy())
            else:
                buffer.data *= momentum
                buffer.data += (1 - group["dampening"]) * grad
            if group["nesterov"]:
                grad = grad + momentum * buffer.data
            else:
                grad = buffer.data
        param -= group["lr"] * grad

