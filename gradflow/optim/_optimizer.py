"""The Optimizer base class: parameter groups, per-parameter state, checkpoints."""

import numbers

from .. import _device
from .._tensor import Tensor, make_tensor, tensor
from ..autograd import enable_grad, no_grad

__all__ = ["Optimizer"]


class Optimizer:
    """Base of the optimizers: parameter groups and per-parameter state.

    ``params`` is an iterable of Tensors, or of dicts that each contain
    ``"params"`` (the group's Tensors) plus options that override
    ``defaults`` for that group. A parameter is any leaf Tensor with a
    floating-point dtype, and ``step`` skips parameters whose ``grad`` is None.
    ``state`` maps each parameter to a dict of its buffers, which live on
    the parameter's device.

    Subclasses define ``_check_options(group)`` and
    ``_update(param, grad, state, group)``, which changes the array
    ``param`` in place from the array ``grad``.
    """

    def __init__(self, params, defaults):
        self.defaults = dict(defaults)
        self.state = {}
        self.param_groups = []
        groups = _as_list(params, type(self).__name__)
        if not groups:
            raise ValueError(
                f"{type(self).__name__} got an empty parameter list. Pass the "
                "tensors to optimize, e.g. model.parameters()."
            )
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    def add_param_group(self, param_group):
        """Add a group of parameters, with options that override the defaults."""
        name = type(self).__name__
        if not isinstance(param_group, dict) or "params" not in param_group:
            raise TypeError(
                f"{name}: a parameter group must be a dict with a 'params' "
                f"entry, got {type(param_group).__name__}."
            )
        params = _as_list(param_group["params"], name)
        for param in params:
            _check_param(param, name)
        _check_unique(params, self.param_groups, name)
        group = {**self.defaults, **param_group, "params": params}
        self._check_options(group)
        self.param_groups.append(group)

    def zero_grad(self, set_to_none=True):
        """Reset the gradients: drop them (the default), or fill them with 0."""
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if set_to_none:
                    param.grad = None
                    continue
                if getattr(param.grad, "grad_fn", None) is not None:
                    param.grad = param.grad.detach()
                with no_grad():
                    param.grad.zero_()

    def step(self, closure=None):
        """Update every parameter that has a gradient and return closure's loss.

        ``closure``, when given, reevaluates the model with gradients enabled
        and returns the loss. It runs before the update.
        """
        loss = None
        if closure is not None:
            with enable_grad():
                loss = closure()
        with no_grad():
            for group in self.param_groups:
                self._update_group(group)
        return loss

    def _update_group(self, group):
        params = [param for param in group["params"] if param.grad is not None]
        self._update_params(params, group)

    def _update_params(self, params, group):
        """Run ``_update`` on each of ``params``, all of which have a gradient."""
        for param in params:
            state = self.state.setdefault(param, {})
            with _device.on_device_of(param.data):
                self._update(param.data, grad_array(param), state, group)
            bump_version(param)

    def _check_options(self, group):
        raise NotImplementedError

    def _update(self, param, grad, state, group):
        raise NotImplementedError

    def state_dict(self):
        """Return the options and state, with parameters replaced by indices.

        Parameters are numbered in the order of ``param_groups``. The state
        tensors are the optimizer's own (not copies), so save the result
        (``gf.save``) before the next ``step`` if it must stay unchanged.
        """
        index_of = {}
        groups = []
        for group in self.param_groups:
            indices = []
            for param in group["params"]:
                index_of.setdefault(id(param), len(index_of))
                indices.append(index_of[id(param)])
            options = {key: value for key, value in group.items() if key != "params"}
            groups.append({**options, "params": indices})
        state = {
            index_of[id(param)]: dict(values)
            for param, values in self.state.items()
            if id(param) in index_of
        }
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Restore options and state saved by ``state_dict``.

        The saved groups must match this optimizer's groups in number and
        size, and every state tensor must have its parameter's shape (as the
        buffers of SGD, Adam and AdamW do). Everything is checked before
        anything changes. State tensors are copied to each parameter's
        device, and floating-point ones to its dtype.
        """
        name = type(self).__name__
        saved_groups, saved_state = _split_state_dict(state_dict, name)
        _check_group_sizes(saved_groups, self.param_groups, name)
        params = [p for group in self.param_groups for p in group["params"]]
        new_state = {}
        for key, values in saved_state.items():
            param = params[_state_index(key, len(params), name)]
            new_state[param] = _copy_state(values, param, name)
        new_groups = []
        for saved, group in zip(saved_groups, self.param_groups):
            new_group = {**saved, "params": group["params"]}
            self._check_options(new_group)
            new_groups.append(new_group)
        self.state = new_state
        self.param_groups = new_groups

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for key in sorted(k for k in group if k != "params"):
                lines.append(f"    {key}: {group[key]}")
        lines.append(")")
        return "\n".join(lines)


def _as_list(params, name):
    if isinstance(params, Tensor):
        return [params]
    if isinstance(params, (set, frozenset)):
        raise TypeError(
            f"{name}: parameters must be given in a fixed order (a list or "
            "generator), not a set, because the order numbers them in "
            "state_dict()."
        )
    if isinstance(params, dict):
        raise TypeError(
            f"{name}: expected an iterable of Tensors or of group dicts, got "
            "a dict. Wrap a single group in a list: [{'params': ...}]."
        )
    try:
        return list(params)
    except TypeError:
        raise TypeError(
            f"{name}: expected an iterable of Tensors or of group dicts, got "
            f"{type(params).__name__}."
        ) from None


def _check_param(param, name):
    if not all(hasattr(param, attr) for attr in ("data", "grad", "requires_grad")):
        raise TypeError(
            f"{name} can only optimize Tensors, got {type(param).__name__}."
        )
    if param.data.dtype.kind != "f":
        raise TypeError(
            f"{name} can only optimize floating-point tensors, got one with "
            f"dtype {param.data.dtype} and shape {tuple(param.data.shape)}. "
            "Convert it with .float() before creating the parameter."
        )
    if getattr(param, "grad_fn", None) is not None:
        raise ValueError(
            f"{name} can only optimize leaf tensors, but one of shape "
            f"{tuple(param.data.shape)} was produced by an operation. Pass "
            "the tensor the computation starts from, or .detach() it."
        )


def _check_unique(params, groups, name):
    seen = {id(p) for group in groups for p in group["params"]}
    for param in params:
        if id(param) in seen:
            raise ValueError(
                f"{name}: a parameter of shape {tuple(param.data.shape)} "
                "appears more than once in the parameter groups. List each "
                "tensor once."
            )
        seen.add(id(param))


def check_nonnegative(name, option, value):
    """Raise ValueError unless ``value`` is a real number >= 0."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name}: {option} must be a number, got {value!r}.")
    if not value >= 0:
        raise ValueError(f"{name}: invalid {option} {value!r}, expected a value >= 0.")


