"""CUDA multi-tensor norm and scaling, in a number of launches fixed per dtype.

The gradients of one dtype are described by one table (addresses, and the
chunks that cover them), copied to the device in one transfer. One launch
per dtype reduces every chunk into per-block float64 partials, one launch
turns all partials into the norm and the clip coefficient, and one launch
per dtype scales every gradient by that coefficient, read on the device.
No step reads a device value on the host, so nothing here synchronizes.
"""

import math

import numpy as np
from numba import cuda, float64

from ._clip_cpu import CHUNK, MODE_INF, MODE_L1, MODE_L2, chunk_table, norm_mode
from ._launch import (
    THREADS_PER_BLOCK, array_module, as_device_array, as_pointer, block_count,
    current_stream, device_address,
)

__all__ = ["CudaPlan"]

# The kernels below repeat their reduction steps instead of calling device
# functions: Numba 0.68's cuda.compile_ptx compiles a called device function
# for the current device, so a kernel that calls one cannot be compiled to
# PTX on a machine without a GPU.


@cuda.jit
def _reduce_kernel(addresses, tensor, start, stop, like, mode, p, partials, offset):
    shared = cuda.shared.array(THREADS_PER_BLOCK, float64)
    tid = cuda.threadIdx.x
    acc = 0.0
    for c in range(cuda.blockIdx.x, tensor.size, cuda.gridDim.x):
        pointer = as_pointer(addresses[tensor[c]], like)
        for j in range(start[c] + tid, stop[c], cuda.blockDim.x):
            v = abs(float64(pointer[j]))
            if mode == MODE_L2:
                acc += v * v
            elif mode == MODE_L1:
                acc += v
            elif mode == MODE_INF:
                # A NaN replaces the maximum and no later value replaces it.
                if v > acc or v != v:
                    acc = v
            else:
                acc += v ** p
    shared[tid] = acc
    cuda.syncthreads()
    # Sequential addressing: in each step the lower half of the live threads
    # folds in the upper half. Every thread reaches every barrier.
    step = THREADS_PER_BLOCK // 2
    while step > 0:
        if tid < step:
            other = shared[tid + step]
            if mode != MODE_INF:
                shared[tid] += other
            elif other > shared[tid] or other != other:
                shared[tid] = other
        cuda.syncthreads()
        step //= 2
    if tid == 0:
        partials[offset + cuda.blockIdx.x] = shared[0]


@cuda.jit
def _finish_kernel(partials, mode, p, max_norm, state):
    # One block folds every partial, then writes the norm and the coefficient.
    shared = cuda.shared.array(THREADS_PER_BLOCK, float64)
    tid = cuda.threadIdx.x
    acc = 0.0
    for i in range(tid, partials.size, cuda.blockDim.x):
        other = partials[i]
        if mode != MODE_INF:
            acc += other
        elif other > acc or other != other:
            acc = other
    shared[tid] = acc
    cuda.syncthreads()
    step = THREADS_PER_BLOCK // 2
    while step > 0:
        if tid < step:
            other = shared[tid + step]
            if mode != MODE_INF:
                shared[tid] += other
            elif other > shared[tid] or other != other:
                shared[tid] = other
        cuda.syncthreads()
        step //= 2
    if tid == 0:
        total = shared[0]
        if mode == MODE_L2:
            norm = math.sqrt(total)
        elif mode == MODE_L1 or mode == MODE_INF:
            norm = total
        else:
            norm = total ** (1.0 / p)
        coefficient = max_norm / (norm + 1e-6)
        if coefficient > 1.0:
            coefficient = 1.0
        state[0] = norm
        state[1] = coefficient


@cuda.jit
def _scale_kernel(addresses, tensor, start, stop, like, state):
    coefficient = state[1]
    # Every thread of the grid reads the same coefficient, so all of them
    # return here together; there is no barrier in this kernel.
    if coefficient == 1.0:
        return
    for c in range(cuda.blockIdx.x, tensor.size, cuda.gridDim.x):
        pointer = as_pointer(addresses[tensor[c]], like)
        for j in range(start[c] + cuda.threadIdx.x, stop[c], cuda.blockDim.x):
            pointer[j] = pointer[j] * coefficient


class CudaPlan:
    """Gradients of one CUDA device (or simulator arrays) tabled by dtype."""

    def __init__(self, groups):
        # groups: [(like, flat arrays, device table rows)]
        self._groups = groups

    @classmethod
    def build(cls, arrays):
        """Return a plan for ``arrays``, or None if one is not C-contiguous."""
        by_dtype = {}
        for array in arrays:
            if not array.flags.c_contiguous:
                return None
            # An empty array adds nothing to the norm, and leaving it out
            # keeps zero-size arrays away from the CUDA array interface.
            if array.size:
                by_dtype.setdefault(array.dtype, []).append(array)
        xp = array_module()
        groups = []
        for dtype, members in by_dtype.items():
            flat = [a.reshape(-1) for a in members]
            addresses = np.array([device_address(a) for a in flat], dtype=np.int64)
            sizes = np.array([a.size for a in flat], dtype=np.int64)
            tensor, start, stop = chunk_table(sizes, CHUNK)
            # One host-to-device copy per dtype; the rows are views into it.
            table = xp.asarray(np.concatenate([addresses, tensor, start, stop]))
            rows = _split_table(table, addresses.size, tensor.size)
            # like: only its dtype matters; it has one element for the same
            # reason as above.
            groups.append((xp.empty(1, dtype=dtype), flat, rows))
        return cls(groups)

    usable = True

    def norm(self, norm_type, max_norm):
        """Return float64 [total norm, clip coefficient] as a device array."""
        xp = array_module()
        mode = norm_mode(norm_type)
        stream = current_stream()
        grids = [block_count(rows[1].size, 1) for _, _, rows in self._groups]
        partials = xp.zeros(max(1, sum(grids)), dtype=np.float64)
        state = xp.empty(2, dtype=np.float64)
        offset = 0
        for (like, _, rows), blocks in zip(self._groups, grids):
            args = [as_device_array(x) for x in (*rows, like)]
            _reduce_kernel[blocks, THREADS_PER_BLOCK, stream](
                *args, mode, float(norm_type), as_device_array(partials), offset
            )
            offset += blocks
        _finish_kernel[1, THREADS_PER_BLOCK, stream](
            as_device_array(partials), mode, float(norm_type), float(max_norm),
            as_device_array(state),
        )
        return state

    def scale_(self, state):
        """Multiply every array in place by the device value ``state[1]``."""
        stream = current_stream()
        for like, _, rows in self._groups:
            args = [as_device_array(x) for x in (*rows, like)]
            blocks = block_count(rows[1].size, 1)
            _scale_kernel[blocks, THREADS_PER_BLOCK, stream](
                *args, as_device_array(state)
            )


def _split_table(table, tensor_count, chunk_count):
    addresses = table[:tensor_count]
    rest = table[tensor_count:]
    tensor = rest[:chunk_count]
    start = rest[chunk_count:2 * chunk_count]
    stop = rest[2 * chunk_count:]
    return addresses, tensor, start, stop
