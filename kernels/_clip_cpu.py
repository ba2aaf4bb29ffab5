"""CPU multi-tensor norm and scaling: one parallel Numba loop over all tensors.

A multi-tensor loop receives a table of addresses and sizes instead of a
list of arrays, so one call covers any number of tensors. ``as_pointer``
turns an address back into a typed pointer inside a CPU or CUDA kernel, and
``describe`` reads an array's address, size and layout in one compiled call,
which costs far less than ``ndarray.ctypes.data``. The caller keeps every
array alive while a loop runs on its address.

The tensors are cut into chunks of at most ``CHUNK`` elements, so the
parallel loop balances a few large tensors as well as many small ones. Each
chunk reduces into one float64 partial, whatever the gradient dtype.

The intrinsics live in this file because Numba checks only the source file
of a cached function for changes.
"""

from . import _threads
from ._threads import limit_openmp_spinning

limit_openmp_spinning()

import numba  # noqa: E402 (after the OpenMP setting above)
import numpy as np
from numba import types
from numba.extending import intrinsic

__all__ = [
    "CHUNK", "CpuPlan", "as_pointer", "chunk_table", "describe", "describe_all",
    "reduce_chunks", "scale_chunks",
]


def typed_pointer(typingctx, address, like):
    """Type ``address`` as a pointer to elements of ``like``'s dtype.

    The body of ``as_pointer`` here and of its CUDA twin in ``_launch``,
    which only register it with another target's ``intrinsic``.
    """
    if not isinstance(address, types.Integer) or not isinstance(like, types.Array):
        return None
    signature = types.CPointer(like.dtype)(address, like)

    def codegen(context, builder, sig, args):
        pointer_type = context.get_value_type(sig.return_type)
        return builder.inttoptr(args[0], pointer_type)

    return signature, codegen


# ``as_pointer(address, like)`` returns ``address`` as a pointer to
# elements of ``like``'s dtype inside a compiled function.
as_pointer = intrinsic(typed_pointer)


@intrinsic
def _array_facts(typingctx, array):
    if not isinstance(array, types.Array):
        return None
    signature = types.UniTuple(types.intp, 3)(array)
    # Numba types an array as layout "C" exactly when NumPy flags it
    # C-contiguous, so the flag is a constant of this specialization.
    is_c_contiguous = 1 if array.layout == "C" else 0

    def codegen(context, builder, sig, args):
        intp = context.get_value_type(types.intp)
        fields = context.make_array(sig.args[0])(context, builder, args[0])
        values = (
            builder.ptrtoint(fields.data, intp),
            fields.nitems,
            context.get_constant(types.intp, is_c_contiguous),
        )
        return context.make_tuple(builder, sig.return_type, values)

    return signature, codegen


@numba.njit(cache=True)
def describe(array):
    """Return (address, size, 1 if C-contiguous else 0) of a NumPy array.

    Numba cannot type float16 arrays on the CPU, so ``array`` is float32 or
    float64 (or any other dtype Numba types).
    """
    return _array_facts(array)


# 2**16 elements: 256 KiB of float32, which stays in a core's L2 cache, and
# large enough that the per-chunk overhead is negligible.
CHUNK = 1 << 16

# Reduction modes shared with the CUDA kernels.
MODE_L2, MODE_L1, MODE_INF, MODE_P = 0, 1, 2, 3


def describe_all(arrays):
    """Return (addresses, sizes) of ``arrays``, or None if one is not C-contiguous."""
    facts = np.array([describe(array) for array in arrays], dtype=np.int64)
    facts = facts.reshape(len(arrays), 3)
    if not facts[:, 2].all():
        return None
    return facts[:, 0].copy(), facts[:, 1].copy()


