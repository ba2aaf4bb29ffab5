"""Gradients kept as views of one flat array per dtype.

A ``GradientBuffer`` gives each of its tensors a slot: a view, of the
tensor's shape, into one contiguous array per dtype. Backward copies a
tensor's first gradient into its slot instead of allocating an array, and
later contributions accumulate there in place, so after backward all the
gradients sit side by side in memory. ``clip_grad_norm_`` and
``clip_grad_value_`` then treat the whole buffer as one array: one
reduction and one scaling pass per dtype, with no Python work per
gradient, when they are given exactly the buffer's tensors.

The slot tensors share one version counter, so changing every gradient in
place costs one increment.
"""

import operator

import gradflow_kernels

from .._device import array_module, on_device_of
from .._tensor import make_tensor

__all__ = ["GradientBuffer"]


class GradientBuffer:
    """Keep the gradients of ``parameters`` in one flat array per dtype.

    ``parameters`` are leaf Tensors of floating dtypes on one device, such
    as ``model.parameters()``; each may belong to one buffer at a time.
    Gradients the tensors already have are copied into the buffer, so no
    value is lost. From then on backward writes each gradient into its
    slot, and ``clip_grad_norm_(buffer.params, ...)`` (or the same tensors
    in the same order) clips them all in a fixed number of passes.

    Assigning another Tensor to ``.grad`` takes that gradient out of its
    slot, and the assigned tensor is used as it would be without a buffer.
    The gradient returns to its slot once ``.grad`` is set to None
    (``zero_grad()``) and backward runs again. ``release()`` gives every
    gradient back as an array of its own. ``Module.to()`` with another
    device or dtype does the same for the gradients it converts, and
    backward cannot fill a slot of the old dtype, so build a new buffer
    after it (releasing the old one first).

    >>> model = gf.nn.Linear(4, 2)
    >>> buffer = gf.nn.utils.GradientBuffer(model.parameters())
    >>> model(gf.ones(3, 4)).sum().backward()
    >>> gf.nn.utils.clip_grad_norm_(buffer.params, max_norm=1.0)

    NOTE: rebinding ``.grad.data`` of a gradient in the buffer to another
    array is not noticed; clipping would then read and scale the slot, not
    that array. Change gradients in place, or assign a new Tensor to
    ``.grad``.
    """

    def __init__(self, parameters):
        params = _check_parameters(parameters)
        self.params = tuple(params)
        self._position = {id(p): i for i, p in enumerate(params)}
        self._version = [0]
        self._flats, self._slots = _allocate(params, self._version)
        self._dtypes = tuple(flat.dtype for flat in self._flats)
        self._plan = gradflow_kernels.multi_tensor_plan(self._flats)
        self._live = 0
        for param, slot in zip(params, self._slots):
            param._grad_buffer = self
            grad = param._grad
            if grad is not None and grad.grad_fn is None:
                slot.data[...] = grad.data
                param._grad = slot
                self._live += 1

    def __len__(self):
        return len(self.params)

    def __repr__(self):
        sizes = ", ".join(f"{flat.dtype}: {flat.size}" for flat in self._flats)
        return (
            f"GradientBuffer({len(self.params)} tensors, elements per dtype "
            f"{{{sizes}}}, {self._live} gradients in place)"
        )

    @property
    def arrays(self):
        """The flat arrays, one per dtype, that hold the gradients."""
        return self._flats

    def zero_(self):
        """Set every gradient in the buffer to zero in one pass per dtype.

        Every tensor's ``.grad`` becomes its slot, zero-filled: one whose
        gradient was None, or another Tensor assigned by the user, gets its
        slot back.
        """
        for flat in self._flats:
            flat.fill(0)
        for param, slot in zip(self.params, self._slots):
            if param._grad is not slot:
                param.grad = slot
        self._version[0] += 1

    def release(self):
        """Detach every tensor from the buffer, giving each gradient its own array."""
        for param, slot in zip(self.params, self._slots):
            if param._grad is slot:
                param._grad = make_tensor(slot.data.copy())
            param._grad_buffer = None
        self.params = ()
        self._position = {}
        self._slots = []
        self._flats = []
        self._plan = None
        self._live = 0

    # -- used by the engine, the grad setter and the clipping functions ---

    def _fill(self, param, grad):
        """Copy backward's first gradient of ``param`` into its slot.

        Returns False, and leaves the gradient to the caller, when the
        array no longer fits the slot (the tensor was moved or cast).
        """
        slot = self._slots[self._position[id(param)]]
        target = slot.data
        if (
            type(grad) is not type(target) or grad.dtype != target.dtype
            or grad.shape != target.shape
        ):
            return False
        target[...] = grad
        self._version[0] += 1
        param._grad = slot
        self._live += 1
        return True

    def _note_assignment(self, param, value):
        slot = self._slots[self._position[id(param)]]
        was, now = param._grad is slot, value is slot
        self._live += now - was

    def _holds_exactly(self, tensors):
        """True if ``tensors`` are this buffer's, in order, all with a gradient here."""
        params = self.params
        return (
            self._live == len(params) == len(tensors)
            and all(map(operator.is_, tensors, params))
        )

    def _norm_state(self, norm_type, max_norm, reference):
        """Return float64 [norm, coefficient] over the whole buffer."""
        if self._plan is not None:
            return self._plan.norm(norm_type, max_norm)
        return reference(self._flats, norm_type, max_norm)

    def _scale_(self, state):
        if self._plan is not None:
            self._plan.scale_(state)
        else:
            for flat in self._flats:
                flat *= state[1].astype(flat.dtype)
        self._version[0] += 1

    def _clip_values_(self, clip_value):
        for flat in self._flats:
            array_module(flat).clip(flat, -clip_value, clip_value, out=flat)
        self._version[0] += 1


def _check_parameters(parameters):
    from .utils import _parameter_list

    op = "GradientBuffer"
    params = _parameter_list(parameters, op)
    seen = set()
    for index, p in enumerate(params):
        if p.grad_fn is not None:
            raise ValueError(
                f"{op}: parameter {index} was produced by '{p.grad_fn.name}'; "
                "only leaf tensors accumulate gradients."
            )
        if p.data.dtype.kind != "f":
            raise TypeError(
                f"{op}: parameter {index} has dtype {p.dtype}; gradients exist "
                "only for floating-point tensors."
            )
        if id(p) in seen:
            raise ValueError(
                f"{op}: parameter {index} (shape {tuple(p.shape)}) appears "
                "twice; pass each tensor once."
            )
        if p._grad_buffer is not None:
            raise ValueError(
                f"{op}: parameter {index} (shape {tuple(p.shape)}) already "
                "belongs to a GradientBuffer; call release() on that one first."
            )
        seen.add(id(p))
    return params


def _allocate(params, version):
    """Return (flat arrays by dtype, one slot Tensor per parameter)."""
    xp = array_module(params[0].data)
    totals = {}
    for p in params:
        totals[p.data.dtype] = totals.get(p.data.dtype, 0) + p.data.size
    with on_device_of(params[0].data):
        flats = {dtype: xp.zeros(total, dtype=dtype) for dtype, total in totals.items()}
    offsets = dict.fromkeys(totals, 0)
    slots = []
    for p in params:
        dtype, size = p.data.dtype, p.data.size
        start = offsets[dtype]
        offsets[dtype] = start + size
        slot = make_tensor(flats[dtype][start:start + size].reshape(p.data.shape))
        slot._version = version
        slots.append(slot)
    return list(flats.values()), slots
