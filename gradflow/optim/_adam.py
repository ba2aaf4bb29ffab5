"""Adam and AdamW: adaptive moment estimation, with coupled or decoupled decay."""

import math

import gradflow_kernels
import numpy as np

from .. import _device
from ._optimizer import (
    Optimizer, bump_version, check_betas, check_nonnegative, grad_array, zeros_state,
)

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

    ``fused`` picks how a step runs. With None (the default), one fused
    update per group, device and dtype changes every parameter that is
    C-contiguous and has a gradient of its own dtype, shape and device.
    For float32 and float64 NumPy arrays that update is one parallel CPU
    loop, and for float16, float32 and float64 CuPy arrays it is one CUDA
    kernel launch. The other parameters are updated one at a time with
    NumPy or CuPy expressions.
    False updates every parameter one at a time. True requires the fused
    update and raises ValueError at ``step`` for a parameter it cannot take.
    The fused update computes in float64 and rounds each stored value once,
    so float32 and float16 results can differ from the per-parameter ones
    in the last bits.

    >>> opt = gf.optim.Adam(model.parameters(), lr=1e-3)
    """

    decoupled_weight_decay = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, amsgrad=False, maximize=False, fused=None):
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, fused=fused,
        )
        super().__init__(params, defaults)

    def _check_options(self, group):
        name = type(self).__name__
        for option in ("lr", "eps", "weight_decay"):
            check_nonnegative(name, option, group[option])
        check_betas(name, group["betas"])
        fused = group.get("fused")
        if fused not in (None, True, False):
            raise TypeError(f"{name}: fused must be None, True or False, got {fused!r}.")

    def _update_group(self, group):
        if group.get("fused") is False:
            return super()._update_group(group)
        tables, updated, rest = {}, [], []
        for param in group["params"]:
            if param.grad is None:
                continue
            if self._table_param(param, group, tables):
                updated.append(param)
            else:
                rest.append(param)
        options = _loop_options(group, self.decoupled_weight_decay)
        for table in tables.values():
            if table is not None:
                table.run(options)
        # Counted only now, so a fused=True refusal above leaves every step
        # count as it was.
        for param in updated:
            self.state[param]["step"] += 1
            bump_version(param)
        self._update_params(rest, group)

    def _table_param(self, param, group, tables):
        """Table ``param`` by dtype and device, or return False if no kernel can."""
        array, grad = param.data, grad_array(param)
        reason = _unfusable_reason(array, grad)
        if reason is not None:
            return self._reject_fused(group, param, reason)
        # NOTE: the CuPy tables (one CUDA launch each) have run only under the
        # CUDA simulator, on NumPy arrays, not on a GPU.
        key = (type(array), array.dtype, _device.device_of_array(array))
        if key not in tables:
            tables[key] = gradflow_kernels.adam_table(array)
        table = tables[key]
        if table is None and gradflow_kernels.cpu_kernels_forked() \
                and isinstance(array, np.ndarray):
            return self._reject_fused(group, param, gradflow_kernels.FORK_REASON)
        if table is None:
            return self._reject_fused(
                group, param, "no kernel takes its dtype on its device"
            )
        state = self.state.setdefault(param, {})
        if not state:
            with _device.on_device_of(array):
                _init_state(state, array, group["amsgrad"])
        arrays = [array, grad, state["exp_avg"].data, state["exp_avg_sq"].data]
        if group["amsgrad"]:
            arrays.append(state["max_exp_avg_sq"].data)
        reason = _unfit_state_reason(array, arrays[2:])
        if reason is not None:
            return self._reject_fused(group, param, reason)
        if not table.add(arrays, _step_scalars(group, state["step"] + 1,
                                               self.decoupled_weight_decay)):
            return self._reject_fused(group, param, "an array is not C-contiguous")
        return True

    def _reject_fused(self, group, param, reason):
        if group.get("fused"):
            raise ValueError(
                f"{type(self).__name__}(fused=True) cannot update the parameter "
                f"of shape {tuple(param.shape)} and dtype {param.dtype} in the "
                f"fused update, because {reason}. Pass fused=None to update such "
                "parameters one at a time."
            )
        return False

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
        # exp_avg moves towards grad by 1 - beta1, computed from the nearer
        # end as torch.lerp does, so beta1 = 0 gives grad exactly.
        if beta1 > 0.5:
            exp_avg += (1 - beta1) * (grad - exp_avg)
        else:
            exp_avg[...] = grad - beta1 * (grad - exp_avg)
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
                 weight_decay=1e-2, amsgrad=False, maximize=False, fused=None):
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, maximize, fused
        )


def _unfusable_reason(array, grad):
    """Return why no fused update can change ``array`` from ``grad``, or None."""
    if type(grad) is not type(array):
        return (
            f"its gradient is a {type(grad).__name__}, not a "
            f"{type(array).__name__} like the parameter"
        )
    if grad.dtype != array.dtype or grad.shape != array.shape:
        return (
            f"its gradient has dtype {grad.dtype} and shape {grad.shape}, "
            "not the parameter's"
        )
    grad_device = _device.device_of_array(grad)
    if grad_device != _device.device_of_array(array):
        return f"its gradient is on {grad_device}, not on the parameter's device"
    return None


def _unfit_state_reason(array, states):
    """Return why the fused loop cannot write ``array`` and its ``states``, or None.

    The loop walks ``array.size`` elements of every state array through raw
    addresses. A state of another dtype or shape (left by a cast or a new
    ``.data``) or a read-only array must therefore take the per-parameter
    path, which converts or raises as NumPy does.
    """
    if not array.flags.writeable:
        return "the parameter's array is read-only"
    for state in states:
        if (type(state) is not type(array) or state.dtype != array.dtype
                or state.shape != array.shape):
            return (
                f"its Adam state has dtype {state.dtype} and shape {state.shape}, "
                f"not the parameter's {array.dtype} and {array.shape}"
            )
        if not state.flags.writeable:
            return "its Adam state is read-only"
    return None


def _step_scalars(group, step, decoupled):
    """Return the per-tensor scalars of ``adam_chunks`` for step ``step``."""
    lr, weight_decay = group["lr"], group["weight_decay"]
    beta1, beta2 = group["betas"]
    decay = 1 - lr * weight_decay if decoupled else 1.0
    return (lr / (1 - beta1**step), 1 / math.sqrt(1 - beta2**step), decay)


def _loop_options(group, decoupled):
    """Return the group options of ``adam_chunks`` as a tuple of floats."""
    beta1, beta2 = group["betas"]
    coupled_decay = 0.0 if decoupled else group["weight_decay"]
    sign = -1.0 if group["maximize"] else 1.0
    return (beta1, beta2, group["eps"], coupled_decay, sign, float(group["amsgrad"]))


def _init_state(state, param, amsgrad):
    state["step"] = 0
    state["exp_avg"] = zeros_state(param)
    state["exp_avg_sq"] = zeros_state(param)
    if amsgrad:
        state["max_exp_avg_sq"] = zeros_state(param)

