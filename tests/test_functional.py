"""gradflow.nn.functional: activations, softmax, dropout, one_hot and linear."""

import numpy as np
import pytest
from conftest import float64_leaf, match_torch, to_host

import gradflow as gf
import gradflow.nn.functional as F


def _away_from_kinks(shape, rng):
    x = rng.standard_normal(shape)
    return np.where(np.abs(x) < 0.05, 0.3, x)


ACTIVATIONS = [
    ("relu", F.relu, "relu", {}),
    ("leaky_relu", lambda x: F.leaky_relu(x, 0.2), "leaky_relu",
     {"negative_slope": 0.2}),
    ("gelu", F.gelu, "gelu", {}),
    ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"), "gelu",
     {"approximate": "tanh"}),
    ("silu", F.silu, "silu", {}),
    ("softplus", F.softplus, "softplus", {}),
    ("tanh", F.tanh, "tanh", {}),
    ("sigmoid", F.sigmoid, "sigmoid", {}),
]


@pytest.mark.parametrize("name, ours, torch_name, kwargs", ACTIVATIONS,
                         ids=[a[0] for a in ACTIVATIONS])
def test_activation_gradcheck(device, name, ours, torch_name, kwargs):
    x = float64_leaf(_away_from_kinks((3, 4), np.random.default_rng(0)), device)
    assert gf.gradcheck(ours, (x,))


@pytest.mark.parametrize("name, ours, torch_name, kwargs", ACTIVATIONS,
                         ids=[a[0] for a in ACTIVATIONS])
def test_activation_matches_torch(device, name, ours, torch_name, kwargs):
    torch = pytest.importorskip("torch")
    reference = getattr(torch.nn.functional, torch_name, None)
    reference = reference or getattr(torch, torch_name)
    x = _away_from_kinks((3, 4), np.random.default_rng(0))
    match_torch(ours, lambda t: reference(t, **kwargs), [x], [], device)


@pytest.mark.parametrize("fn", [F.softmax, F.log_softmax],
                         ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_softmax_gradcheck(device, fn, dim):
    x = float64_leaf(np.random.default_rng(0).standard_normal((3, 4, 2)), device)
    assert gf.gradcheck(lambda t: fn(t, dim=dim), (x,))


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("dim", [0, -1])
def test_softmax_matches_torch(device, name, dim):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((3, 5))
    reference = getattr(torch.nn.functional, name)
    match_torch(lambda t: getattr(F, name)(t, dim=dim),
                lambda t: reference(t, dim=dim), [x], [], device)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_stable_at_1000(device, name):
    torch = pytest.importorskip("torch")
    x = np.array([[1000.0, -1000.0, 999.0], [-1000.0, -1000.0, -999.0]])
    reference = getattr(torch.nn.functional, name)
    match_torch(lambda t: getattr(F, name)(t, dim=1),
                lambda t: reference(t, dim=1), [x], [], device)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_finite_at_1000_float32(device, name):
    x = gf.tensor([1000.0, -1000.0, 0.0], device=device, requires_grad=True)
    out = getattr(F, name)(x)
    out.sum().backward()
    assert np.isfinite(to_host(out)).all()
    assert np.isfinite(to_host(x.grad)).all()


def test_softmax_rows_sum_to_one(device):
    x = gf.randn(4, 6, dtype=gf.float64, device=device)
    np.testing.assert_allclose(to_host(F.softmax(x, dim=1).sum(dim=1)), np.ones(4))


def test_softmax_second_order(device):
    x = float64_leaf(np.random.default_rng(0).standard_normal((2, 3)), device)
    weights = gf.tensor([[1.0, -2.0, 0.5], [0.3, 0.0, 1.0]], dtype=gf.float64,
                        device=device)
    assert gf.gradcheck(
        lambda t: gf.grad((F.log_softmax(t) * weights).sum(), t, create_graph=True)[0],
        (x,),
    )


def test_softmax_rejects_bad_dim(device):
    with pytest.raises(IndexError, match="out of range"):
        F.softmax(gf.ones(2, 3, device=device), dim=2)


def test_softmax_rejects_integer_input(device):
    with pytest.raises(TypeError, match="floating-point"):
        F.softmax(gf.tensor([1, 2], device=device))


@pytest.mark.parametrize("fn", [F.softmax, F.log_softmax],
                         ids=["softmax", "log_softmax"])
def test_softmax_axis_keyword(device, fn):
    x = gf.tensor(np.random.default_rng(0).standard_normal((3, 4)), device=device)
    np.testing.assert_array_equal(to_host(fn(x, axis=0)), to_host(fn(x, dim=0)))


@pytest.mark.parametrize("fn", [F.softmax, F.log_softmax],
                         ids=["softmax", "log_softmax"])
def test_softmax_default_last_axis(device, fn):
    x = gf.tensor(np.random.default_rng(0).standard_normal((3, 4)), device=device)
    np.testing.assert_array_equal(to_host(fn(x)), to_host(fn(x, dim=-1)))


@pytest.mark.parametrize("fn", [F.softmax, F.log_softmax],
                         ids=["softmax", "log_softmax"])
def test_softmax_rejects_dim_and_axis(device, fn):
    with pytest.raises(TypeError, match="pass dim= or axis=, not both"):
        fn(gf.ones(2, 3, device=device), dim=0, axis=0)


def test_linear_rejects_dtype_mismatch(device):
    layer = gf.nn.Linear(3, 4, device=device)
    x = gf.ones(2, 3, dtype=gf.float64, device=device)
    pattern = (r"linear: input dtype float64 does not match weight dtype float32"
               r".*\.float\(\) or the layer with \.double\(\)")
    with pytest.raises(TypeError, match=pattern):
        layer(x)


def test_linear_rejects_integer_input(device):
    with pytest.raises(TypeError, match="input dtype int64 .* with .float()"):
        F.linear(gf.arange(3, device=device), gf.ones(4, 3, device=device))


def test_linear_matches_torch(device):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((5, 3)), rng.standard_normal((4, 3)),
              rng.standard_normal(4)]
    match_torch(F.linear, torch.nn.functional.linear, arrays, [], device)


