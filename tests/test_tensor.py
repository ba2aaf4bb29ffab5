"""The Tensor API: dtypes, factories, conversions, repr, in-place ops and DLPack."""

import pickle

import numpy as np
import pytest

import gradflow as gf
from conftest import to_host
from gradflow.errors import GraphError, InplaceModificationError


def _version(t):
    return t._version[0]


# -- dtype rules --------------------------------------------------------------


def test_python_float_defaults_to_float32(device):
    assert gf.tensor(1.5, device=device).dtype == gf.float32
    assert gf.tensor([[1.0, 2.0]], device=device).dtype == gf.float32


def test_python_int_defaults_to_int64(device):
    assert gf.tensor([1, 2], device=device).dtype == gf.int64


def test_array_keeps_dtype(device):
    assert gf.tensor(np.zeros(2), device=device).dtype == gf.float64
    assert gf.tensor(np.zeros(2, np.float16), device=device).dtype == gf.float16


def test_explicit_dtype(device):
    t = gf.tensor([1, 2], dtype=gf.float64, device=device)
    assert t.dtype == gf.float64


def test_invalid_dtype_raises():
    with pytest.raises(TypeError, match="invalid dtype"):
        gf.tensor([1.0], dtype="not-a-dtype")


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("scalar", [2, 2.5])
def test_python_scalar_keeps_tensor_dtype(dtype, scalar, device):
    t = gf.ones(3, dtype=dtype, device=device)
    assert (t * scalar).dtype == dtype
    assert (scalar - t).dtype == dtype
    assert (t / scalar).dtype == dtype
    assert (t**scalar).dtype == dtype


def test_int_tensor_plus_python_int(device):
    assert (gf.arange(3, device=device) + 1).dtype == gf.int64


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_grad_has_tensor_dtype(dtype, device):
    x = gf.tensor([0.5, 1.5], dtype=dtype, device=device, requires_grad=True)
    (x.exp() * x).sum().backward()
    assert x.grad.dtype == dtype
    expected = np.exp([0.5, 1.5]) * (1 + np.array([0.5, 1.5]))
    rtol = 1e-2 if dtype == "float16" else 1e-6
    np.testing.assert_allclose(to_host(x.grad).astype(np.float64), expected, rtol=rtol)


def test_grad_keeps_dtype_after_promotion(device):
    a = gf.tensor([1.0, 2.0], dtype=gf.float32, device=device, requires_grad=True)
    b = gf.tensor([3.0, 4.0], dtype=gf.float64, device=device, requires_grad=True)
    out = a * b
    assert out.dtype == gf.float64
    out.sum().backward()
    assert a.grad.dtype == gf.float32
    assert b.grad.dtype == gf.float64
    np.testing.assert_array_equal(to_host(a.grad), [3.0, 4.0])


def test_cast_gradient_returns_to_source_dtype(device):
    x = gf.tensor([1.0, 2.0], device=device, requires_grad=True)
    (x.double() * 3).sum().backward()
    assert x.grad.dtype == gf.float32
    np.testing.assert_array_equal(to_host(x.grad), [3.0, 3.0])


def test_cast_to_integer_cuts_graph(device):
    x = gf.tensor([1.7, 2.2], device=device, requires_grad=True)
    y = x.long()
    assert y.dtype == gf.int64
    assert not y.requires_grad


# -- factories ----------------------------------------------------------------


@pytest.mark.parametrize("factory", [gf.zeros, gf.ones, gf.empty, gf.rand, gf.randn])
def test_factory_shape_and_default_dtype(factory, device):
    t = factory(2, 3, device=device)
    assert t.shape == (2, 3)
    assert t.dtype == gf.float32
    assert t.device == device
    assert factory((2, 3), device=device).shape == (2, 3)


def test_zeros_and_ones_values(device):
    np.testing.assert_array_equal(to_host(gf.zeros(2, device=device)), [0.0, 0.0])
    np.testing.assert_array_equal(to_host(gf.ones(2, device=device)), [1.0, 1.0])