def chunk_table(sizes, chunk=CHUNK):
    """Return (tensor index, start, stop) arrays of the chunks covering ``sizes``."""
    counts = -(-sizes // chunk)
    tensor = np.repeat(np.arange(sizes.size, dtype=np.int64), counts)
    first = np.cumsum(counts) - counts
    start = (np.arange(tensor.size, dtype=np.int64) - np.repeat(first, counts))
    start *= chunk
    stop = np.minimum(start + chunk, sizes[tensor])
    return tensor, start, stop


@numba.njit(parallel=True, cache=True)
def reduce_chunks(addresses, tensor, start, stop, like, mode, p, partials):
    """Write each chunk's sum of |x|**p (or max |x| for MODE_INF) to ``partials``."""
    for c in numba.prange(tensor.size):
        pointer = as_pointer(addresses[tensor[c]], like)
        partials[c] = _reduce_one(pointer, start[c], stop[c], mode, p)


# "reassoc" lets LLVM split each sum into vector lanes, which a strict
# left-to-right float64 sum would forbid. It assumes nothing about NaN or Inf.
@numba.njit(cache=True, fastmath={"reassoc"})
def _reduce_one(pointer, start, stop, mode, p):
    acc = 0.0
    if mode == MODE_L2:
        for j in range(start, stop):
            v = np.float64(pointer[j])
            acc += v * v
    elif mode == MODE_L1:
        for j in range(start, stop):
            acc += abs(np.float64(pointer[j]))
    elif mode == MODE_INF:
        for j in range(start, stop):
            v = abs(np.float64(pointer[j]))
            # A NaN replaces the maximum and no later value replaces it.
            if v > acc or v != v:
                acc = v
    else:
        for j in range(start, stop):
            acc += abs(np.float64(pointer[j])) ** p
    return acc


@numba.njit(parallel=True, cache=True)
def scale_chunks(addresses, tensor, start, stop, like, coefficient):
    """Multiply every element of the tabled tensors by ``coefficient`` in place."""
    for c in numba.prange(tensor.size):
        pointer = as_pointer(addresses[tensor[c]], like)
        for j in range(start[c], stop[c]):
            pointer[j] = pointer[j] * coefficient


def norm_mode(norm_type):
    """Return the reduction mode of ``norm_type`` (a float > 0 or inf)."""
    if norm_type == 2.0:
        return MODE_L2
    if norm_type == 1.0:
        return MODE_L1
    if norm_type == float("inf"):
        return MODE_INF
    return MODE_P


def finish_norm(total, mode, p):
    """Return the norm from the reduced value (a sum of |x|**p, or a maximum)."""
    if mode == MODE_L2:
        return np.sqrt(total)
    if mode in (MODE_L1, MODE_INF):
        return total
    return total ** (1.0 / p)


def clip_coefficient(norm, max_norm):
    """Return max_norm / (norm + 1e-6) capped at 1; a NaN norm gives NaN."""
    coefficient = max_norm / (norm + 1e-6)
    return 1.0 if coefficient > 1.0 else coefficient


class CpuPlan:
    """float32 and float64 NumPy arrays tabled by dtype for the chunk loops."""

    def __init__(self, groups):
        # groups: {dtype: (arrays, addresses, tensor, start, stop)}
        self._groups = groups

    @classmethod
    def build(cls, arrays):
        """Return a plan for ``arrays``, or None if one is not C-contiguous."""
        by_dtype = {}
        for array in arrays:
            by_dtype.setdefault(array.dtype, []).append(array)
        groups = {}
        for dtype, members in by_dtype.items():
            described = describe_all(members)
            if described is None:
                return None
            addresses, sizes = described
            groups[dtype] = (members, addresses, *chunk_table(sizes, CHUNK))
        return cls(groups)

    @property
    def usable(self):
        """False in a process forked after the OpenMP workers started."""
        return not _threads.forked_from_openmp

    def norm(self, norm_type, max_norm):
        """Return float64 [total norm, clip coefficient] over every array."""
        mode = norm_mode(norm_type)
        partials = []
        for dtype, (_, addresses, tensor, start, stop) in self._groups.items():
            out = np.empty(tensor.size, dtype=np.float64)
            like = np.empty(0, dtype=dtype)
            reduce_chunks(addresses, tensor, start, stop, like, mode, norm_type, out)
            partials.append(out)
        values = np.concatenate(partials)
        if mode == MODE_INF:
            total = values.max(initial=0.0)
        else:
            total = values.sum()
        norm = finish_norm(total, mode, norm_type)
        return np.array([norm, clip_coefficient(norm, max_norm)])

    def scale_(self, state):
        """Multiply every array in place by the coefficient ``state[1]``."""
        coefficient = float(state[1])
        if coefficient == 1.0:
            return
        for dtype, (_, addresses, tensor, start, stop) in self._groups.items():
            like = np.empty(0, dtype=dtype)
            scale_chunks(addresses, tensor, start, stop, like, coefficient)
