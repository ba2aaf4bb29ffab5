"""CPU Adam update: one parallel Numba loop over every tensor of a group.

The loop receives a table of addresses (parameter, gradient, ``exp_avg``,
``exp_avg_sq`` and, for amsgrad, ``max_exp_avg_sq`` of each tensor) and
per-tensor step scalars. The tensors are cut into chunks as the clipping
loops cut them, so one call updates any number of tensors in a single pass
over their memory and allocates no temporaries. The caller keeps every array alive while the loop
runs on its address.

The arithmetic runs in float64 and each value is rounded once, when the
loop stores it, so float32 results may differ from NumPy's float32
expressions by a few units in the last place.

NOTE: ``as_pointer`` comes from ``_clip_cpu``, and Numba checks only this
file for changes before loading a cached compile of the loop below. After
editing ``as_pointer`` there, delete this file's cache (``__pycache__``).
"""

from ._threads import limit_openmp_spinning

limit_openmp_spinning()

import numba  # noqa: E402 (after the OpenMP setting above)
import numpy as np

from ._clip_cpu import CHUNK, as_pointer, chunk_table, describe

__all__ = ["AdamTable", "adam_chunks"]

# Columns of the address table.
PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ = range(5)

# Columns of the per-tensor scalar table.
STEP_SIZE, INV_SQRT_BIAS_CORRECTION2, DECAY = range(3)


@numba.njit(parallel=True, cache=True, error_model="numpy")
def adam_chunks(addresses, tensor, start, stop, like, scalars, options):
    """Apply one Adam step to every chunk of the tabled tensors in place.

    ``scalars[t]`` contains tensor t's lr / (1 - beta1**step),
    1 / sqrt(1 - beta2**step) and decoupled decay factor
    1 - lr * weight_decay (1.0 without decoupled decay). ``options`` is
    float64 [beta1, beta2, eps, coupled weight_decay, gradient sign (-1.0 to
    maximize), amsgrad (0 or 1)].

    Float64 division and square root bound the loop, so it multiplies by
    the reciprocal of the bias correction instead of dividing by it. That
    made it about a quarter faster on an AVX-512 Xeon.
    """
    beta1, beta2, eps = options[0], options[1], options[2]
    weight_decay, sign = options[3], options[4]
    amsgrad = options[5] != 0.0
    for c in numba.prange(tensor.size):
        t = tensor[c]
        param = as_pointer(addresses[t, PARAM], like)
        grad = as_pointer(addresses[t, GRAD], like)
        exp_avg = as_pointer(addresses[t, EXP_AVG], like)
        exp_avg_sq = as_pointer(addresses[t, EXP_AVG_SQ], like)
        step_size = scalars[t, STEP_SIZE]
        inv_correction = scalars[t, INV_SQRT_BIAS_CORRECTION2]
        decay = scalars[t, DECAY]
        if amsgrad:
            max_sq = as_pointer(addresses[t, MAX_EXP_AVG_SQ], like)
            for j in range(start[c], stop[c]):
                p = np.float64(param[j]) * decay
                g = _decayed_grad(grad[j], p, sign, weight_decay)
                m, v = _moments(exp_avg, exp_avg_sq, j, g, beta1, beta2)
                v_max = np.float64(max_sq[j])
                # np.maximum's rule: a NaN on either side wins.
                if v > v_max or v != v:
                    v_max = v
                max_sq[j] = v_max
                param[j] = p - step_size * m / (np.sqrt(v_max) * inv_correction + eps)
        else:
            for j in range(start[c], stop[c]):
                p = np.float64(param[j]) * decay
                g = _decayed_grad(grad[j], p, sign, weight_decay)
                m, v = _moments(exp_avg, exp_avg_sq, j, g, beta1, beta2)
                param[j] = p - step_size * m / (np.sqrt(v) * inv_correction + eps)


@numba.njit(cache=True, error_model="numpy")
def _decayed_grad(grad, param, sign, weight_decay):
    g = sign * np.float64(grad)
    # Skipped at 0, so that an infinite parameter does not turn g into NaN.
    if weight_decay != 0.0:
        g += weight_decay * param
    return g


@numba.njit(cache=True, error_model="numpy")
def _moments(exp_avg, exp_avg_sq, j, g, beta1, beta2):
    m = np.float64(exp_avg[j])
    # From the nearer end, as the per-parameter update and torch.lerp do.
    if beta1 > 0.5:
        m += (1.0 - beta1) * (g - m)
    else:
        m = g - beta1 * (g - m)
    v = np.float64(exp_avg_sq[j]) * beta2 + (1.0 - beta2) * g * g
    exp_avg[j] = m
    exp_avg_sq[j] = v
    # Rounded to the array dtype, as the stored moments the next step reads,
    # and widened again so that the square root runs in float64. A float32
    # square root of a subnormal exp_avg_sq takes a slow microcode assist.
    return np.float64(exp_avg[j]), np.float64(exp_avg_sq[j])


# Chunk tables by the tensor sizes they cover. A training loop updates the
# same sizes every step, so the table is built once, not once per step.
_CHUNKS = {}
_CHUNKS_KEPT = 16


def cached_chunks(sizes):
    """Return ``chunk_table(sizes, CHUNK)``, reusing one built for the same sizes."""
    key = sizes.tobytes()
    chunks = _CHUNKS.get(key)
    if chunks is None:
        if len(_CHUNKS) >= _CHUNKS_KEPT:
            _CHUNKS.pop(next(iter(_CHUNKS)))
        chunks = _CHUNKS[key] = chunk_table(sizes, CHUNK)
    return chunks


class AdamTable:
    """The address table and chunks of one group's tensors of one dtype."""

    def __init__(self, dtype):
        self.like = np.empty(0, dtype=dtype)
        self.rows = []
        self.scalars = []
        self.keep_alive = []

    def add(self, arrays, scalars):
        """Table ``arrays`` (param, grad, exp_avg, exp_avg_sq[, max_exp_avg_sq]).

        Returns False, adding nothing, if one of them is not C-contiguous.
        """
        row = [0, 0, 0, 0, 0]
        for column, array in enumerate(arrays):
            address, _, contiguous = describe(array)
            if not contiguous:
                return False
            row[column] = address
        row.append(arrays[PARAM].size)
        self.rows.append(row)
        self.scalars.append(scalars)
        self.keep_alive.append(arrays)
        return True

    def run(self, options):
        """Update every tabled tensor in place; ``options`` as ``adam_chunks``."""
        if not self.rows:
            return
        table = np.array(self.rows, dtype=np.int64)
        addresses = np.ascontiguousarray(table[:, :5])
        tensor, start, stop = cached_chunks(table[:, 5])
        scalars = np.array(self.scalars, dtype=np.float64)
        options = np.array(options, dtype=np.float64)
        adam_chunks(addresses, tensor, start, stop, self.like, scalars, options)