def test_full(device):
    t = gf.full((2, 2), 7.0, dtype=gf.float64, device=device)
    assert t.dtype == gf.float64
    np.testing.assert_array_equal(to_host(t), np.full((2, 2), 7.0))


def test_factory_requires_grad(device):
    t = gf.zeros(2, device=device, requires_grad=True)
    assert t.requires_grad
    assert t.is_leaf


@pytest.mark.parametrize("like", [gf.zeros_like, gf.ones_like, gf.rand_like,
                                  gf.randn_like])
def test_like_factories_keep_dtype_and_shape(like, device):
    source = gf.zeros(3, 2, dtype=gf.float64, device=device)
    t = like(source)
    assert t.shape == (3, 2)
    assert t.dtype == gf.float64


def test_full_like(device):
    t = gf.full_like(gf.zeros(2, device=device), 3.0)
    np.testing.assert_array_equal(to_host(t), [3.0, 3.0])


def test_arange_dtypes(device):
    assert gf.arange(5, device=device).dtype == gf.int64
    assert gf.arange(0.0, 1.0, 0.25, device=device).dtype == gf.float32
    np.testing.assert_array_equal(to_host(gf.arange(2, 8, 3, device=device)), [2, 5])


def test_arange_zero_step_raises():
    with pytest.raises(ValueError, match="step must not be zero"):
        gf.arange(0, 5, 0)


