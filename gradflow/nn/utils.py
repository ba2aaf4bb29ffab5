"""Utilities on parameters: gradient clipping and conversion to one vector.

``parameters_to_vector`` and ``vector_to_parameters`` convert between a
list of parameters and one flat 1-D tensor, in the order of the list.

``clip_grad_norm_`` follows PyTorch's rule: every gradient is multiplied by
``max_norm / (total_norm + 1e-6)``, capped at 1, where ``total_norm`` is the
norm of all gradients taken together as one vector. It reduces and scales
the gradients of a device through ``gradflow_kernels.multi_tensor_plan``
(a fixed number of kernel launches, however many gradients there are) and
falls back to a per-gradient NumPy/CuPy loop, the reference, otherwise.
Given exactly the tensors of a ``GradientBuffer``, in its order, both
clipping functions work on the buffer's flat arrays instead, with no
Python work per gradient.
"""

import math

import gradflow_kernels
import numpy as np

from .._device import array_module
from ._grad_buffer import GradientBuffer

__all__ = [
    "GradientBuffer", "clip_grad_norm_", "clip_grad_value_",
    "parameters_to_vector", "vector_to_parameters",
]

_EPSILON = 1e-6


def clip_grad_norm_(
    parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None
):
    """Scale the gradients of ``parameters`` in place to a total norm <= ``max_norm``.

    Args:
        parameters: a Tensor, an iterable of Tensors, or an iterable of
            ``(name, Tensor)`` pairs such as ``module.named_parameters()``.
            Tensors whose ``grad`` is None are skipped.
        max_norm: the largest total norm left after clipping.
        norm_type: the order p of the norm, a float > 0 or ``inf``.
        error_if_nonfinite: raise a RuntimeError, before any gradient is
            changed, when the total norm is NaN or Inf. The message lists
            the non-finite gradients by their position in ``parameters``,
            and by name when names were given.
        foreach: None or True use the multi-tensor kernels where they apply
            (True raises a RuntimeError where they do not); False always
            runs the per-gradient loop.

    Returns:
        The total norm before clipping, as a 0-d Tensor on the device of the
        first gradient, of the widest gradient dtype (float32 when there is
        no gradient). The norm is accumulated in float64 whatever the dtype.
        On CUDA it stays on the device: reading it synchronizes.

    >>> w = gf.tensor([3.0, 4.0], requires_grad=True)
    >>> (w * w).sum().backward()                      # w.grad = [6, 8]
    >>> gf.nn.utils.clip_grad_norm_([w], max_norm=5.0)
    tensor(10.)
    """
    norm_type = _check_norm_type(norm_type)
    max_norm = float(max_norm)
    parameters = _as_list(parameters)
    buffer = _whole_buffer(parameters) if foreach is not False else None
    if buffer is not None:
        if foreach is True and buffer._active_plan is None:
            _raise_no_foreach(buffer.arrays)
        return _clip_buffer(buffer, parameters, norm_type, max_norm, error_if_nonfinite)
    entries = _gradient_entries(parameters, "clip_grad_norm_")
    if not entries:
        return _zero_norm()
    groups = _group_by_device(entries)
    states = [_device_state(g, norm_type, max_norm, foreach) for g in groups]
    if len(groups) > 1:
        states = _combine_devices(states, norm_type, max_norm)
    if error_if_nonfinite:
        _check_finite(entries, states, norm_type)
    for group, (plan, state) in zip(groups, states):
        _scale_group(group, plan, state)
    return _norm_tensor(entries, states[0][1])


def clip_grad_value_(parameters, clip_value):
    """Clamp every gradient of ``parameters`` to [-clip_value, clip_value] in place.

    ``parameters`` is accepted in the same forms as for ``clip_grad_norm_``.
    NaN entries stay NaN. Unlike PyTorch, a negative ``clip_value`` raises a
    ValueError instead of setting every entry to ``clip_value``.
    """
    clip_value = float(clip_value)
    if not clip_value >= 0:
        raise ValueError(
            f"clip_grad_value_: clip_value must be >= 0, got {clip_value}"
        )
    parameters = _as_list(parameters)
    buffer = _whole_buffer(parameters)
    if buffer is not None:
        buffer._clip_values_(clip_value)
        return
    for _, grad in _gradient_entries(parameters, "clip_grad_value_"):
        xp = array_module(grad.data)
        xp.clip(grad.data, -clip_value, clip_value, out=grad.data)
        grad._version[0] += 1


def parameters_to_vector(parameters):
    """Return the parameters flattened and concatenated into one 1-D tensor.

    ``parameters`` is a Tensor or an iterable of Tensors on one device, such
    as ``model.parameters()``. The result is recorded by autograd, so a
    gradient flows back into every parameter that requires grad. Mixed
    dtypes are promoted as ``gf.cat`` promotes them.

    >>> layer = gf.nn.Linear(3, 2)
    >>> gf.nn.utils.parameters_to_vector(layer.parameters()).shape
    (8,)
    """
    from .. import _ops

    tensors = _parameter_list(parameters, "parameters_to_vector")
    return _ops.cat([t.reshape(-1) for t in tensors])


