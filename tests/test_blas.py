"""Matrix products through MKL (gradflow_kernels._blas) and the NumPy fallback."""

import math

import numpy as np
import pytest

import gradflow as gf
from gradflow_kernels import _blas
from fresh_python import output_lines, run_python

needs_mkl = pytest.mark.skipif(_blas.LIBRARY is None, reason="MKL is not installed")

# 102 x 102 by 102 x 102 is the smallest square product MKL takes.
N = 102


def _operands(dtype, m=N, k=N, n=N, seed=0):
    assert m * k * n >= _blas.MIN_WORK
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((m, k)).astype(dtype),
            rng.standard_normal((k, n)).astype(dtype))


def _check_product(a, b):
    out = _blas.matmul(a, b)
    assert out is not None, "MKL did not take the product"
    assert out.dtype == a.dtype
    assert out.shape == (a.shape[0], b.shape[1])
    assert out.flags.c_contiguous
    exact = a.astype(np.float64) @ b.astype(np.float64)
    tolerance = 1e-4 if a.dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, exact, rtol=tolerance, atol=tolerance * a.shape[1])


def _layouts(array):
    """The same values in C order, Fortran order and as a slice of a wider array."""
    wide = np.zeros((array.shape[0] + 3, array.shape[1] + 5), array.dtype)
    wide[2:-1, 3:-2] = array
    wide_t = np.zeros((array.shape[1] + 4, array.shape[0] + 2), array.dtype)
    wide_t[1:-3, 1:-1] = array.T
    return {
        "c": np.ascontiguousarray(array),
        "f": np.asfortranarray(array),
        "slice": wide[2:-1, 3:-2],
        "slice_t": wide_t[1:-3, 1:-1].T,
    }


@needs_mkl
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout_a", ["c", "f", "slice", "slice_t"])
@pytest.mark.parametrize("layout_b", ["c", "f", "slice", "slice_t"])
def test_every_layout_multiplies(dtype, layout_a, layout_b):
    a, b = _operands(dtype, m=110, k=100, n=120)
    _check_product(_layouts(a)[layout_a], _layouts(b)[layout_b])


@needs_mkl
@pytest.mark.parametrize("shape", [(1, 1024, 1024), (1024, 1024, 1), (1024, 1, 1024),
                                   (1, 8192, 128)])
def test_vector_shaped_operands(shape):
    # An axis of length 1 carries no meaningful stride.
    m, k, n = shape
    a, b = _operands(np.float64, m=m, k=k, n=n)
    _check_product(a, b)
    _check_product(np.asfortranarray(a), np.asfortranarray(b))
    if m == 1:
        # A row picked from a matrix has the matrix's row stride.
        rows = np.repeat(a, 3, axis=0)
        _check_product(rows[1:2], b)


@needs_mkl
def test_non_finite_values_propagate():
    a, b = _operands(np.float64)
    a[3, 5] = np.nan
    a[7, 0] = np.inf
    b[0, 9] = -np.inf
    np.testing.assert_array_equal(np.isnan(_blas.matmul(a, b)), np.isnan(a @ b))
    np.testing.assert_array_equal(np.isinf(_blas.matmul(a, b)), np.isinf(a @ b))


@needs_mkl
def test_output_does_not_alias_inputs():
    a, _ = _operands(np.float32)
    out = _blas.matmul(a, a)
    assert not np.shares_memory(out, a)
    _check_product(a, a)


def _unaligned(dtype):
    raw = np.zeros(N * N * np.dtype(dtype).itemsize + 1, np.uint8)
    array = raw[1:].view(dtype).reshape(N, N)
    assert not array.flags.aligned
    return array


class _Subclass(np.ndarray):
    pass


