"""Matrix products through Intel MKL, when the ``mkl`` wheel is installed.

NumPy's OpenBLAS runs its products on a thread pool of its own, whose
workers busy-wait for a while after each product, so the parallel CPU
kernels share the cores with them. MKL's GNU OpenMP layer runs the
products on the same OpenMP workers as Numba's parallel loops, so products
and kernels take turns on one pool. On a 2-core Xeon, MKL also multiplied
a 256 x 512 by a 512 x 512 float32 matrix in a chain of such products in
about 0.51 ms, against 0.62 ms for OpenBLAS (benchmarks/RESULTS.md).

``GRADFLOW_BLAS``, read at import, picks the library: ``auto`` (the
default) uses MKL where it loads, ``numpy`` never does, and ``mkl`` raises
ImportError where it cannot load. NOTE: only Linux is wired; elsewhere
``auto`` means NumPy.

A process forked after the OpenMP workers started multiplies with NumPy
(see ``_threads.forked_from_openmp``). GNU OpenMP keeps the parent's worker
pool in its state, but the child has no such threads, and its first
parallel product would wait for them forever.
"""

import ctypes
import os
import sys

import numpy as np

__all__ = ["LIBRARY", "MIN_WORK", "matmul"]

# Products of fewer multiply-adds than this (m * n * k) stay with NumPy.
# A call through ctypes costs about 7 µs more than NumPy's, so on a 2-core
# Xeon MKL was slower up to 96 x 96 by 96 x 96 and faster from 128 x 128 on.
MIN_WORK = 1 << 20

# CBLAS constants.
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
# MKL's threading and interface layer codes (mkl_service.h).
_THREADING_GNU, _INTERFACE_LP64 = 3, 0
# LP64 passes dimensions as 32-bit ints.
_INT_MAX = (1 << 31) - 1

_SETTINGS = ("auto", "mkl", "numpy")


def _setting():
    value = os.environ.get("GRADFLOW_BLAS", "auto").strip().lower() or "auto"
    if value not in _SETTINGS:
        raise ValueError(
            f"GRADFLOW_BLAS={os.environ['GRADFLOW_BLAS']!r} is not one of "
            f"{', '.join(_SETTINGS)}; unset it to let gradflow pick."
        )
    return value


def _library_path():
    """Return the path of the installed wheel's libmkl_rt, or None."""
    if not sys.platform.startswith("linux"):
        return None
    from importlib import metadata

    try:
        files = metadata.distribution("mkl").files or ()
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name.startswith("libmkl_rt.so"):
            path = file.locate()
            if os.path.exists(path):
                return str(path)
    return None


def _load():
    """Load MKL on GNU OpenMP and return (sgemm, dgemm, path, set_local_threads).

    Raises OSError when the library is missing or rejects a setting.
    """
    path = _library_path()
    if path is None:
        raise OSError("the mkl package is not installed (pip install 'gradflow[mkl]')")
    # MKL's GNU threading layer calls the OpenMP runtime that the process
    # already has, so the runtime's symbols must be global. This is the
    # libgomp that Numba's OpenMP layer links.
    ctypes.CDLL("libgomp.so.1", mode=ctypes.RTLD_GLOBAL)
    library = ctypes.CDLL(path)
    if "MKL_THREADING_LAYER" not in os.environ:
        library.MKL_Set_Threading_Layer.argtypes = [ctypes.c_int]
        if library.MKL_Set_Threading_Layer(_THREADING_GNU) != _THREADING_GNU:
            raise OSError(f"{path} did not accept the GNU OpenMP threading layer")
    # Always LP64, whatever MKL_INTERFACE_LAYER sets, because the signatures
    # below pass 32-bit ints and ILP64 would read 64-bit ones.
    library.MKL_Set_Interface_Layer.argtypes = [ctypes.c_int]
    if library.MKL_Set_Interface_Layer(_INTERFACE_LP64) != _INTERFACE_LP64:
        raise OSError(f"{path} did not accept the LP64 interface layer")
    library.MKL_Set_Num_Threads_Local.argtypes = [ctypes.c_int]
    functions = []
    for name, scalar in (("cblas_sgemm", ctypes.c_float), ("cblas_dgemm", ctypes.c_double)):
        function = getattr(library, name)
        function.restype = None
        function.argtypes = [ctypes.c_int] * 6 + [
            scalar, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
            scalar, ctypes.c_void_p, ctypes.c_int,
        ]
        functions.append(function)
    return functions[0], functions[1], path, library.MKL_Set_Num_Threads_Local