def vector_to_parameters(vec, parameters):
    """Copy consecutive slices of the 1-D tensor ``vec`` into ``parameters``.

    Each parameter receives the next ``numel`` values of ``vec``, reshaped
    to its shape and cast to its dtype, in place and outside autograd (as
    under ``no_grad``). ``vec`` must be on the parameters' device and have
    exactly as many elements as they have together. Unlike PyTorch, the
    parameters keep their own arrays and dtypes instead of becoming views
    of ``vec``.

    >>> layer = gf.nn.Linear(3, 2)
    >>> gf.nn.utils.vector_to_parameters(gf.zeros(8), layer.parameters())
    """
    from .._tensor import Tensor

    op = "vector_to_parameters"
    if not isinstance(vec, Tensor):
        raise TypeError(f"{op}: vec must be a Tensor, got {type(vec).__name__}")
    tensors = _parameter_list(parameters, op)
    _check_vector(op, vec, tensors)
    offset = 0
    for t in tensors:
        count = t.data.size
        t.data[...] = vec.data[offset:offset + count].reshape(t.shape)
        t._version[0] += 1
        offset += count


def _parameter_list(parameters, op):
    """Return ``parameters`` as a non-empty list of Tensors on one device."""
    from .._tensor import Tensor

    if isinstance(parameters, Tensor):
        parameters = [parameters]
    tensors = list(parameters)
    if not tensors:
        raise ValueError(f"{op}: parameters is empty; pass at least one Tensor")
    for index, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(
                f"{op}: parameter {index} is a {type(t).__name__}; expected a Tensor"
            )
        if t.device != tensors[0].device:
            raise RuntimeError(
                f"{op}: parameter {index} is on {t.device} but parameter 0 is on "
                f"{tensors[0].device}; move all parameters to one device first."
            )
    return tensors


def _check_vector(op, vec, tensors):
    total = sum(t.data.size for t in tensors)
    if vec.ndim != 1 or vec.shape[0] != total:
        raise ValueError(
            f"{op}: vec must be 1-D with {total} elements, one per parameter "
            f"value, got shape {tuple(vec.shape)}"
        )
    if vec.device != tensors[0].device:
        raise RuntimeError(
            f"{op}: vec is on {vec.device} but the parameters are on "
            f"{tensors[0].device}; move it with .to('{tensors[0].device}')."
        )


# -- collecting the gradients --------------------------------------------


def _as_list(parameters):
    from .._tensor import Tensor

    if isinstance(parameters, Tensor):
        return [parameters]
    return parameters if type(parameters) is list else list(parameters)


def _whole_buffer(parameters):
    """Return the GradientBuffer that contains exactly the gradients of ``parameters``."""
    buffer = getattr(parameters[0], "_grad_buffer", None) if parameters else None
    if buffer is not None and buffer._holds_exactly(parameters):
        return buffer
    return None


def _gradient_entries(parameters, op):
    """Return [(label, grad Tensor)] for the parameters that have a gradient."""
    from .._tensor import Tensor

    entries = []
    for index, item in enumerate(parameters):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            name, item = item
            label = (index, name)
        else:
            label = (index, None)
        if not isinstance(item, Tensor):
            raise TypeError(
                f"{op}: parameter {index} is a {type(item).__name__}; expected "
                "a Tensor or a (name, Tensor) pair"
            )
        if item.grad is not None:
            entries.append((label, item.grad))
    return entries


def _group_by_device(entries):
    groups = {}
    for entry in entries:
        array = entry[1].data
        # -1 stands for the CPU; hashing a Device per gradient would cost more.
        key = -1 if isinstance(array, np.ndarray) else array.device.id
        groups.setdefault(key, []).append(entry)
    return list(groups.values())


def _check_norm_type(norm_type):
    norm_type = float(norm_type)
    if not norm_type > 0:
        raise ValueError(
            f"clip_grad_norm_: norm_type must be a float > 0 or inf, got {norm_type}"
        )
    return norm_type


# -- the norm and the coefficient -----------------------------------------


def _device_state(group, norm_type, max_norm, foreach):
    """Return (plan or None, float64 [norm, coefficient]) for one device."""
    arrays = [grad.data for _, grad in group]
    plan = None
    if foreach is not False:
        plan = gradflow_kernels.multi_tensor_plan(arrays)
    if plan is None and foreach is True:
        _raise_no_foreach(arrays)
    if plan is not None:
        return plan, plan.norm(norm_type, max_norm)
    with _quiet_nonfinite():
        return None, _reference_state(arrays, norm_type, max_norm)


