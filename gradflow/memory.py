"""Memory accounting: the arrays the tape keeps for backward, and allocator peaks.

``Ledger`` counts, while it is active, the bytes that live records hold for
backward: the arrays in ``ctx.saved`` and the arrays some ops keep in plain
``ctx`` attributes (index arrays, dropout masks, checkpoint snapshots). A
saved value that a saved-tensor pack hook replaced counts with the arrays it
still holds. An array that a selective checkpoint recomputes for backward
counts from its recomputation until it is freed. An array reachable from
several records, also as a view, is counted once, by the buffer that owns its
memory. Buffers owned by leaf tensors (parameters, input data) are reported
apart from activations, since they live anyway.

``peak`` measures the allocator's high-water mark over a block: tracemalloc
on the CPU (NumPy reports its buffers to it), a CuPy memory hook on a GPU.

>>> with gf.memory.Ledger() as ledger:
...     loss = model(x).sum()
...     held = ledger.activation_bytes
...     loss.backward()
>>> ledger.peak_activation_bytes >= held
True
"""

import contextlib
import os
import sys
import tracemalloc
import weakref

from .autograd import _function

__all__ = ["Ledger", "SavedArray", "note_recomputed", "peak", "saved_arrays"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_active = []
# Arrays that some leaf tensor wraps but that are activations all the same
# (the leaf proxies a checkpoint recomputes from); never counted as leaves.
_activation_owners = weakref.WeakValueDictionary()


def mark_activation(array):
    """Count the memory of ``array`` as an activation even where a leaf wraps it."""
    owner = _owner(array)
    try:
        _activation_owners[id(owner)] = owner
    except TypeError:
        pass


class SavedArray:
    """One array a record keeps: its op, shape, dtype, device and bytes.

    ``bytes`` is the size of the buffer that owns the memory, and is 0 when
    an earlier record already keeps that buffer. ``leaf`` is True for memory
    owned by a leaf tensor. ``where`` is "file:line in function" of the user
    code that created the record, when the ledger was asked for it.
    """

    __slots__ = ("op", "shape", "dtype", "device", "bytes", "leaf", "where")

    def __init__(self, op, shape, dtype, device, nbytes, leaf, where):
        self.op = op
        self.shape = shape
        self.dtype = dtype
        self.device = device
        self.bytes = nbytes
        self.leaf = leaf
        self.where = where

    def __repr__(self):
        kind = "leaf" if self.leaf else "activation"
        where = f" at {self.where}" if self.where else ""
        return (f"SavedArray({self.op}, shape={self.shape}, dtype={self.dtype}, "
                f"device={self.device}, bytes={self.bytes}, {kind}{where})")


def _is_array(value):
    return hasattr(value, "nbytes") and (
        hasattr(value, "__array_interface__")
        or hasattr(value, "__cuda_array_interface__")
    )


def _owner(array):
    """Return the array (or buffer) that owns the memory of ``array``."""
    while getattr(array, "base", None) is not None and _is_array(array.base):
        array = array.base
    return array


def saved_arrays(record):
    """Return the arrays ``record`` keeps for backward, as (array, source) pairs.

    ``source`` is "saved" for ``ctx.saved`` (freed by backward) and
    "attribute" for arrays in plain ``ctx`` attributes (freed with the record).
    """
    found = []
    for value in _saved_values(record):
        array = value.data if hasattr(value, "grad_fn") else value
        if _is_array(array):
            found.append((array, "saved"))
    for value in record.__dict__.values():
        for array in _arrays_in(value):
            found.append((array, "attribute"))
    return found


def _arrays_in(value):
    if _is_array(value):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [v for v in value if _is_array(v)]
    return []


def _saved_values(record):
    """Return the Tensors and arrays in ``record.saved``, packed ones unwrapped.

    A pack hook may return a Tensor, an array, a tuple or list of them, or an
    object whose ``held_arrays()`` lists the arrays it keeps. Other objects
    hold nothing the ledger counts (an array moved to the host, for example).
    """
    values = []
    for value in record.saved:
        if type(value) is not _function._Packed:
            values.append(value)
            continue
        packed = value.packed
        if hasattr(packed, "held_arrays"):
            values += packed.held_arrays()
        elif isinstance(packed, (tuple, list)):
            values += packed
        else:
            values.append(packed)
    return values


def _leaf_arrays(record):
    """Return the arrays of leaf tensors that ``record`` reads."""
    leaves = []
    for edge in record.edges:
        if edge is not None and type(edge) is not tuple:
            leaves.append(edge.data)
    for value in _saved_values(record):
        if hasattr(value, "grad_fn") and value.grad_fn is None:
            leaves.append(value.data)
    return leaves


class _Buffer:
    __slots__ = ("count", "nbytes", "leaf")

    def __init__(self, nbytes, leaf):
        self.count = 0
        self.nbytes = nbytes
        self.leaf = leaf


class Ledger:
    """Count the bytes that the records created inside a ``with`` block hold.

    Only records made while the ledger is active are counted. With
    ``stack=True`` each record also notes the first frame outside gradflow;
    without it no frame is ever inspected.
    """

    def __init__(self, stack=False):
        self.stack = stack
        self._buffers = {}
        self._records = {}
        self._leaf_owners = weakref.WeakValueDictionary()
        self.total_bytes = 0
        self.leaf_bytes = 0
        self.peak_activation_bytes = 0

    @property
    def activation_bytes(self):
        """Bytes held now for backward, excluding memory owned by leaf tensors."""
        return self.total_bytes - self.leaf_bytes

    @property
    def attribute_bytes(self):
        """Activation bytes that live records keep in plain ``ctx`` attributes.

        Backward does not free these, unlike ``ctx.saved``: they stay until
        their record is dropped, in general when the whole graph is.
        """
        keys = set()
        for entry in self._records.values():
            keys.update(entry[2])
        buffers = (self._buffers[key] for key in keys)
        return sum(buffer.nbytes for buffer in buffers if not buffer.leaf)

    def reset_peak(self):
        """Restart the peak from the bytes held now."""
        self.peak_activation_bytes = self.activation_bytes

    def __enter__(self):
        _function.record_hooks.append(self._on_record)
        _function.release_hooks.append(self._on_release)
        _active.append(self)
        return self

    def __exit__(self, *exc_info):
        _function.record_hooks.remove(self._on_record)
        _function.release_hooks.remove(self._on_release)
        _active.remove(self)
        return False

    def holds(self, array):
        """Return True when a counted record keeps the memory of ``array``."""
        buffer = self._buffers.get(id(_owner(array)))
        return buffer is not None and buffer.count > 0

    def records(self):
        """Return a ``SavedArray`` for each array the live records keep."""
        seen = set()
        rows = []
        for entry in list(self._records.values()):
            record = entry[0]()
            if record is None:
                continue
            for array, _ in saved_arrays(record):
                key = id(_owner(array))
                buffer = self._buffers.get(key)
                nbytes = 0 if key in seen or buffer is None else buffer.nbytes
                seen.add(key)
                rows.append(SavedArray(
                    record.name, tuple(array.shape), array.dtype,
                    _device_name(array), nbytes, bool(buffer and buffer.leaf),
                    entry[3],
                ))
        return rows

    # -- bookkeeping ---------------------------------------------------

    def _on_record(self, record):
        for array in _leaf_arrays(record):
            self._mark_leaf(_owner(array))
        saved, attributes = [], []
        for array, source in saved_arrays(record):
            key = self._add(_owner(array))
            (saved if source == "saved" else attributes).append(key)
        where = _user_frame() if self.stack else None
        ref = weakref.ref(record, self._forget_callback(id(record)))
        self._records[id(record)] = [ref, saved, attributes, where]

    def _forget_callback(self, key):
        def forget(_):
            entry = self._records.pop(key, None)
            if entry is not None:
                self._drop(entry[1] + entry[2])

        return forget

    def _on_release(self, record):
        entry = self._records.get(id(record))
        if entry is not None and entry[0]() is record:
            self._drop(entry[1])
            entry[1] = []

    def _recount_attributes(self, record):
        entry = self._records.get(id(record))
        if entry is None or entry[0]() is not record:
            return
        keys = [self._add(_owner(a)) for a, source in saved_arrays(record)
                if source == "attribute"]
        self._drop(entry[2])
        entry[2] = keys

    def _mark_leaf(self, owner):
        key = id(owner)
        if _activation_owners.get(key) is owner:
            return
        try:
            self._leaf_owners[key] = owner
        except TypeError:
            return
        buffer = self._buffers.get(key)
        if buffer is not None and not buffer.leaf and buffer.count > 0:
            buffer.leaf = True
            self.leaf_bytes += buffer.nbytes

    def _is_leaf_owner(self, owner):
        return self._leaf_owners.get(id(owner)) is owner

    def _add(self, owner):
        key = id(owner)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = _Buffer(
                int(owner.nbytes), self._is_leaf_owner(owner)
            )
        if buffer.count == 0:
            self.total_bytes += buffer.nbytes
            if buffer.leaf:
                self.leaf_bytes += buffer.nbytes
            else:
                self.peak_activation_bytes = max(
                    self.peak_activation_bytes, self.activation_bytes
                )
        buffer.count += 1
        return key

    def _drop(self, keys):
        for key in keys:
            buffer = self._buffers[key]
            buffer.count -= 1
            if buffer.count == 0:
                self.total_bytes -= buffer.nbytes
                if buffer.leaf:
                    self.leaf_bytes -= buffer.nbytes
                del self._buffers[key]


def note_recomputed(array):
    """Count ``array`` in every active ledger for as long as it lives.

    The selective checkpoint calls this for each array it recomputes for a
    backward, which frees it when that backward returns.
    """
    for ledger in _active:
        key = ledger._add(_owner(array))
        weakref.finalize(array, ledger._drop, [key])


def notify_attributes_changed(record):
    """Recount ``record``'s attribute arrays in every active ledger.

    Code that changes the arrays a record keeps in plain attributes after it
    was created (the binomial checkpoint schedule's snapshots) calls this.
    """
    for ledger in _active:
        ledger._recount_attributes(record)


def _device_name(array):
    device = getattr(array, "device", None)
    if device is None or isinstance(device, str):
        return "cpu"
    return f"cuda:{getattr(device, 'id', 0)}"


def _user_frame():
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
    if frame is None:
        return None
    code = frame.f_code
    return f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"


class _Peak:
    """The allocator peak of a ``peak`` block, in bytes above its start."""

    def __init__(self, device):
        self.device = device
        self.peak_bytes = 0
        self._baseline = 0
        self._hook = None

    def reset(self):
        """Restart the peak from the bytes allocated now."""
        if self._hook is not None:
            self._hook.peak = self._hook.in_use
            self._baseline = self._hook.in_use
        else:
            tracemalloc.reset_peak()
            self._baseline = tracemalloc.get_traced_memory()[0]
        self.peak_bytes = 0

    def update(self):
        """Store the peak so far in ``peak_bytes`` and return it."""
        if self._hook is not None:
            top = self._hook.peak
        else:
            top = tracemalloc.get_traced_memory()[1]
        self.peak_bytes = max(0, top - self._baseline)
        return self.peak_bytes


@contextlib.contextmanager
def peak(device="cpu"):
    """Measure the allocator's peak over a block, as bytes above its start.

    On the CPU it uses tracemalloc, started for the block if it was not
    running; tracemalloc slows Python-heavy code, so time such code in a
    separate run. On a CUDA device it installs a CuPy memory hook that
    tracks the bytes in use from CuPy's pool. Call ``reset()`` on the object
    to restart the measurement inside the block.

    >>> with gf.memory.peak() as p:
    ...     y = model(x)
    >>> p.peak_bytes
    """
    from . import _device

    dev = _device.device(device)
    result = _Peak(dev)
    if dev.type == "cpu":
        started = not tracemalloc.is_tracing()
        if started:
            tracemalloc.start()
        try:
            result.reset()
            yield result
            result.update()
        finally:
            if started:
                tracemalloc.stop()
        return
    with _cuda_peak_hook(dev) as hook:
        result._hook = hook
        result.reset()
        yield result
        result.update()


@contextlib.contextmanager
def _cuda_peak_hook(dev):
    # NOTE: written against CuPy's MemoryHook interface (malloc_postprocess and
    # free_postprocess with mem_size, CuPy 12 and 13) but not yet run on a GPU.
    cupy = dev.xp
    pool = cupy.get_default_memory_pool()

    class PeakHook(cupy.cuda.MemoryHook):
        name = "gradflow_peak"

        def __init__(self):
            self.in_use = pool.used_bytes()
            self.peak = self.in_use

        def malloc_postprocess(self, **kwargs):
            if kwargs.get("device_id", dev.index) == dev.index:
                self.in_use += kwargs["mem_size"]
                self.peak = max(self.peak, self.in_use)

        def free_postprocess(self, **kwargs):
            if kwargs.get("device_id", dev.index) == dev.index:
                self.in_use -= kwargs["mem_size"]

    hook = PeakHook()
    with dev, hook:
        yield hook