def check_betas(name, betas):
    """Raise ValueError unless ``betas`` is a pair of numbers in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{name}: betas must be a pair of numbers, got {betas!r}.")
    for i, beta in enumerate(betas):
        if not isinstance(beta, numbers.Real) or not 0.0 <= beta < 1.0:
            raise ValueError(
                f"{name}: invalid betas[{i}] {beta!r}, expected a value in "
                "[0, 1)."
            )


def grad_array(param):
    """Return the array of ``param``'s gradient (a Tensor's data, or the array)."""
    return param.grad.data if isinstance(param.grad, Tensor) else param.grad


def bump_version(param):
    """Mark ``param`` as changed in place, for the tensors saved from it."""
    version = getattr(param, "_version", None)
    if version is not None:
        version[0] += 1


def zeros_state(param):
    """Return a zero Tensor with ``param``'s shape, dtype and device."""
    return make_tensor(_device.array_module(param).zeros_like(param))


def _split_state_dict(state_dict, name):
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(
        state_dict
    ):
        raise ValueError(
            f"{name}.load_state_dict expects a dict with 'state' and "
            "'param_groups', as returned by state_dict()."
        )
    return list(state_dict["param_groups"]), dict(state_dict["state"])


def _check_group_sizes(saved_groups, groups, name):
    if len(saved_groups) != len(groups):
        raise ValueError(
            f"{name}.load_state_dict: the saved state has {len(saved_groups)} "
            f"parameter group(s) but this optimizer has {len(groups)}."
        )
    for i, (saved, group) in enumerate(zip(saved_groups, groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"{name}.load_state_dict: saved parameter group {i} has "
                f"{len(saved['params'])} parameter(s) but this optimizer's has "
                f"{len(group['params'])}, so the state belongs to another model."
            )


def _state_index(key, count, name):
    try:
        index = int(key)
    except (TypeError, ValueError):
        index = -1
    if not 0 <= index < count:
        raise ValueError(
            f"{name}.load_state_dict: state key {key!r} is not a parameter "
            f"index (expected 0 to {count - 1})."
        )
    return index


def _copy_state(values, param, name):
    out = {}
    for key, value in values.items():
        if not isinstance(value, Tensor):
            out[key] = value
            continue
        if value.shape != param.data.shape:
            raise ValueError(
                f"{name}.load_state_dict: state '{key}' has shape "
                f"{tuple(value.shape)} but its parameter has shape "
                f"{tuple(param.data.shape)}."
            )
        dtype = param.data.dtype if value.dtype.kind == "f" else value.dtype
        device = _device.device_of_array(param.data)
        out[key] = tensor(value.data, dtype=dtype, device=device)
    return out