def _raise_no_foreach(arrays):
    if isinstance(arrays[0], np.ndarray) and gradflow_kernels.cpu_kernels_forked():
        raise RuntimeError(
            f"clip_grad_norm_: foreach=True, but {gradflow_kernels.FORK_REASON}. "
            "Pass foreach=None to fall back to the per-gradient loop."
        )
    dtypes = sorted({str(a.dtype) for a in arrays})
    raise RuntimeError(
        "clip_grad_norm_: foreach=True, but the multi-tensor kernels do not "
        f"apply to these gradients (dtypes {dtypes}; they need C-contiguous "
        "float32 or float64 gradients, or float16 on CUDA). Pass "
        "foreach=None to fall back to the per-gradient loop."
    )


def _quiet_nonfinite():
    # A NaN or Inf gradient is reported through the norm (and through
    # error_if_nonfinite), not through NumPy's RuntimeWarnings.
    return np.errstate(over="ignore", invalid="ignore")


def _reference_state(arrays, norm_type, max_norm):
    """Return float64 [norm, coefficient] from one NumPy/CuPy pass per gradient."""
    xp = array_module(arrays[0])
    parts = [_reference_part(xp, a.astype(np.float64), norm_type) for a in arrays]
    if norm_type == math.inf:
        norm = xp.max(xp.stack(parts))
    else:
        norm = xp.sum(xp.stack(parts)) ** (1.0 / norm_type)
    coefficient = xp.minimum(max_norm / (norm + _EPSILON), 1.0)
    return xp.stack([norm, coefficient])


def _reference_part(xp, grad64, norm_type):
    if grad64.size == 0:
        return xp.zeros((), dtype=np.float64)
    if norm_type == math.inf:
        return xp.max(xp.abs(grad64))
    if norm_type == 2.0:
        return xp.sum(grad64 * grad64)
    return xp.sum(xp.abs(grad64) ** norm_type)


def _combine_devices(states, norm_type, max_norm):
    # NOTE: gradients on several devices are combined on the host, which
    # synchronizes each device once.
    norms = [float(state[0]) for _, state in states]
    if norm_type == math.inf:
        norm = max(norms) if not any(math.isnan(n) for n in norms) else math.nan
    else:
        norm = sum(n ** norm_type for n in norms) ** (1.0 / norm_type)
    coefficient = max_norm / (norm + _EPSILON)
    coefficient = coefficient if not coefficient > 1.0 else 1.0
    combined = []
    for plan, state in states:
        xp = array_module(state)
        combined.append((plan, xp.asarray([norm, coefficient], dtype=np.float64)))
    return combined


def _check_finite(entries, states, norm_type):
    norm = float(states[0][1][0])
    # The norm is returned in the gradients' widest dtype, so a float64 norm
    # beyond that dtype's range counts as infinite too, as it would read.
    dtype = np.result_type(*{grad.data.dtype for _, grad in entries})
    if math.isfinite(norm) and abs(norm) <= float(np.finfo(dtype).max):
        return
    bad = [_describe(label) for label, grad in entries if not _all_finite(grad.data)]
    if bad:
        found = "non-finite gradients: " + ", ".join(bad)
    elif math.isfinite(norm):
        found = f"every gradient is finite, but the norm overflows {dtype}"
    else:
        found = "every gradient is finite, so the sum of |g|**p overflowed float64"
    raise RuntimeError(
        f"clip_grad_norm_: the total norm of order {norm_type} is {norm}, so "
        f"the gradients were left unchanged; {found}. Find where the NaN or "
        "Inf first appears, or pass error_if_nonfinite=False to scale anyway "
        "(the gradients then become NaN)."
    )


def _all_finite(array):
    return bool(array_module(array).isfinite(array).all())


def _describe(label):
    index, name = label
    return f"parameter {index}" if name is None else f"parameter {index} ({name!r})"


def _clip_buffer(buffer, parameters, norm_type, max_norm, error_if_nonfinite):
    with _quiet_nonfinite():
        state = buffer._norm_state(norm_type, max_norm, _reference_state)
    if error_if_nonfinite:
        entries = _gradient_entries(parameters, "clip_grad_norm_")
        _check_finite(entries, [(None, state)], norm_type)
    with _quiet_nonfinite():
        buffer._scale_(state)
        dtype = np.result_type(*buffer._dtypes)
        return _norm_from_state(state, dtype)


# -- scaling and the result -------------------------------------------------


def _scale_group(group, plan, state):
    if plan is not None:
        plan.scale_(state)
    else:
        with _quiet_nonfinite():
            for _, grad in group:
                grad.data *= state[1].astype(grad.data.dtype)
    for _, grad in group:
        grad._version[0] += 1


def _norm_tensor(entries, state):
    dtype = np.result_type(*{grad.data.dtype for _, grad in entries})
    with _quiet_nonfinite():
        return _norm_from_state(state, dtype)


def _norm_from_state(state, dtype):
    from .._tensor import make_tensor

    return make_tensor(state[0:1].reshape(()).astype(dtype))


def _zero_norm():
    from .._tensor import make_tensor

    return make_tensor(np.zeros((), dtype=np.float32))
