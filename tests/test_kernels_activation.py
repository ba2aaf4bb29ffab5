"""Fused activation backward kernels against the generic path and a float64 reference.

The CPU kernels run as they are. The CUDA kernels run on a GPU when one is
usable and under Numba's CUDA simulator otherwise (see conftest.py), on
small arrays, because the simulator runs every CUDA thread in Python.
"""

import math
import subprocess
import sys

import numpy as np
import pytest

import gradflow as gf
import gradflow_kernels
from conftest import to_host
from gradflow._ops import _activation, _unary
from gradflow.autograd._namespace import array_namespace
from gradflow.errors import PerformanceWarning

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _sigmoid64(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _reference(name, x):
    """Return (saved array, d activation / dx) in float64 for input ``x``."""
    k = math.sqrt(2.0 / math.pi)
    if name == "relu":
        return np.maximum(x, 0), (x > 0).astype(np.float64)
    if name == "leaky_relu":
        return x, np.where(x > 0, 1.0, 0.2)
    if name == "sigmoid":
        s = _sigmoid64(x)
        return s, s * (1 - s)
    if name == "tanh":
        t = np.tanh(x)
        return t, 1 - t * t
    if name == "gelu":
        cdf = 0.5 * (1 + _erf(x / math.sqrt(2.0)))
        return x, cdf + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    if name == "gelu_tanh":
        t = np.tanh(k * (x + 0.044715 * x**3))
        return x, 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * 0.044715 * x**2)
    if name == "silu":
        s = _sigmoid64(x)
        return x, s * (1 + x * (1 - s))
    # softplus with beta=2, threshold=3: the identity where 2x > 3.
    return x, np.where(2 * x > 3, 1.0, _sigmoid64(2 * x))


_PARAMS = {
    "leaky_relu": {"negative_slope": 0.2},
    "softplus": {"beta": 2.0, "threshold": 3.0},
}

_GENERIC = {
    "relu": _activation._relu_grad,
    "leaky_relu": _activation._leaky_relu_grad,
    "sigmoid": _unary._sigmoid_grad,
    "tanh": _unary._tanh_grad,
    "gelu": _activation._gelu_grad,
    "gelu_tanh": _activation._gelu_tanh_grad,
    "silu": _activation._silu_grad,
    "softplus": _activation._softplus_grad,
}

_NAMES = sorted(gradflow_kernels.ACTIVATIONS)
_TOLERANCE = {np.float16: 3e-3, np.float32: 2e-6, np.float64: 1e-12}


def _case(name, shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-4, 4, size=shape)
    saved64 = _reference(name, x)[0]
    grad64 = rng.standard_normal(shape)
    saved = saved64.astype(dtype)
    grad = grad64.astype(dtype)
    # The reference starts from the rounded arrays that the kernel reads.
    rounded = saved.astype(np.float64)
    if _saves_input(name):
        derivative = _reference(name, rounded)[1]
    else:
        derivative = _from_output(name, rounded)
    return saved, grad, derivative * grad.astype(np.float64)


def _saves_input(name):
    return gradflow_kernels.ACTIVATIONS[name][0] == "input"


def _from_output(name, out):
    if name == "relu":
        return (out > 0).astype(np.float64)
    if name == "sigmoid":
        return out * (1 - out)
    return 1 - out * out


def _assert_close(actual, expected, dtype):
    tolerance = _TOLERANCE[dtype]
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64), expected, rtol=tolerance,
        atol=tolerance,
    )


# -- the kernels on arrays --------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", _NAMES)
def test_cpu_kernel_matches_reference(name, dtype):
    saved, grad, expected = _case(name, (3, 50, 7), dtype)
    params = _PARAMS.get(name, {})
    out = gradflow_kernels.activation_backward(name, saved, grad, **params)
    assert out.dtype == dtype
    assert out.shape == saved.shape
    _assert_close(out, expected, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", _NAMES)
def test_cpu_kernel_matches_generic(name, dtype):
    saved, grad, _ = _case(name, (1000,), dtype, seed=1)
    params = _PARAMS.get(name, {})
    out = gradflow_kernels.activation_backward(name, saved, grad, **params)
    generic = _GENERIC[name](array_namespace(np), saved, grad, **params)
    _assert_close(out, generic.astype(np.float64), dtype)


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "silu", "softplus"])
def test_float32_loop_wide_range(name):
    # These float32 loops evaluate exp and erf with their own polynomials.
    values = np.concatenate([np.linspace(-20, 20, 4001), [-1000, 1000, -13.5, 0]])
    saved = values.astype(np.float32)
    grad = np.ones_like(saved)
    params = _PARAMS.get(name, {})
    out = gradflow_kernels.activation_backward(name, saved, grad, **params)
    x = saved.astype(np.float64)
    expected = _GENERIC[name](array_namespace(np), x, np.ones_like(x), **params)
    assert np.isfinite(out).all()
    error = np.abs(out - expected) / (np.abs(expected) + 1)
    assert error.max() < 1e-6


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("name", _NAMES)
def test_cuda_kernel_matches_reference(name, dtype):
    from gradflow_kernels import _cuda

    saved, grad, expected = _case(name, (5, 7), dtype, seed=2)
    params = _PARAMS.get(name, {})
    a, b = gradflow_kernels._ab(name, params)
    out = _cuda.run_on_host(name, saved, grad, a, b)
    assert out.dtype == dtype
    assert out.shape == saved.shape
    _assert_close(out, expected, dtype)