_GEMM = {}
LIBRARY = None  # the loaded libmkl_rt's path, or None when NumPy multiplies
# Whether ``matmul`` has multiplied through MKL in this process, which
# starts the OpenMP workers (the one-thread check at import does not).
ran_product = False


def _start():
    global LIBRARY
    setting = _setting()
    if setting == "numpy":
        return
    try:
        sgemm, dgemm, path, set_local_threads = _load()
    except (OSError, AttributeError) as error:
        if setting == "mkl":
            raise ImportError(
                f"GRADFLOW_BLAS=mkl, but MKL did not load: {error}. Install it "
                "with pip install 'gradflow[mkl]', or unset GRADFLOW_BLAS."
            ) from error
        return
    _GEMM[np.dtype(np.float32)] = sgemm
    _GEMM[np.dtype(np.float64)] = dgemm
    LIBRARY = path
    # One known product, so that a library that loads but computes nonsense
    # is not used. It runs on one thread, so that importing gradflow starts
    # no OpenMP workers and a process forked right after keeps the kernels.
    a = np.arange(1.0, 4097.0).reshape(64, 64)
    previous = set_local_threads(1)
    try:
        product = _multiply(a, a.T)
    finally:
        set_local_threads(previous)
    if not np.allclose(product, a @ a.T, rtol=1e-12, atol=0):
        forget()
        if setting == "mkl":
            raise ImportError(f"GRADFLOW_BLAS=mkl, but {path} gave a wrong product")


def _layout(array):
    """Return (transpose flag, leading dimension) of a 2-D array, or None."""
    rows, cols = array.shape
    item = array.itemsize
    row_stride, col_stride = array.strides
    # A stride along an axis of length 1 is never used.
    if rows == 1:
        row_stride = cols * item
    if cols == 1:
        col_stride = item
    if col_stride == item and row_stride % item == 0 and row_stride >= cols * item:
        return _NO_TRANS, row_stride // item
    if row_stride == item and col_stride % item == 0 and col_stride >= rows * item:
        return _TRANS, col_stride // item
    return None


def matmul(a, b, min_work=MIN_WORK):
    """Return ``a @ b`` for 2-D NumPy arrays through MKL, or None.

    Both arrays must be float32 or both float64, in native byte order and
    aligned, each with rows or columns at unit stride (C order, Fortran
    order, a transpose or a slice of either). None means that NumPy's
    product is the one to use: MKL is not loaded, the operands do not fit,
    or the product has fewer than ``min_work`` multiply-adds.
    """
    global ran_product
    if a.dtype not in _GEMM or b.dtype != a.dtype or not a.dtype.isnative:
        return None
    if type(a) is not np.ndarray or type(b) is not np.ndarray or a.ndim != 2 or b.ndim != 2:
        return None
    m, k = a.shape
    if b.shape[0] != k or m * b.shape[1] * k < max(min_work, 1):
        return None
    out = _multiply(a, b)
    ran_product = ran_product or out is not None
    return out


def _multiply(a, b):
    """Return ``a @ b`` through MKL, or None if the operands do not fit its call."""
    m, k = a.shape
    n = b.shape[1]
    if max(m, n, k) > _INT_MAX or not (a.flags.aligned and b.flags.aligned):
        return None
    layout_a = _layout(a)
    layout_b = _layout(b)
    if layout_a is None or layout_b is None or max(layout_a[1], layout_b[1]) > _INT_MAX:
        return None
    out = np.empty((m, n), dtype=a.dtype)
    _GEMM[a.dtype](_ROW_MAJOR, layout_a[0], layout_b[0], m, n, k, 1.0, a.ctypes.data,
                   layout_a[1], b.ctypes.data, layout_b[1], 0.0, out.ctypes.data, n)
    return out


def forget():
    """Stop using MKL in this process: every product goes to NumPy after this."""
    global LIBRARY
    _GEMM.clear()
    LIBRARY = None


_start()