def test_linear_gradcheck_batched(device):
    rng = np.random.default_rng(0)
    x = float64_leaf(rng.standard_normal((2, 5, 3)), device)
    w = float64_leaf(rng.standard_normal((4, 3)), device)
    assert gf.gradcheck(lambda a, b: F.linear(a, b), (x, w))


def test_linear_rejects_shape_mismatch(device):
    with pytest.raises(ValueError, match=r"\(5, 3\).*\(4, 2\)"):
        F.linear(gf.ones(5, 3, device=device), gf.ones(4, 2, device=device))


# -- dropout ------------------------------------------------------------------


def test_dropout_keep_rate(device):
    x = gf.ones(200_000, device=device)
    out = to_host(F.dropout(x, p=0.3))
    assert abs((out == 0).mean() - 0.3) < 0.005


def test_dropout_scales_survivors(device):
    out = to_host(F.dropout(gf.ones(1000, device=device), p=0.3))
    np.testing.assert_allclose(out[out != 0], 1 / 0.7, rtol=1e-6)


def test_dropout_mean_preserved(device):
    out = to_host(F.dropout(gf.ones(200_000, dtype=gf.float64, device=device), p=0.5))
    assert abs(out.mean() - 1.0) < 0.01


def test_dropout_eval_is_identity(device):
    x = gf.randn(10, device=device)
    assert F.dropout(x, p=0.5, training=False) is x


def test_dropout_p_one_zeroes(device):
    out = F.dropout(gf.ones(10, device=device), p=1.0)
    np.testing.assert_array_equal(to_host(out), np.zeros(10))


def test_dropout_reproducible_with_seed(device):
    gf.manual_seed(123)
    first = to_host(F.dropout(gf.ones(100, device=device)))
    gf.manual_seed(123)
    second = to_host(F.dropout(gf.ones(100, device=device)))
    np.testing.assert_array_equal(first, second)


def test_dropout_reproducible_with_rng_state(device):
    state = gf.get_rng_state(device)
    first = to_host(F.dropout(gf.ones(100, device=device)))
    gf.set_rng_state(state, device)
    second = to_host(F.dropout(gf.ones(100, device=device)))
    np.testing.assert_array_equal(first, second)


def test_dropout_gradient_uses_mask(device):
    x = gf.ones(50, dtype=gf.float64, device=device, requires_grad=True)
    out = F.dropout(x, p=0.4)
    out.sum().backward()
    np.testing.assert_array_equal(to_host(x.grad), to_host(out.detach()))


def test_dropout_float16(device):
    out = F.dropout(gf.ones(100, dtype=gf.float16, device=device), p=0.5)
    assert out.dtype == gf.float16


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_dropout_rejects_p(device, p):
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        F.dropout(gf.ones(3, device=device), p=p)


def test_dropout_second_order(device):
    gf.manual_seed(3)
    x = float64_leaf(np.random.default_rng(0).standard_normal(20), device)

    def gradient(t):
        # Reseeding inside keeps the mask fixed across gradcheck's evaluations.
        gf.manual_seed(3)
        return gf.grad((F.dropout(t, p=0.3) ** 3).sum(), t, create_graph=True)[0]

    assert gf.gradcheck(gradient, (x,))


# -- one_hot ------------------------------------------------------------------


def test_one_hot_values(device):
    out = F.one_hot(gf.tensor([[0, 2], [1, 1]], device=device), num_classes=4)
    expected = np.eye(4, dtype=np.int64)[[[0, 2], [1, 1]]]
    np.testing.assert_array_equal(to_host(out), expected)


def test_one_hot_dtype(device):
    assert F.one_hot(gf.tensor([1], device=device)).dtype == gf.int64


def test_one_hot_infers_classes(device):
    assert F.one_hot(gf.tensor([0, 3], device=device)).shape == (2, 4)


def test_one_hot_rejects_negative(device):
    with pytest.raises(IndexError, match="-1 is out of range.*0 to 2"):
        F.one_hot(gf.tensor([0, -1], device=device), num_classes=3)


def test_one_hot_rejects_too_large(device):
    with pytest.raises(IndexError, match="class index 3 is out of range"):
        F.one_hot(gf.tensor([3], device=device), num_classes=3)


def test_one_hot_rejects_float(device):
    with pytest.raises(TypeError, match="integer tensor"):
        F.one_hot(gf.tensor([1.0], device=device))

