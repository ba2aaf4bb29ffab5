"""Gradients kept as views of one flat array per dtype.

A ``GradientBuffer`` gives each of its tensors a slot: a view, of the
tensor's shape, into one contiguous array per dtype. Backward copies a
tensor's first gradient into its slot instead of allocating an array, and
later contributions accumulate there in place, so after backward all the
gradients sit side by side in memory. ``clip_grad_norm_`` and
``clip_grad_value_`` then treat the whole buffer as one array: one
reduction and one scaling pass per dtype, with no Python work per
gradient, when they are given exactly the buffer's tensors. The slot of a
tensor whose gradient is None contains zeros by then, so it adds nothing.

Each slot tensor's version counter is one element of a shared int64
array, so changing every gradient in place costs one vectorized increment,
while filling one slot still changes only that slot's version.
"""

import operator

import gradflow_kernels
import numpy as np

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

    A gradient in the buffer is a view of it: after ``zero_grad()`` the
    next backward writes its new values into the same memory, so a gradient
    kept from an earlier step changes too. Keep ``p.grad.clone()`` instead.
    Clipping through the buffer adds the float64 partial sums in another
    order than over separate gradients, so the two agree to rounding, not
    bit for bit.

    NOTE: rebinding ``.grad.data`` of a gradient in the buffer to another
    array goes unnoticed, so clipping would read and scale the slot, not
    that array. Change gradients in place, or assign a new Tensor to
    ``.grad``.
    """

    def __init__(self, parameters):
        params = _check_parameters(parameters)
        self.params = tuple(params)
        self._position = {id(p): i for i, p in enumerate(params)}
        self._versions = np.zeros(len(params), dtype=np.int64)
        self._flats, self._slots = _allocate(params, self._versions)
        self._dtypes = tuple(flat.dtype for flat in self._flats)
        self._plan = gradflow_kernels.multi_tensor_plan(self._flats)
        # Gradients in their slots, gradients elsewhere (assigned by the
        # user), and positions whose gradient became None while the slot
        # still contains old values.
        self._live = 0
        self._foreign = 0
        self._stale = set()
        for param, slot in zip(params, self._slots):
            param._grad_buffer = self
            grad = param._grad
            if grad is not None and grad.grad_fn is None:
                slot.data[...] = grad.data
                param._grad = slot
                self._live += 1
            elif grad is not None:
                self._foreign += 1

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
        """The flat arrays, one per dtype, that contain the gradients."""
        return self._flats

    def zero_(self):
        """Set every existing gradient to zero in place, as ``zero_grad(set_to_none=False)``.

        The gradients in their slots take one pass per dtype. A Tensor the
        user assigned to ``.grad`` is zeroed where it is, and a gradient
        that is None stays None.
        """
        for flat in self._flats:
            flat.fill(0)
        self._versions += 1
        self._stale.clear()
        for param, slot in zip(self.params, self._slots):
            grad = param._grad
            if grad is not None and grad is not slot:
                grad.data[...] = 0
                grad._version[0] += 1

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
        self._live = self._foreign = 0
        self._stale = set()

    # -- used by the engine, the grad setter and the clipping functions ---

    def _fill(self, param, grad):
        """Copy backward's first gradient of ``param`` into its slot.

        Returns False, and leaves the gradient to the caller, when the
        array no longer fits the slot (the tensor was moved or cast).
        """
        position = self._position[id(param)]
        slot = self._slots[position]
        target = slot.data
        if (
            type(grad) is not type(target) or grad.dtype != target.dtype
            or grad.shape != target.shape
        ):
            return False
        target[...] = grad
        slot._version[0] += 1
        param._grad = slot
        self._live += 1
        self._stale.discard(position)
        return True

    def _note_assignment(self, param, value):
        position = self._position[id(param)]
        slot = self._slots[position]
        old = param._grad
        was, now = old is slot, value is slot
        self._live += now - was
        self._foreign += (value is not None and not now) - (old is not None and not was)
        if was and value is None:
            self._stale.add(position)

    def _holds_exactly(self, tensors):
        """True if ``tensors`` are this buffer's, in order, with every gradient here.

        A tensor whose gradient is None qualifies too: its slot is zeroed
        here if it still contains an old gradient.
        """
        params = self.params
        if not (
            self._live and not self._foreign and len(tensors) == len(params)
            and all(map(operator.is_, tensors, params))
        ):
            return False
        for position in self._stale:
            slot = self._slots[position]
            slot.data[...] = 0
            slot._version[0] += 1
        self._stale.clear()
        return True

    @property
    def _active_plan(self):
        """The fused norm and scaling plan, or None where the loops take over."""
        plan = self._plan
        return plan if plan is not None and plan.usable else None

    def _norm_state(self, norm_type, max_norm, reference):
        """Return float64 [norm, coefficient] over the whole buffer."""
        plan = self._active_plan
        if plan is not None:
            return plan.norm(norm_type, max_norm)
        return reference(self._flats, norm_type, max_norm)

    def _scale_(self, state):
        plan = self._active_plan
        if plan is not None:
            plan.scale_(state)
        else:
            for flat in self._flats:
                flat *= state[1].astype(flat.dtype)
        self._versions += 1

    def _clip_values_(self, clip_value):
        for flat in self._flats:
            array_module(flat).clip(flat, -clip_value, clip_value, out=flat)
        self._versions += 1


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


def _allocate(params, versions):
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
        # A one-element view: ``slot._version[0] += 1`` changes the array.
        slot._version = versions[len(slots):len(slots) + 1]
        slots.append(slot)
    return list(flats.values()), slots