@pytest.mark.parametrize("name", _NAMES)
def test_kernel_zero_size_and_scalar(name):
    params = _PARAMS.get(name, {})
    empty = np.zeros((0, 3), dtype=np.float32)
    out = gradflow_kernels.activation_backward(name, empty, empty, **params)
    assert out.shape == (0, 3)
    scalar = np.array(0.5)
    out = gradflow_kernels.activation_backward(name, scalar, np.array(2.0), **params)
    assert out.shape == ()


def test_kernel_strided_input_warns():
    saved, grad, expected = _case("gelu", (40, 30), np.float64)
    with pytest.warns(PerformanceWarning, match="not C-contiguous"):
        out = gradflow_kernels.activation_backward("gelu", saved.T, grad.T)
    _assert_close(out, expected.T, np.float64)


def test_kernel_rejects_bad_arguments():
    x = np.ones(4, dtype=np.float32)
    with pytest.raises(ValueError, match="unknown activation"):
        gradflow_kernels.activation_backward("swish2", x, x)
    with pytest.raises(ValueError, match="share one dtype"):
        gradflow_kernels.activation_backward("relu", x, x.astype(np.float64))
    with pytest.raises(ValueError, match="shape"):
        gradflow_kernels.activation_backward("relu", x, np.ones(5, np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_kernels_finite_at_extremes(name, dtype):
    from gradflow_kernels import _cuda

    x = np.array([-1000.0, 1000.0], dtype=dtype)
    saved = _unary.stable_sigmoid(np, x) if name == "sigmoid" else np.tanh(x)
    grad = np.ones_like(saved)
    for out in (
        gradflow_kernels.activation_backward(name, saved, grad),
        _cuda.run_on_host(name, saved, grad),
    ):
        assert np.isfinite(out).all()
        assert np.array_equal(out, np.zeros(2, dtype=dtype))


# -- the seam inside autograd -----------------------------------------------


def _forward(name, x):
    if name == "gelu_tanh":
        return gf.gelu(x, approximate="tanh")
    return getattr(gf, name)(x, **_PARAMS.get(name, {}))


@pytest.fixture
def fused_everywhere(monkeypatch):
    """Send every CPU size to the fused kernel, so small inputs exercise it."""
    monkeypatch.setattr(gradflow_kernels, "CPU_MIN_SIZE", 0)


@pytest.mark.parametrize("name", _NAMES)
def test_backward_matches_generic(name, device):
    x = gf.tensor(np.random.uniform(-4, 4, 40_000), device=device, requires_grad=True)
    _forward(name, x).backward(gf.ones_like(x))
    fused = to_host(x.grad)
    x.grad = None
    with _generic_only():
        _forward(name, x).backward(gf.ones_like(x))
    np.testing.assert_allclose(fused, to_host(x.grad), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", _NAMES)
def test_backward_gradcheck_fused(name, fused_everywhere):
    x = gf.tensor(np.random.uniform(-3, 3, (4, 5)), requires_grad=True)
    assert gf.gradcheck(lambda t: _forward(name, t), (x,))


@pytest.mark.parametrize("name", _NAMES)
def test_backward_matches_torch(name, fused_everywhere):
    torch = pytest.importorskip("torch")
    values = np.random.uniform(-4, 4, (6, 7))
    x = gf.tensor(values, requires_grad=True)
    _forward(name, x).sum().backward()
    t = torch.tensor(values, requires_grad=True)
    _torch_forward(torch, name, t).sum().backward()
    np.testing.assert_allclose(to_host(x.grad), t.grad.numpy(), rtol=1e-10, atol=1e-12)


def _torch_forward(torch, name, t):
    functional = torch.nn.functional
    if name == "gelu_tanh":
        return functional.gelu(t, approximate="tanh")
    if name == "leaky_relu":
        return functional.leaky_relu(t, 0.2)
    if name == "softplus":
        return functional.softplus(t, beta=2.0, threshold=3.0)
    if name in ("sigmoid", "tanh"):
        return getattr(torch, name)(t)
    return getattr(functional, name)(t)


@pytest.mark.parametrize("name", _NAMES)
def test_create_graph_uses_generic(name, fused_everywhere, monkeypatch):
    calls = _count_fused(monkeypatch)
    x = gf.tensor(np.random.uniform(-3, 3, 6), requires_grad=True)

    def first_derivative(t):
        (g,) = gf.grad(_forward(name, t).sum(), t, create_graph=True)
        return g

    first_derivative(x)
    assert calls["fused"] == 0
    # The second-order check runs a plain backward through the recorded
    # one, which may use fused kernels again (gelu_tanh's tanh does).
    if name not in ("relu", "leaky_relu"):
        assert gf.gradcheck(first_derivative, (x,))


@pytest.mark.parametrize("dtype", [gf.float32, gf.float64])
@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_backward_finite_at_extremes(name, dtype, device, fused_everywhere):
    x = gf.tensor([-1000.0, 1000.0], dtype=dtype, device=device, requires_grad=True)
    _forward(name, x).sum().backward()
    grad = to_host(x.grad)
    assert np.isfinite(grad).all()
    assert np.array_equal(grad, np.zeros(2))


# -- which path ran -----------------------------------------------------------


def _count_fused(monkeypatch):
    from gradflow_kernels import _cpu

    calls = {"fused": 0, "generic": 0}
    kernel = _cpu.activation_backward
    generic = _activation._relu_grad

    def counting_kernel(*args, **kwargs):
        calls["fused"] += 1
        return kernel(*args, **kwargs)

    def counting_generic(*args, **kwargs):
        calls["generic"] += 1
        return generic(*args, **kwargs)

    monkeypatch.setattr(_cpu, "activation_backward", counting_kernel)
    monkeypatch.setattr(_activation, "_relu_grad", counting_generic)
    return calls


class _generic_only:
    """Within the block, the seam finds no fused kernel."""

    def __enter__(self):
        self._saved = gradflow_kernels.fused_activation_backward
        gradflow_kernels.fused_activation_backward = lambda *args, **kwargs: None

    def __exit__(self, *exc_info):
        gradflow_kernels.fused_activation_backward = self._saved


def _relu_backward(values, gradient=None):
    x = gf.tensor(values, requires_grad=True)
    gf.relu(x).backward(gf.ones_like(x) if gradient is None else gradient)


def test_fused_path_runs_when_eligible(monkeypatch):
    calls = _count_fused(monkeypatch)
    _relu_backward(np.random.randn(gradflow_kernels.CPU_MIN_SIZE).astype(np.float32))
    assert calls == {"fused": 1, "generic": 0}


def test_generic_path_below_threshold(monkeypatch, python_path):
    calls = _count_fused(monkeypatch)
    _relu_backward(np.random.randn(gradflow_kernels.CPU_MIN_SIZE - 1))
    assert calls == {"fused": 0, "generic": 1}


def test_generic_path_for_strided_grad(monkeypatch):
    calls = _count_fused(monkeypatch)
    n = gradflow_kernels.CPU_MIN_SIZE
    gradient = gf.tensor(np.ones((2, n)).T, dtype=gf.float64)
    assert not gradient.data.flags.c_contiguous
    _relu_backward(np.random.randn(n, 2), gradient)
    assert calls == {"fused": 0, "generic": 1}


def test_generic_path_for_float16(monkeypatch):
    calls = _count_fused(monkeypatch)
    _relu_backward(np.random.randn(gradflow_kernels.CPU_MIN_SIZE).astype(np.float16))
    assert calls == {"fused": 0, "generic": 1}


def test_import_does_not_load_numba():
    code = "import sys, gradflow; print('numba' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


# -- fused forward ------------------------------------------------------------------


def _gelu_reference(x):
    from scipy.special import erfc

    x64 = x.astype(np.float64)
    return 0.5 * x64 * erfc(-x64 / math.sqrt(2.0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_forward_kernel_matches_reference(dtype):
    pytest.importorskip("scipy")
    x = np.random.uniform(-12, 12, 3 * gradflow_kernels.CPU_MIN_SIZE).astype(dtype)
    out = gradflow_kernels.fused_activation_forward("gelu", x)
    assert out.dtype == dtype
    assert out.shape == x.shape
    # float32: computed in float64 and rounded once, so within one ulp.
    rtol = 1.2e-7 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, _gelu_reference(x), rtol=rtol, atol=1e-300)


def test_gelu_forward_matches_generic(monkeypatch):
    x = gf.tensor(np.random.randn(4, gradflow_kernels.CPU_MIN_SIZE), dtype=gf.float32)
    fused = gf.gelu(x).data
    monkeypatch.setattr(gradflow_kernels, "fused_activation_forward", lambda *a: None)
    generic = gf.gelu(x).data
    np.testing.assert_allclose(fused, generic, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["eligible", "small", "strided", "float16", "tanh"])
def test_gelu_forward_path_choice(case, monkeypatch):
    from gradflow_kernels import _cpu

    calls = []
    kernel = _cpu.activation_forward
    monkeypatch.setattr(
        _cpu, "activation_forward", lambda *a: calls.append(a[0]) or kernel(*a)
    )
    n = gradflow_kernels.CPU_MIN_SIZE
    values = {
        "eligible": np.random.randn(n).astype(np.float32),
        "small": np.random.randn(n - 1).astype(np.float32),
        "strided": np.random.randn(n, 2).astype(np.float32).T,
        "float16": np.random.randn(n).astype(np.float16),
        "tanh": np.random.randn(n).astype(np.float32),
    }[case]
    approximate = "tanh" if case == "tanh" else "none"
    gf.gelu(gf.tensor(values), approximate=approximate)
    assert calls == (["gelu"] if case == "eligible" else [])


def test_gelu_huge_finite_input_stays_finite():
    x = np.array([3e38, -3e38, 1.0], dtype=np.float32)  # small: the array path
    out = gf.gelu(gf.tensor(x)).data
    np.testing.assert_array_equal(out[:2], x[:2] * np.array([1, 0], dtype=np.float32))


def test_gelu_forward_float32_within_one_ulp():
    pytest.importorskip("scipy")
    from gradflow_kernels import _cpu

    x = np.concatenate([
        np.linspace(-20, 20, 400_001), np.random.standard_normal(50_000) * 5,
    ]).astype(np.float32)
    out = np.empty_like(x)
    _cpu._gelu_forward_float32_loop(x, out)
    reference = _gelu_reference(x)
    ulp = np.spacing(np.abs(reference.astype(np.float32))).astype(np.float64)
    error = np.abs(out.astype(np.float64) - reference) / ulp
    assert error.max() <= 1.0


def test_gelu_forward_float32_special_values():
    from gradflow_kernels import _cpu

    x = np.array([np.nan, np.inf, 0.0, -0.0, 3e38, -3e38, 1e-40, -50.0],
                 dtype=np.float32)
    out = np.empty_like(x)
    _cpu._gelu_forward_float32_loop(x, out)
    assert np.isnan(out[0])
    np.testing.assert_array_equal(out[1:6], x[1:6] * np.array([1, 0, 1, 1, 0], np.float32))
    assert np.signbit(out[3])
    assert out[6] == np.float32(5e-41)
    assert out[7] == 0.0


def _float32_grid(low, high, stride):
    """Return every ``stride``-th float32 from ``low`` to ``high``, for 0 <= low < high."""
    first = int(np.float32(low).view(np.uint32))
    last = int(np.float32(high).view(np.uint32))
    return np.arange(first, last + 1, stride, dtype=np.uint32).view(np.float32)


# Magnitude intervals and strides between float32 bit patterns, about 6
# million inputs for each sign in all.
_GELU_DENSE_GRIDS = {
    # To past the cutoff at |x| = 15. Negative results are float32
    # subnormals for |x| > 13.1 and round to zero for |x| > 14.4.
    "tail": (8.0, 16.0, 4),
    "middle": (1.0, 8.0, 16),
    # Down to tiny |x|, where Phi(x) is near 1/2 on both sides of the switch
    # between Phi(x) = 1 - h and Phi(x) = h at 0.
    "near_zero": (2.0**-30, 1.0, 128),
    # Every float32 around the cutoff, above which the tail is taken as 0.
    "cutoff": (14.9, 15.1, 1),
    "subnormal": (0.0, 2.0**-126, 64),
}


@pytest.mark.parametrize("sign", [-1.0, 1.0])
@pytest.mark.parametrize("grid", sorted(_GELU_DENSE_GRIDS))
def test_gelu_forward_float32_dense_grid(grid, sign):
    pytest.importorskip("scipy")
    from gradflow_kernels import _cpu

    x = np.float32(sign) * _float32_grid(*_GELU_DENSE_GRIDS[grid])
    out = np.empty_like(x)
    _cpu._gelu_forward_float32_loop(x, out)
    reference = _gelu_reference(x)
    ulp = np.spacing(np.abs(reference.astype(np.float32))).astype(np.float64)
    error = np.abs(out.astype(np.float64) - reference) / ulp
    worst = int(np.argmax(error))
    assert error[worst] <= 1.0, f"{error[worst]:.3f} ulp at x = {x[worst]!r}"
    assert np.all(np.signbit(out) == np.signbit(x))