@pytest.mark.parametrize("case", [
    "small", "int64", "float16", "complex128", "mixed", "swapped", "reversed",
    "strided", "one_d", "mismatch", "empty", "subclass", "unaligned",
    "batch_not_nested", "batch_mismatch", "small_batch",
])
def test_products_left_to_numpy(case):
    a, b = _operands(np.float32)
    if case == "small":
        a, b = a[:96, :96], b[:96, :96]
    elif case in ("int64", "float16", "complex128"):
        a, b = a.astype(case), b.astype(case)
    elif case == "mixed":
        b = b.astype(np.float64)
    elif case == "swapped":
        a = a.astype(a.dtype.newbyteorder())
        b = b.astype(b.dtype.newbyteorder())
    elif case == "reversed":
        a = a[::-1]
    elif case == "strided":
        a = np.repeat(np.repeat(a, 2, axis=0), 2, axis=1)[::2, ::2]
    elif case == "one_d":
        a = a[0]
    elif case == "batch_not_nested":
        # 65 outer combinations, each with its own inner batch of 2, where a
        # repeats along the inner axis only: more calls than gradflow makes.
        a = np.broadcast_to(np.stack([a] * 65)[:, None], (65, 2) + a.shape)
        b = np.stack([b, b])
    elif case == "batch_mismatch":
        a, b = np.stack([a, a]), np.stack([b, b, b])
    elif case == "small_batch":
        a, b = np.stack([a[:48, :48]] * 4), b[:48, :48]  # 4 * 48**3 multiply-adds
    elif case == "mismatch":
        b = b[:-1]
    elif case == "empty":
        a = a[:0]
    elif case == "subclass":
        a = a.view(_Subclass)
    elif case == "unaligned":
        a = _unaligned(np.float32)
    assert _blas.matmul(a, b) is None


def test_bad_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv("GRADFLOW_BLAS", "openblas")
    with pytest.raises(ValueError, match="GRADFLOW_BLAS='openblas' is not one of auto, mkl, numpy"):
        _blas._setting()


@pytest.mark.parametrize("setting", ["", " NumPy ", "MKL", "auto"])
def test_setting_ignores_case_and_spaces(monkeypatch, setting):
    monkeypatch.setenv("GRADFLOW_BLAS", setting)
    assert _blas._setting() == (setting.strip().lower() or "auto")


_BATCHES = {
    "same": ((6,), (6,)),
    "weight_per_inner": ((4, 3), (3,)),
    "weight_per_outer": ((3, 4), (3, 1)),
    "both_broadcast": ((2, 1), (1, 3)),
    "weight_2d": ((6,), ()),
    "input_2d": ((), (6,)),
    "four_d": ((2, 3), (2, 3)),
    "broadcast_ones": ((2, 3), (1, 1)),
    "leading_one": ((1, 5), (5,)),
}


def _batched(shape, base):
    """``base`` repeated into a C-ordered batch of ``shape`` with distinct values."""
    scale = np.arange(1, math.prod(shape) + 1, dtype=base.dtype).reshape(shape + (1, 1))
    return base * scale / scale.size


@needs_mkl
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batches", sorted(_BATCHES))
def test_batched_products(dtype, batches):
    shape_a, shape_b = _BATCHES[batches]
    base_a, base_b = _operands(dtype)
    a, b = _batched(shape_a, base_a), _batched(shape_b, base_b)
    out = _blas.matmul(a, b)
    assert out is not None, "MKL did not take the product"
    expected = a.astype(np.float64) @ b.astype(np.float64)
    assert out.shape == expected.shape
    tolerance = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, expected, rtol=tolerance, atol=tolerance * N)


@needs_mkl
@pytest.mark.parametrize("case", ["interleaved", "transposed_matrices", "broadcast_to",
                                  "reversed", "every_other"])
def test_strided_batches(case):
    a, b = _operands(np.float64)
    stacked = np.stack([a, 2 * a, 3 * a])
    if case == "interleaved":
        # Batch axis in the middle of the memory: matrices share rows.
        a = np.ascontiguousarray(stacked.transpose(1, 0, 2)).transpose(1, 0, 2)
    elif case == "transposed_matrices":
        a = np.ascontiguousarray(stacked.transpose(0, 2, 1)).transpose(0, 2, 1)
    elif case == "reversed":
        # One call per matrix, since no positive stride walks them.
        a = stacked[::-1]
    elif case == "every_other":
        a = np.stack([a, -a, 2 * a, -2 * a, 3 * a])[::2]
    else:
        a = np.broadcast_to(a, (4,) + a.shape)
    out = _blas.matmul(a, b)
    assert out is not None, "MKL did not take the product"
    np.testing.assert_allclose(out, a @ b, rtol=1e-12, atol=1e-10)


