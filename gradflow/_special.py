"""Special functions that NumPy lacks (the error function, for exact GELU)."""

import functools
import math

import numpy as np

__all__ = ["erf"]


@functools.lru_cache(maxsize=1)
def _cpu_erf():
    try:
        from scipy.special import erf as scipy_erf
    except ImportError:
        scipy_erf = None
    if scipy_erf is not None:
        return scipy_erf
    import numba

    # Compiled on first use only, so importing gradflow never waits for Numba.
    @numba.vectorize(["float32(float32)", "float64(float64)"], cache=True)
    def numba_erf(x):
        return math.erf(x)

    def erf_any(x):
        if x.dtype == np.float16:
            return numba_erf(x.astype(np.float32)).astype(np.float16)
        return numba_erf(x)

    return erf_any


def erf(x):
    """Return the error function of the array ``x`` (NumPy or CuPy)."""
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return _cpu_erf()(x)
    from cupyx.scipy.special import erf as cupy_erf

    return cupy_erf(x)
