"""Matrix products through Intel MKL, when the ``mkl`` wheel is installed.

NumPy's OpenBLAS runs its products on a thread pool of its own, whose
workers busy-wait for a while after each product, so the parallel CPU
kernels share the cores with them. MKL's GNU OpenMP layer runs the
products on the same OpenMP workers as Numba's parallel loops, so products
and kernels take turns on one pool. On a 2-core Xeon, MKL also multiplied
a 256 x 512 by a 512 x 512 float32 matrix in a chain of such products in
about 0.51 ms, against 0.62 ms for OpenBLAS (benchmarks/RESULTS.md).
Batches of matrices go to MKL too, so that gradflow's own products never
wake OpenBLAS's workers while MKL's run.

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
import math
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
# The values of MKL_THREADING_LAYER that gradflow keeps: GNU OpenMP (its
# default), Intel OpenMP (the intel-openmp wheel that mkl requires) and one
# thread.
_LAYERS_KEPT = ("GNU", "INTEL", "SEQUENTIAL")
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
    """Load MKL on GNU OpenMP and return (gemms, path, set_local_threads).

    ``gemms`` maps float32 and float64 to their ``(cblas_?gemm,
    cblas_?gemm_batch_strided)``. Raises OSError when the library is
    missing or rejects a setting.
    """
    path = _library_path()
    if path is None:
        raise OSError("the mkl package is not installed (pip install 'gradflow[mkl]')")
    layer = os.environ.get("MKL_THREADING_LAYER", "").strip().upper()
    if layer and layer not in _LAYERS_KEPT:
        # MKL ends the process, with no Python exception, when the library
        # of a layer does not load (the TBB layer where libtbb is not on the
        # loader's path), so only layers that ship in the wheel are tried.
        raise OSError(
            f"MKL_THREADING_LAYER={os.environ['MKL_THREADING_LAYER']!r} is not "
            f"one of {', '.join(_LAYERS_KEPT)}; unset it or pick one of those"
        )
    # MKL's GNU threading layer calls the OpenMP runtime that the process
    # already has, so the runtime's symbols must be global. This is the
    # libgomp that Numba's OpenMP layer links.
    ctypes.CDLL("libgomp.so.1", mode=ctypes.RTLD_GLOBAL)
    library = ctypes.CDLL(path)
    if not layer:
        library.MKL_Set_Threading_Layer.argtypes = [ctypes.c_int]
        if library.MKL_Set_Threading_Layer(_THREADING_GNU) != _THREADING_GNU:
            raise OSError(f"{path} did not accept the GNU OpenMP threading layer")
    # Always LP64, whatever MKL_INTERFACE_LAYER sets, because the signatures
    # below pass 32-bit ints and ILP64 would read 64-bit ones.
    library.MKL_Set_Interface_Layer.argtypes = [ctypes.c_int]
    if library.MKL_Set_Interface_Layer(_INTERFACE_LP64) != _INTERFACE_LP64:
        raise OSError(f"{path} did not accept the LP64 interface layer")
    library.MKL_Set_Num_Threads_Local.argtypes = [ctypes.c_int]
    gemms = {}
    for letter, scalar, dtype in (("s", ctypes.c_float, np.float32),
                                  ("d", ctypes.c_double, np.float64)):
        gemm = getattr(library, f"cblas_{letter}gemm")
        gemm.restype = None
        gemm.argtypes = [ctypes.c_int] * 6 + [
            scalar, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
            scalar, ctypes.c_void_p, ctypes.c_int,
        ]
        # The same, with a stride between the matrices of each operand and a
        # batch size at the end.
        batch = getattr(library, f"cblas_{letter}gemm_batch_strided")
        batch.restype = None
        batch.argtypes = [ctypes.c_int] * 6 + [
            scalar, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
            ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
            scalar, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ]
        gemms[np.dtype(dtype)] = (gemm, batch)
    return gemms, path, library.MKL_Set_Num_Threads_Local


# dtype: (cblas_?gemm, cblas_?gemm_batch_strided)
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
        gemms, path, set_local_threads = _load()
    except (OSError, AttributeError) as error:
        if setting == "mkl":
            raise ImportError(
                f"GRADFLOW_BLAS=mkl, but MKL did not load: {error}. Unset "
                "GRADFLOW_BLAS to multiply with NumPy instead."
            ) from error
        return
    _GEMM.update(gemms)
    LIBRARY = path
    if not _products_check_out(set_local_threads):
        forget()
        if setting == "mkl":
            raise ImportError(f"GRADFLOW_BLAS=mkl, but {path} gave a wrong product")


def _products_check_out(set_local_threads):
    """Return whether MKL computes a known product and a known batch of two.

    A library that loads but computes nonsense is then not used. The check
    runs on one thread, so that importing gradflow starts no OpenMP workers
    and a process forked right after keeps the kernels.
    """
    a = np.arange(1.0, 4097.0).reshape(64, 64)
    left, right = np.stack([a, a.T]), np.stack([a.T, a])
    previous = set_local_threads(1)
    try:
        product = _multiply(a, a.T, ())
        products = _multiply(left, right, (2,))
    finally:
        set_local_threads(previous)
    expected = left @ right
    if product is None or products is None:
        return False
    return bool(np.allclose(product, expected[0], rtol=1e-12, atol=0)
                and np.allclose(products, expected, rtol=1e-12, atol=0))


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


def _batch_stride(array):
    """Return the element stride between the matrices of a batch, or None.

    ``array`` is already broadcast to the full batch, so a repeated operand
    has stride 0 along its repeated axes. None means that no single stride
    walks the matrices in order: the leading axes do not nest like those of
    a C-ordered array (a permuted batch, or a broadcast axis outside a
    strided one), or a stride is negative.
    """
    axes = [(size, stride) for size, stride in zip(array.shape[:-2], array.strides[:-2])
            if size != 1]
    if all(stride == 0 for _, stride in axes):
        return 0
    for (_, outer), (size, inner) in zip(axes, axes[1:]):
        if outer != inner * size:
            return None
    stride = axes[-1][1]
    if stride < 0 or stride % array.itemsize:
        return None
    return stride // array.itemsize


def matmul(a, b, min_work=MIN_WORK):
    """Return ``a @ b`` for NumPy arrays of two or more axes through MKL, or None.

    Both arrays must be float32 or both float64, in native byte order and
    aligned, each matrix with rows or columns at unit stride (C order,
    Fortran order, a transpose or a slice of either). Leading axes
    broadcast as in NumPy. Each MKL call walks the inner batch axes with
    one stride per operand. Where the outer axes do not nest with them (a
    weight shared along an outer axis only), MKL is called once for each of
    up to 64 combinations of the outer axes. None means that NumPy's
    product is the one to use: MKL is not loaded, the operands do not fit,
    or the product has fewer than ``min_work`` multiply-adds in all.
    """
    global ran_product
    if a.dtype not in _GEMM or b.dtype != a.dtype or not a.dtype.isnative:
        return None
    if type(a) is not np.ndarray or type(b) is not np.ndarray or a.ndim < 2 or b.ndim < 2:
        return None
    m, k = a.shape[-2:]
    n = b.shape[-1]
    if b.shape[-2] != k:
        return None
    try:
        batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError:
        return None
    if math.prod(batch) * m * n * k < max(min_work, 1):
        return None
    out = _multiply(a, b, batch)
    ran_product = ran_product or out is not None
    return out


def _multiply(a, b, batch):
    """Return ``a @ b`` through MKL, or None if the operands do not fit its call."""
    m, k = a.shape[-2:]
    n = b.shape[-1]
    count = math.prod(batch)
    if max(m, n, k, count, m * n) > _INT_MAX or not (a.flags.aligned and b.flags.aligned):
        return None
    # The first matrix of each operand gives the layout of all of them.
    layout_a = _layout(a[(0,) * (a.ndim - 2)])
    layout_b = _layout(b[(0,) * (b.ndim - 2)])
    if layout_a is None or layout_b is None or max(layout_a[1], layout_b[1]) > _INT_MAX:
        return None
    gemm, gemm_batch = _GEMM[a.dtype]

    if not batch:
        out = np.empty((m, n), dtype=a.dtype)
        gemm(_ROW_MAJOR, layout_a[0], layout_b[0], m, n, k, 1.0, a.ctypes.data,
             layout_a[1], b.ctypes.data, layout_b[1], 0.0, out.ctypes.data, n)
        return out

    a = np.broadcast_to(a, batch + (m, k))
    b = np.broadcast_to(b, batch + (k, n))
    split = _batch_split(a, b, batch)
    if split is None:
        return None
    split, stride_a, stride_b = split
    inner = math.prod(batch[split:])
    # NOTE: whether MKL's LP64 batch call computes a matrix's offset
    # (index times stride) in 32 bits is not documented, so offsets past
    # 2^31 elements stay with NumPy.
    if max(stride_a, stride_b, m * n) * inner > _INT_MAX:
        return None

    out = np.empty(batch + (m, n), dtype=a.dtype)
    for index in np.ndindex(batch[:split]):
        gemm_batch(_ROW_MAJOR, layout_a[0], layout_b[0], m, n, k, 1.0,
                   a[index].ctypes.data, layout_a[1], stride_a,
                   b[index].ctypes.data, layout_b[1], stride_b,
                   0.0, out[index].ctypes.data, n, m * n, inner)
    return out


# Most batch calls one product may take, when its outer batch axes do not
# nest with the inner ones (a weight shared along one axis only).
_MAX_CALLS = 64


def _batch_split(a, b, batch):
    """Return (outer axes to loop over, stride of a, stride of b), or None.

    The split is the fewest outer batch axes that leave inner axes walkable
    with one stride in both ``a`` and ``b`` (already broadcast to
    ``batch``). The loop over the outer axes may take at most
    ``_MAX_CALLS`` calls.
    """
    for split in range(len(batch) + 1):
        if math.prod(batch[:split]) > _MAX_CALLS:
            return None
        first = (0,) * split
        stride_a = _batch_stride(a[first])
        stride_b = _batch_stride(b[first])
        if stride_a is not None and stride_b is not None:
            return split, stride_a, stride_b
    return None


def forget():
    """Stop using MKL in this process: every product goes to NumPy after this."""
    global LIBRARY
    _GEMM.clear()
    LIBRARY = None


_start()