def _isolated_start(monkeypatch, setting, load):
    """Run _blas._start() with ``load`` in place of the loader, on fresh state."""
    monkeypatch.setenv("GRADFLOW_BLAS", setting)
    monkeypatch.setattr(_blas, "_GEMM", {})
    monkeypatch.setattr(_blas, "LIBRARY", None)
    monkeypatch.setattr(_blas, "_load", load)
    _blas._start()
    return _blas.LIBRARY


def _missing():
    raise OSError("the mkl package is not installed")


def test_missing_mkl_falls_back_quietly(monkeypatch):
    assert _isolated_start(monkeypatch, "auto", _missing) is None
    a, b = _operands(np.float32)
    assert _blas.matmul(a, b) is None


def test_missing_mkl_raises_when_required(monkeypatch):
    with pytest.raises(ImportError, match="GRADFLOW_BLAS=mkl, but MKL did not load: the mkl"):
        _isolated_start(monkeypatch, "mkl", _missing)


def _wrong_gemm(*args):
    # Writes zeros, not the product. A plain call passes 14 arguments with
    # the output at 12; a batched call 18, with the output at 14 and the
    # batch size last.
    m, n = args[3], args[4]
    if len(args) == 14:
        address, count = args[12], m * n
    else:
        address, count = args[14], m * n * args[17]
    out = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_double * count).from_address(address))
    out[:] = 0.0


@pytest.mark.parametrize("setting", ["auto", "mkl"])
def test_wrong_products_drop_library(monkeypatch, setting):
    def load():
        gemms = {np.dtype(np.float64): (_wrong_gemm, _wrong_gemm)}
        return gemms, "/fake/libmkl_rt.so", lambda count: 0

    if setting == "mkl":
        with pytest.raises(ImportError, match="gave a wrong product"):
            _isolated_start(monkeypatch, setting, load)
    else:
        assert _isolated_start(monkeypatch, setting, load) is None
    assert _blas._GEMM == {}


@needs_mkl
@pytest.mark.parametrize("layer", ["ILP64", "GNU,ILP64"])
def test_ilp64_setting_is_overridden(layer):
    # The ctypes signatures pass 32-bit ints, so MKL must run LP64.
    lines = output_lines("""
        import numpy as np
        import gradflow_kernels

        a = np.random.default_rng(0).standard_normal((300, 300))
        out = gradflow_kernels.matmul(a, a)
        print(out is not None, np.allclose(out, a @ a))
    """, MKL_INTERFACE_LAYER=layer)
    assert lines[-1] == "True True"


@needs_mkl
@pytest.mark.parametrize("layer", ["TBB", "bogus"])
def test_unknown_threading_layer_falls_back(layer):
    # MKL would end the process if the layer's library failed to load.
    lines = output_lines("""
        import gradflow_kernels
        print(gradflow_kernels._blas.LIBRARY)
    """, MKL_THREADING_LAYER=layer)
    assert lines[-1] == "None"
    result = run_python("import gradflow", MKL_THREADING_LAYER=layer, GRADFLOW_BLAS="mkl")
    assert result.returncode == 1
    assert f"MKL_THREADING_LAYER='{layer}' is not one of GNU, INTEL, SEQUENTIAL" in result.stderr


def test_numpy_setting_never_loads():
    lines = output_lines("""
        import os
        import gradflow_kernels
        print(gradflow_kernels._blas.LIBRARY, os.environ.get("GOMP_SPINCOUNT"))
    """, GRADFLOW_BLAS="numpy")
    assert lines[-1] == "None 0"


# -- gradflow's ops on top of it ---------------------------------------------------


def _mkl_off(monkeypatch):
    monkeypatch.setattr(_blas, "_GEMM", {})


@pytest.mark.parametrize("x_shape", [(160, 96), (4, 40, 96), (96,)])
def test_linear_agrees_with_and_without_mkl(monkeypatch, x_shape):
    rng = np.random.default_rng(1)
    x_data = rng.standard_normal(x_shape)
    w_data = rng.standard_normal((80, 96))
    b_data = rng.standard_normal(80)

    def run():
        x = gf.tensor(x_data, requires_grad=True)
        w = gf.tensor(w_data, requires_grad=True)
        b = gf.tensor(b_data, requires_grad=True)
        y = gf.nn.functional.linear(x, w, b)
        (y * y).sum().backward()
        return [t.detach().numpy() for t in (y, x.grad, w.grad, b.grad)]

    calls = []
    for dtype, (gemm, batch) in list(_blas._GEMM.items()):
        def counted(*args, gemm=gemm):
            calls.append(args[3:6])
            return gemm(*args)

        monkeypatch.setitem(_blas._GEMM, dtype, (counted, batch))
    with_mkl = run()
    if _blas.LIBRARY is not None and len(x_shape) > 1:
        # The forward product and both gradient products.
        assert len(calls) == 3
    _mkl_off(monkeypatch)
    without = run()
    for got, expected in zip(with_mkl, without):
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-10)


