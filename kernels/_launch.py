"""Launch arithmetic, stream choice and typed pointers shared by the CUDA kernels.

Importing this module imports ``numba.cuda``. Under Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``) every CUDA thread is a Python thread, so the
launches are kept tiny there; the kernels are the same.

Multi-tensor kernels receive a table of addresses and turn each into a
typed pointer with ``as_pointer``. Under the simulator the arrays are NumPy
arrays and an address is looked up in a registry of the arrays passed to
``device_address``, because the simulator runs kernels as Python and cannot
dereference a raw address.
"""

import functools
import weakref

import numba
import numpy as np
from numba import cuda

__all__ = [
    "SIMULATOR", "THREADS_PER_BLOCK", "array_module", "as_device_array",
    "as_pointer", "block_count", "current_stream", "device_address",
]

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)

if SIMULATOR:
    _registered_arrays = weakref.WeakValueDictionary()

    def as_pointer(address, like):
        return _registered_arrays[int(address)]
else:
    from numba.cuda.extending import intrinsic

    from ._clip_cpu import typed_pointer

    # The CUDA twin of _clip_cpu.as_pointer: CUDA kernels resolve intrinsics
    # registered through numba.cuda.extending.
    as_pointer = intrinsic(typed_pointer)


def device_address(flat):
    """Return the address of the 1-D array ``flat`` for ``as_pointer``.

    Under the simulator a non-empty ``flat`` is registered under its address,
    for as long as the caller keeps it alive.
    """
    if SIMULATOR:
        address = flat.ctypes.data
        if flat.size:
            _registered_arrays[address] = flat
        return address
    return flat.data.ptr


def array_module():
    """Return the module of the kernels' arrays: cupy, or numpy under the simulator."""
    if SIMULATOR:
        return np
    import cupy

    return cupy

# 256 threads: a multiple of the 32-thread warp, and 8 warps per block, so
# an SM (2048 resident threads on sm_80 and sm_90) holds 8 blocks and can
# switch between warps to hide memory latency. Reduction kernels size their
# shared memory from this constant, so it must stay a power of two.
THREADS_PER_BLOCK = 8 if SIMULATOR else 256

# Grid-stride loops let any grid cover any size, so the grid stops at 4 full
# waves of resident blocks: enough to keep every SM busy through the tail,
# without scheduling blocks that would each touch a handful of elements.
_WAVES = 4
_BLOCKS_PER_SM = 2048 // THREADS_PER_BLOCK
_SIMULATOR_MAX_BLOCKS = 2


def block_count(work_items, items_per_block=THREADS_PER_BLOCK):
    """Return the grid size for ``work_items`` handled ``items_per_block`` at a time."""
    needed = max(1, -(-work_items // items_per_block))
    return min(needed, _max_blocks())


def _max_blocks():
    if SIMULATOR:
        return _SIMULATOR_MAX_BLOCKS
    import cupy

    # CuPy's current device is the one the arrays and the stream belong to.
    return _max_blocks_on(cupy.cuda.runtime.getDevice())


@functools.lru_cache(maxsize=None)
def _max_blocks_on(device_id):
    import cupy

    attributes = cupy.cuda.Device(device_id).attributes
    return attributes["MultiProcessorCount"] * _BLOCKS_PER_SM * _WAVES


_streams = {}


def current_stream():
    """Return CuPy's current stream as a Numba stream (0 under the simulator).

    Launching on it orders each kernel after the CuPy work that produced its
    inputs, without a host synchronization.
    """
    if SIMULATOR:
        return 0
    import cupy

    pointer = cupy.cuda.get_current_stream().ptr
    stream = _streams.get(pointer)
    if stream is None:
        stream = _streams[pointer] = cuda.external_stream(pointer)
    return stream


def as_device_array(array):
    """Return a CuPy array as a Numba device array, without a stream sync.

    ``numba.cuda.as_cuda_array`` synchronizes the stream that CuPy exports in
    ``__cuda_array_interface__``, which would block the host. The kernels run
    on that same stream, so the order is already right. Under the simulator
    the NumPy array is returned unchanged.
    """
    if SIMULATOR:
        return array
    return cuda.from_cuda_array_interface(
        array.__cuda_array_interface__, owner=array, sync=False
    )