def test_linspace_and_eye(device):
    np.testing.assert_allclose(to_host(gf.linspace(0, 1, 5, device=device)),
                               [0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_array_equal(to_host(gf.eye(2, 3, device=device)), np.eye(2, 3))


def test_rand_range(device):
    values = to_host(gf.rand(1000, device=device))
    assert values.min() >= 0.0
    assert values.max() < 1.0


def test_randint_range_and_dtype(device):
    t = gf.randint(2, 5, size=(100,), device=device)
    assert t.dtype == gf.int64
    assert set(to_host(t).tolist()) <= {2, 3, 4}


def test_randint_empty_range_raises():
    with pytest.raises(ValueError, match="high"):
        gf.randint(3, 3, size=(2,))


def test_randperm_is_permutation(device):
    values = to_host(gf.randperm(10, device=device))
    np.testing.assert_array_equal(np.sort(values), np.arange(10))


@pytest.mark.parametrize("shape", [(-1, 2), (2.5,)])
def test_factory_invalid_shape_raises(shape):
    with pytest.raises(ValueError, match="invalid shape"):
        gf.zeros(*shape)


# -- conversions --------------------------------------------------------------


def test_item(device):
    assert gf.tensor([[2.5]], device=device).item() == 2.5


def test_item_of_several_elements_raises(device):
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        gf.tensor([1.0, 2.0], device=device).item()


def test_tolist(device):
    assert gf.tensor([[1, 2], [3, 4]], device=device).tolist() == [[1, 2], [3, 4]]


def test_numpy_shares_memory():
    t = gf.tensor([1.0, 2.0])
    array = t.numpy()
    array[0] = 9.0
    assert t.tolist() == [9.0, 2.0]


def test_numpy_of_requires_grad_raises():
    t = gf.tensor([1.0], requires_grad=True)
    with pytest.raises(RuntimeError, match=r"detach\(\).numpy\(\)"):
        t.numpy()


def test_from_numpy_shares_memory():
    array = np.zeros(2)
    t = gf.from_numpy(array)
    array[1] = 4.0
    assert t.tolist() == [0.0, 4.0]


def test_tensor_copies_data():
    array = np.zeros(2)
    t = gf.tensor(array)
    array[0] = 1.0
    assert t.tolist() == [0.0, 0.0]


def test_detach_shares_memory_not_graph(device):
    x = gf.tensor([1.0, 2.0], device=device, requires_grad=True)
    y = x * 2
    d = y.detach()
    assert d.grad_fn is None
    assert not d.requires_grad
    assert d.data is y.data


def test_clone_copies_and_keeps_graph(device):
    x = gf.tensor([1.0, 2.0], device=device, requires_grad=True)
    c = x.clone()
    assert c.data is not x.data
    assert c.grad_fn is not None
    (c * 3).sum().backward()
    np.testing.assert_array_equal(to_host(x.grad), [3.0, 3.0])


def test_to_same_device_returns_self(device):
    t = gf.zeros(2, device=device)
    assert t.to(device) is t
    assert t.to(str(device)) is t


def test_to_dtype(device):
    t = gf.zeros(2, device=device)
    assert t.to(gf.float64).dtype == gf.float64
    assert t.to(dtype=gf.float16).dtype == gf.float16
    assert t.to(device, gf.float64).dtype == gf.float64


def test_to_unknown_keyword_raises():
    with pytest.raises(TypeError, match="unexpected keyword"):
        gf.zeros(2).to(layout="strided")


def test_metadata(device):
    t = gf.zeros(2, 3, 4, device=device)
    assert t.ndim == 3
    assert t.dim() == 3
    assert t.numel() == 24
    assert t.size() == (2, 3, 4)
    assert t.size(-1) == 4
    assert len(t) == 2


def test_len_of_0d_raises():
    with pytest.raises(TypeError, match="0-d"):
        len(gf.tensor(1.0))


def test_truth_value_of_several_elements_raises():
    with pytest.raises(ValueError, match="ambiguous"):
        bool(gf.tensor([1.0, 2.0]))


def test_comparisons_return_bool(device):
    t = gf.tensor([1.0, 2.0, 3.0], device=device)
    assert (t > 2).dtype == gf.bool_
    assert to_host(t == 2).tolist() == [False, True, False]


def test_pickle_raises():
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(gf.zeros(2))


def test_turning_off_requires_grad_on_non_leaf_raises():
    y = gf.zeros(2, requires_grad=True) * 2
    with pytest.raises(GraphError, match=r"detach\(\)"):
        y.requires_grad = False


# -- repr ---------------------------------------------------------------------


def test_repr_plain():
    assert repr(gf.tensor([1.0, 2.0])) == "tensor([1., 2.])"


def test_repr_shows_dtype_and_requires_grad():
    t = gf.tensor([1.0], dtype=gf.float64, requires_grad=True)
    assert repr(t) == "tensor([1.], dtype=float64, requires_grad=True)"


def test_repr_shows_grad_fn():
    t = gf.tensor([1.0], requires_grad=True) * 2
    assert repr(t) == "tensor([2.], grad_fn=<Mul>)"


def test_repr_of_integer_tensor():
    assert repr(gf.tensor([1, 2])) == "tensor([1, 2])"


# -- in-place ops on plain tensors --------------------------------------------

PLAIN_INPLACE = {
    "iadd": lambda t: t.__iadd__(1.0),
    "isub": lambda t: t.__isub__(1.0),
    "imul": lambda t: t.__imul__(2.0),
    "itruediv": lambda t: t.__itruediv__(2.0),
    "add_": lambda t: t.add_(gf.ones(3, device=t.device)),
    "mul_": lambda t: t.mul_(2.0),
    "zero_": lambda t: t.zero_(),
    "fill_": lambda t: t.fill_(5.0),
    "setitem": lambda t: t.__setitem__(1, 7.0),
    "setitem-mask": lambda t: t.__setitem__(t > 1.5, 0.0),
}
PLAIN_EXPECTED = {
    "iadd": [2.0, 3.0, 4.0], "isub": [0.0, 1.0, 2.0], "imul": [2.0, 4.0, 6.0],
    "itruediv": [0.5, 1.0, 1.5], "add_": [2.0, 3.0, 4.0], "mul_": [2.0, 4.0, 6.0],
    "zero_": [0.0, 0.0, 0.0], "fill_": [5.0, 5.0, 5.0], "setitem": [1.0, 7.0, 3.0],
    "setitem-mask": [1.0, 0.0, 0.0],
}


@pytest.mark.parametrize("name", sorted(PLAIN_INPLACE))
def test_plain_inplace_changes_memory(name, device):
    t = gf.tensor([1.0, 2.0, 3.0], device=device)
    array = t.data
    before = _version(t)
    PLAIN_INPLACE[name](t)
    assert t.data is array
    np.testing.assert_array_equal(to_host(array), PLAIN_EXPECTED[name])
    assert _version(t) == before + 1


def test_augmented_assignment_keeps_object(device):
    t = gf.tensor([1.0, 2.0], device=device)
    original = t
    t += 1
    t *= 3
    assert t is original
    np.testing.assert_array_equal(to_host(t), [6.0, 9.0])


def test_inplace_through_view_changes_base(device):
    base = gf.tensor([1.0, 2.0, 3.0, 4.0], device=device)
    view = base.reshape(2, 2)
    view += 10
    np.testing.assert_array_equal(to_host(base), [11.0, 12.0, 13.0, 14.0])
    assert _version(base) == _version(view)


def test_inplace_that_enlarges_raises(device):
    t = gf.zeros(3, device=device)
    with pytest.raises(ValueError, match="enlarge"):
        t += gf.ones(2, 3, device=device)


def test_inplace_keeps_integer_dtype(device):
    t = gf.arange(3, device=device)
    t += 2
    assert t.dtype == gf.int64
    assert t.tolist() == [2, 3, 4]


# -- in-place ops inside a graph ----------------------------------------------


def _graph_input(device):
    return gf.tensor([1.0, 2.0, 3.0], dtype=gf.float64, device=device,
                     requires_grad=True)


def test_graph_iadd_is_exact(device):
    x = _graph_input(device)
    y = x * 2
    y += x
    y.sum().backward()
    np.testing.assert_array_equal(to_host(x.grad), [3.0, 3.0, 3.0])


def test_graph_imul_is_exact(device):
    x = _graph_input(device)
    y = x * 1
    y *= x
    y.sum().backward()
    np.testing.assert_array_equal(to_host(x.grad), [2.0, 4.0, 6.0])


def test_graph_setitem_is_exact(device):
    x = _graph_input(device)
    value = gf.tensor(10.0, dtype=gf.float64, device=device, requires_grad=True)
    y = x * 2
    y[1] = value * 3
    y.sum().backward()
    np.testing.assert_array_equal(to_host(x.grad), [2.0, 0.0, 2.0])
    assert value.grad.item() == 3.0
    np.testing.assert_array_equal(to_host(y.detach()), [2.0, 30.0, 6.0])


def test_graph_inplace_bumps_version(device):
    x = _graph_input(device)
    y = x * 2
    before = _version(y)
    y.mul_(3)
    assert _version(y) == before + 1
    assert y.grad_fn.name == "Mul"


def test_graph_zero_cuts_gradient(device):
    x = _graph_input(device)
    y = x * 2
    y.zero_()
    (y + x).sum().backward()
    np.testing.assert_array_equal(to_host(x.grad), [1.0, 1.0, 1.0])


def test_plain_tensor_takes_graph_value_in_place(device):
    x = _graph_input(device)
    t = gf.zeros(3, dtype=gf.float64, device=device)
    t += x * 4
    assert t.requires_grad
    t.sum().backward()
    np.testing.assert_array_equal(to_host(x.grad), [4.0, 4.0, 4.0])


def test_saved_graph_tensor_changed_raises(device):
    x = _graph_input(device)
    y = x * 1
    z = y * y
    y += 1
    with pytest.raises(InplaceModificationError, match="'Mul'.*modified in place"):
        z.sum().backward()


def test_saved_plain_tensor_changed_raises(device):
    x = _graph_input(device)
    w = gf.tensor([1.0, 2.0, 3.0], dtype=gf.float64, device=device)
    z = x * w
    w += 1
    with pytest.raises(InplaceModificationError, match="'Mul'"):
        z.sum().backward()


def test_saved_output_changed_raises(device):
    x = _graph_input(device)
    y = x.exp()
    y += 1
    with pytest.raises(InplaceModificationError, match="'Exp'.*an output"):
        y.sum().backward()


def test_change_after_backward_is_allowed(device):
    x = _graph_input(device)
    w = gf.tensor([1.0, 2.0, 3.0], dtype=gf.float64, device=device)
    (x * w).sum().backward()
    w += 1
    np.testing.assert_array_equal(to_host(x.grad), [1.0, 2.0, 3.0])


@pytest.mark.parametrize("name", ["iadd", "mul_", "zero_", "setitem"])
def test_inplace_on_leaf_requiring_grad_raises(name, device):
    x = _graph_input(device)
    with pytest.raises(GraphError, match="leaf tensor that requires grad"):
        PLAIN_INPLACE[name](x)


def test_inplace_on_leaf_under_no_grad(device):
    x = _graph_input(device)
    array = x.data
    with gf.no_grad():
        x -= 0.5
        x[0] = 0.0
    assert x.data is array
    np.testing.assert_array_equal(to_host(x.detach()), [0.0, 1.5, 2.5])
    assert x.is_leaf
    assert x.requires_grad


# -- DLPack -------------------------------------------------------------------


def test_from_dlpack_shares_torch_memory():
    torch = pytest.importorskip("torch")
    source = torch.arange(4, dtype=torch.float32)
    t = gf.from_dlpack(source)
    source[0] = 9.0
    assert t.dtype == gf.float32
    assert t.tolist() == [9.0, 1.0, 2.0, 3.0]


def test_torch_from_dlpack_shares_gradflow_memory():
    torch = pytest.importorskip("torch")
    t = gf.tensor([1.0, 2.0], dtype=gf.float64)
    exported = torch.from_dlpack(t)
    exported[1] = 5.0
    assert exported.dtype == torch.float64
    assert t.tolist() == [1.0, 5.0]


def test_dlpack_export_of_requires_grad_raises():
    t = gf.tensor([1.0], requires_grad=True)
    with pytest.raises(RuntimeError, match=r"t.detach\(\)"):
        t.__dlpack__()


def test_dlpack_round_trip_with_numpy():
    t = gf.tensor([[1, 2], [3, 4]])
    array = np.from_dlpack(t)
    np.testing.assert_array_equal(array, [[1, 2], [3, 4]])
    assert np.shares_memory(array, t.data)


# -- in-place ops through views while autograd records -----------------------


def test_inplace_on_slice_view_updates_base():
    a = gf.ones(3, requires_grad=True)
    x = a * 1
    view = x[0:2]
    view += 10
    np.testing.assert_array_equal(to_host(x), [11.0, 11.0, 1.0])
    x.sum().backward()
    np.testing.assert_array_equal(to_host(a.grad), [1.0, 1.0, 1.0])


def test_setitem_on_transpose_view_matches_torch():
    torch = pytest.importorskip("torch")
    weights = np.arange(6.0).reshape(2, 3)
    a = gf.ones(2, 3, dtype=gf.float64, requires_grad=True)
    y = a * 1
    y.T[0] = 9.0
    (y * gf.tensor(weights)).sum().backward()
    reference = torch.ones(2, 3, dtype=torch.float64, requires_grad=True)
    y_ref = reference * 1
    y_ref.T[0] = 9.0
    (y_ref * torch.tensor(weights)).sum().backward()
    np.testing.assert_array_equal(to_host(y), y_ref.detach().numpy())
    np.testing.assert_array_equal(to_host(a.grad), reference.grad.numpy())


def test_inplace_on_reshape_view_updates_base():
    a = gf.ones(2, 3, requires_grad=True)
    y = a * 2
    y.reshape(6)[0] = 5.0
    assert to_host(y)[0, 0] == 5.0
    y.sum().backward()
    assert to_host(a.grad)[0, 0] == 0.0
    assert to_host(a.grad)[1, 2] == 2.0


def test_view_sees_later_inplace_on_base():
    a = gf.ones(2, 3, requires_grad=True)
    y = a * 2
    row = y[1]
    y *= 5
    np.testing.assert_array_equal(to_host(row), [10.0, 10.0, 10.0])
    (row * 1).sum().backward()
    np.testing.assert_array_equal(to_host(a.grad), [[0.0] * 3, [10.0] * 3])


def test_inplace_on_broadcast_view_raises():
    a = gf.ones(3, requires_grad=True)
    view = (a * 1).expand(2, 3)
    with pytest.raises(gf.GraphError, match="broadcast view"):
        view += 1


def test_inplace_on_view_of_leaf_raises():
    w = gf.ones(2, 3, requires_grad=True)
    with pytest.raises(gf.GraphError, match="leaf"):
        w.T[0] = 1.0


def test_zero_inside_graph_ignores_nan():
    a = gf.tensor([1.0, float("inf"), float("nan")], requires_grad=True)
    x = a * 1
    x.zero_()
    np.testing.assert_array_equal(to_host(x), [0.0, 0.0, 0.0])
    x.sum().backward()
    np.testing.assert_array_equal(to_host(a.grad), [0.0, 0.0, 0.0])


def test_fill_inside_graph_sets_value():
    a = gf.tensor([1.0, float("nan")], requires_grad=True)
    x = a * 1
    x.fill_(3.0)
    np.testing.assert_array_equal(to_host(x), [3.0, 3.0])


def test_copy_inside_graph_keeps_dtype():
    h = gf.tensor([1.0, 2.0], dtype=gf.float16, requires_grad=True) * 1
    source = gf.tensor([3.0, 4.0], requires_grad=True)
    h.copy_(source)
    assert h.dtype == np.float16
    h.sum().backward()
    np.testing.assert_array_equal(to_host(source.grad), [1.0, 1.0])
    assert source.grad.dtype == np.float32


def test_inplace_float_into_int_raises():
    t = gf.tensor([1, 2, 3])
    with pytest.raises(TypeError, match=r"add_|__iadd__"):
        t += 1.5
    np.testing.assert_array_equal(to_host(t), [1, 2, 3])


# -- dtype promotion follows PyTorch ----------------------------------------------


@pytest.mark.parametrize("expression, expected", [
    (lambda i, h, x: i + h, np.float16),
    (lambda i, h, x: i * 1.5, np.float32),
    (lambda i, h, x: i / 2, np.float32),
    (lambda i, h, x: i / i, np.float32),
    (lambda i, h, x: [1, 2] + x, np.float32),
    (lambda i, h, x: i ** 0.5, np.float32),
    (lambda i, h, x: i * 2, np.int32),
    (lambda i, h, x: 2 ** i, np.int32),
    (lambda i, h, x: x + i, np.float32),
])
def test_promotion_matches_torch(expression, expected):
    i32 = gf.tensor([1, 2], dtype=gf.int32)
    f16 = gf.tensor([1.0, 2.0], dtype=gf.float16)
    x = gf.tensor([1.0, 2.0])
    assert expression(i32, f16, x).dtype == expected


@pytest.mark.parametrize("value, expected", [(3, np.int64), (3.0, np.float32),
                                             (True, np.bool_)])
def test_full_dtype_follows_value(value, expected):
    assert gf.full((2,), value).dtype == expected


def _view_view_inplace(a, b, lib):
    x = a * 1
    inner = x[1:][:, 0:2]
    inner *= 3
    return x


def _setitem_view_with_grad_value(a, b, lib):
    x = a * 1
    row = x[0]
    row[1:3] = b[:2] * 2
    return x


def _constant_base_grad_value(a, b, lib):
    x = lib.zeros(3, 4, dtype=a.dtype)
    row = x[2]
    row += b
    return x * a


def _transpose_view_then_use(a, b, lib):
    x = a * 1
    t = x.T
    t += b[:3]
    return t * 2


def _base_change_then_sibling_views(a, b, lib):
    x = a * 1
    first_row, second_column = x[0], x[:, 1]
    x += 1
    x *= b
    return first_row + second_column[:1].sum()


def _reshape_view_setitem(a, b, lib):
    x = a * 2
    flat = x.reshape(12)
    flat[3] = flat[4] * 5
    return x


@pytest.mark.parametrize("fn", [
    _view_view_inplace, _setitem_view_with_grad_value, _constant_base_grad_value,
    _transpose_view_then_use, _base_change_then_sibling_views, _reshape_view_setitem,
])
def test_inplace_through_views_matches_torch(fn):
    torch = pytest.importorskip("torch")
    values = np.arange(12.0).reshape(3, 4)
    a = gf.tensor(values, dtype=gf.float64, requires_grad=True)
    b = gf.ones(4, dtype=gf.float64, requires_grad=True)
    a_ref = torch.tensor(values, requires_grad=True)
    b_ref = torch.ones(4, dtype=torch.float64, requires_grad=True)
    out, out_ref = fn(a, b, gf), fn(a_ref, b_ref, torch)
    weights = np.random.default_rng(0).standard_normal(tuple(out_ref.shape))
    (out * gf.tensor(weights)).sum().backward()
    (out_ref * torch.tensor(weights)).sum().backward()
    np.testing.assert_allclose(to_host(out), out_ref.detach().numpy())
    np.testing.assert_allclose(to_host(a.grad), a_ref.grad.numpy())
    if b_ref.grad is None:
        assert b.grad is None
    else:
        np.testing.assert_allclose(to_host(b.grad), b_ref.grad.numpy())


def test_write_through_integer_index_reaches_base():
    x = gf.tensor([1.0, 2.0, 3.0, 4.0], dtype=gf.float64, requires_grad=True)
    z = x * 1
    element = z[2]
    element += x[0]
    (z * z).sum().backward()
    np.testing.assert_array_equal(to_host(z), [1.0, 2.0, 4.0, 4.0])
    np.testing.assert_array_equal(to_host(x.grad), [10.0, 4.0, 8.0, 8.0])


def test_element_fill_without_grad_reaches_base():
    b = gf.zeros(3, 3)
    b[1, 2].fill_(5.0)
    assert b.sum().item() == 5.0


def test_copying_reshape_is_not_a_view():
    x = gf.tensor(np.arange(6.0).reshape(2, 3), dtype=gf.float64, requires_grad=True)
    z = x * 1
    flat = z.T.reshape(6)
    flat.mul_(10.0)
    z.sum().backward()
    np.testing.assert_array_equal(to_host(z), np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(to_host(x.grad), np.ones((2, 3)))


def test_fill_with_tensor_value_carries_grad():
    x = gf.tensor([1.0, 2.0, 3.0, 4.0], dtype=gf.float64, requires_grad=True)
    z = x * 1
    z[1:3].fill_(x[0] * 2)
    (z * z).sum().backward()
    np.testing.assert_array_equal(to_host(x.grad), [18.0, 0.0, 0.0, 8.0])


def test_scalar_mul_allows_inplace_on_input():
    x = gf.tensor([1.0, 2.0], requires_grad=True)
    z = x * 1
    w = z * 2
    z.add_(1)
    w.sum().backward()
    np.testing.assert_array_equal(to_host(x.grad), [2.0, 2.0])


def test_saved_operand_still_guarded():
    x = gf.tensor([1.0, 2.0], requires_grad=True)
    z = x * 1
    w = z * x
    z.add_(1)
    with pytest.raises(gf.InplaceModificationError, match="Mul"):
        w.sum().backward()


def test_floor_division_has_no_grad():
    x = gf.tensor([1, 5, 7])
    np.testing.assert_array_equal(to_host(x // 2), [0, 2, 3])
    np.testing.assert_array_equal(to_host(7 // gf.tensor([2, 3])), [3, 2])


def test_grad_cannot_be_itself():
    x = gf.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="own gradient"):
        x.grad = x


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int32", "bool"])
def test_integer_sum_is_int64(dtype):
    values = np.array([100, 100], dtype=dtype) if dtype != "bool" else np.ones(2, bool)
    total = gf.tensor(values).sum()
    assert total.dtype == np.int64
    assert total.item() == int(values.astype(np.int64).sum())