def test_linear_on_a_strided_batch(monkeypatch):
    # A non-contiguous 3-D input keeps NumPy's batched product.
    rng = np.random.default_rng(2)
    x = gf.tensor(rng.standard_normal((24, 4, 80)), requires_grad=True)
    w = gf.tensor(rng.standard_normal((72, 80)), requires_grad=True)
    xt = x.permute(1, 0, 2)
    y = gf.nn.functional.linear(xt, w)
    y.sum().backward()
    expected = xt.detach().numpy() @ w.detach().numpy().T
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(x.grad.numpy(), np.ones((24, 4, 72)) @ w.detach().numpy(),
                               rtol=1e-12)


@pytest.mark.parametrize("shapes", [((160, 96), (96, 80)), ((3, 160, 96), (96, 80)),
                                    ((160, 96), (96,)), ((96,), (96, 80))])
def test_matmul_gradients_against_finite_differences(shapes):
    # A directional difference along random directions checks every entry
    # of both gradients at once.
    rng = np.random.default_rng(3)
    a_data, b_data = (rng.standard_normal(shape) for shape in shapes)
    weights = rng.standard_normal((a_data @ b_data).shape)

    def loss(a, b):
        return ((a @ b) * gf.tensor(weights)).sum()

    a = gf.tensor(a_data, requires_grad=True)
    b = gf.tensor(b_data, requires_grad=True)
    loss(a, b).backward()
    da, db = rng.standard_normal(shapes[0]), rng.standard_normal(shapes[1])
    eps = 1e-6
    up = loss(gf.tensor(a_data + eps * da), gf.tensor(b_data + eps * db)).item()
    down = loss(gf.tensor(a_data - eps * da), gf.tensor(b_data - eps * db)).item()
    analytic = np.sum(a.grad.numpy() * da) + np.sum(b.grad.numpy() * db)
    assert analytic == pytest.approx((up - down) / (2 * eps), rel=1e-6)


@pytest.mark.parametrize("x_shape, weight_shape", [
    ((2, 3, 0), (5, 0)), ((4, 0), (5, 0)), ((4, 8), (0, 8)), ((3, 4, 8), (0, 8)),
    ((0, 8), (5, 8)), ((2, 0, 8), (5, 8)),
])
def test_linear_with_an_empty_axis(x_shape, weight_shape):
    x = gf.tensor(np.ones(x_shape), requires_grad=True)
    w = gf.tensor(np.ones(weight_shape), requires_grad=True)
    b = gf.tensor(np.ones(weight_shape[:1]), requires_grad=True)
    y = gf.nn.functional.linear(x, w, b)
    assert y.shape == x_shape[:-1] + weight_shape[:1]
    np.testing.assert_array_equal(y.detach().numpy(), np.ones(y.shape))
    y.sum().backward()
    assert x.grad.shape == x_shape
    np.testing.assert_array_equal(x.grad.numpy(), np.full(x_shape, float(weight_shape[0])))
    assert w.grad.shape == weight_shape
    rows = int(np.prod(x_shape[:-1]))
    np.testing.assert_array_equal(w.grad.numpy(), np.full(weight_shape, float(rows)))
    np.testing.assert_array_equal(b.grad.numpy(), np.full(weight_shape[:1], float(rows)))


@needs_mkl
def test_batch_offsets_past_int32_declined():
    # Never multiplied: the view reaches far past its buffer, and matmul must
    # decline before reading it.
    a, b = _operands(np.float32)
    far = np.lib.stride_tricks.as_strided(
        a, shape=(2,) + a.shape, strides=((1 << 30) * a.itemsize,) + a.strides)
    assert _blas.matmul(far, b) is None
