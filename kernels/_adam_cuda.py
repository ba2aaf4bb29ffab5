"""CUDA Adam update: one launch updates every tensor of one dtype of a group.

The kernel receives the same tables as the CPU loop in ``_adam_cpu``: the
addresses of each tensor's parameter, gradient, ``exp_avg``, ``exp_avg_sq``
and, for amsgrad, ``max_exp_avg_sq``, its float64 step scalars, and the
chunks that cover the tensors. All of them travel to the device in one
host-to-device copy. Each block takes one chunk at a time and its threads
stride through the chunk's elements, so any grid covers any number of
tensors. The copy and the launch go on CuPy's current stream, and no step
reads a device value on the host.

The arithmetic runs in float64 and each value is rounded once, when the
kernel stores it, as on the CPU, for float16, float32 and float64 alike.

NOTE: this kernel has not run on a real GPU yet, only under the CUDA
simulator, and its PTX for sm_90 has only been compiled. On GPUs with few
FP64 units the float64 arithmetic may bound its speed; no timing exists.
"""

import math

import numpy as np
from numba import cuda, float64

from ._adam_cpu import (
    DECAY, EXP_AVG, EXP_AVG_SQ, GRAD, INV_SQRT_BIAS_CORRECTION2, MAX_EXP_AVG_SQ, PARAM,
    STEP_SIZE,
)
from ._clip_cpu import CHUNK, chunk_table
from ._launch import (
    SIMULATOR, THREADS_PER_BLOCK, array_module, as_device_array, as_pointer,
    block_count, current_stream, device_address,
)

__all__ = ["CudaAdamTable"]

_ADDRESS_COLUMNS = 5
_SCALAR_COLUMNS = 3


# The formulas are written out in the kernel instead of calling device
# functions: Numba 0.68's cuda.compile_ptx compiles a called device function
# for the current device, so such a kernel cannot be compiled to PTX on a
# machine without a GPU.
@cuda.jit
def _adam_kernel(addresses, tensor, start, stop, like, scalars,
                 beta1, beta2, eps, weight_decay, sign, amsgrad):
    """Apply one Adam step in place to every chunk of the tabled tensors.

    ``scalars`` and the trailing float64 options are those of
    ``_adam_cpu.adam_chunks``, so ``amsgrad`` is 1.0 or 0.0.
    """
    for c in range(cuda.blockIdx.x, tensor.size, cuda.gridDim.x):
        t = tensor[c]
        param = as_pointer(addresses[t, PARAM], like)
        grad = as_pointer(addresses[t, GRAD], like)
        exp_avg = as_pointer(addresses[t, EXP_AVG], like)
        exp_avg_sq = as_pointer(addresses[t, EXP_AVG_SQ], like)
        if amsgrad != 0.0:
            # Without amsgrad the column contains 0, which is never dereferenced.
            max_sq = as_pointer(addresses[t, MAX_EXP_AVG_SQ], like)
        step_size = scalars[t, STEP_SIZE]
        inv_correction = scalars[t, INV_SQRT_BIAS_CORRECTION2]
        decay = scalars[t, DECAY]
        for j in range(start[c] + cuda.threadIdx.x, stop[c], cuda.blockDim.x):
            p = float64(param[j]) * decay
            g = sign * float64(grad[j])
            # Skipped at 0, so that an infinite parameter does not turn g into NaN.
            if weight_decay != 0.0:
                g += weight_decay * p
            m = float64(exp_avg[j])
            # From the nearer end, as the per-parameter update does.
            if beta1 > 0.5:
                exp_avg[j] = m + (1.0 - beta1) * (g - m)
            else:
                exp_avg[j] = g - beta1 * (g - m)
            exp_avg_sq[j] = float64(exp_avg_sq[j]) * beta2 + (1.0 - beta2) * g * g
            # Read back rounded to the array dtype, as the next step reads them.
            m = float64(exp_avg[j])
            v = float64(exp_avg_sq[j])
            if amsgrad != 0.0:
                v_max = float64(max_sq[j])
                # np.maximum's rule: a NaN on either side wins.
                if v > v_max or v != v:
                    v_max = v
                max_sq[j] = v_max
                v = v_max
            param[j] = p - step_size * m / (math.sqrt(v) * inv_correction + eps)


class CudaAdamTable:
    """The tables of one group's tensors of one dtype on one CUDA device.

    Under the simulator the tensors are NumPy arrays. ``add`` and ``run``
    behave as those of ``_adam_cpu.AdamTable``.
    """

    def __init__(self, like):
        # like: an array of the tensors' device and dtype.
        self.dtype = like.dtype
        self.device = None if SIMULATOR else like.device
        self.rows = []
        self.sizes = []
        self.scalars = []
        self.keep_alive = []

    def add(self, arrays, scalars):
        """Table ``arrays`` (param, grad, exp_avg, exp_avg_sq[, max_exp_avg_sq]).

        Returns False, adding nothing, if one of them is not C-contiguous.
        """
        if not all(array.flags.c_contiguous for array in arrays):
            return False
        # An empty tensor has nothing to update, and leaving it out keeps
        # zero-size arrays away from the CUDA array interface.
        if arrays[PARAM].size == 0:
            return True
        flat = [array.reshape(-1) for array in arrays]
        row = [device_address(array) for array in flat]
        self.rows.append(row + [0] * (_ADDRESS_COLUMNS - len(row)))
        self.sizes.append(flat[PARAM].size)
        self.scalars.append(scalars)
        self.keep_alive.append(flat)
        return True

    def run(self, options):
        """Update every tabled tensor in place with one kernel launch.

        ``options`` is the tuple of ``_adam_cpu.adam_chunks``. The launch is
        queued on CuPy's current stream and ``run`` returns without waiting.
        """
        if not self.rows:
            return
        if self.device is None:
            self._launch(options)
            return
        with self.device:
            self._launch(options)

    def _launch(self, options):
        tables = _device_tables(self.rows, self.sizes, self.scalars)
        xp = array_module()
        # like: only its dtype matters; it has one element because a
        # zero-size array may have no device pointer.
        like = xp.empty(1, dtype=self.dtype)
        args = [as_device_array(x) for x in (*tables[:4], like, tables[4])]
        blocks = block_count(tables[1].size, 1)
        _adam_kernel[blocks, THREADS_PER_BLOCK, current_stream()](
            *args, *(float(option) for option in options)
        )


def _device_tables(rows, sizes, scalars):
    """Return (addresses, tensor, start, stop, scalars) copied in one transfer.

    The float64 scalars travel as the bits of int64 values, so every table
    is a view into one int64 device array.
    """
    addresses = np.array(rows, dtype=np.int64)
    tensor, start, stop = chunk_table(np.array(sizes, dtype=np.int64), CHUNK)
    scalar_bits = np.array(scalars, dtype=np.float64).view(np.int64)
    parts = [addresses.reshape(-1), tensor, start, stop, scalar_bits.reshape(-1)]
    table = array_module().asarray(np.concatenate(parts))
    bounds = np.cumsum([0] + [part.size for part in parts]).tolist()
    views = [table[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    views[0] = views[0].reshape(-1, _ADDRESS_COLUMNS)
    views[4] = views[4].view(np.float64).reshape(-1, _SCALAR_COLUMNS)
    return views
