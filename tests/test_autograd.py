"""The backward engine: order, accumulation, graph lifetime, hooks and gf.grad."""

import gc
import weakref

import numpy as np
import pytest

import gradflow as gf
from conftest import to_host
from gradflow.errors import GraphError, GraphFreedError


def _leaf(values, device, dtype=gf.float64):
    return gf.tensor(values, dtype=dtype, device=device, requires_grad=True)


class _Logged(gf.autograd.Function):
    """The identity, appending its label to ``log`` whenever backward runs."""

    @staticmethod
    def forward(ctx, x, label, log):
        ctx.label, ctx.log = label, log
        return x.copy()

    @staticmethod
    def backward(ctx, grad):
        ctx.log.append(ctx.label)
        return grad, None, None


# -- order and summation ------------------------------------------------------


def test_backward_runs_in_reverse_topological_order(device):
    log = []
    x = _leaf([1.0, 2.0], device)
    a = _Logged.apply(x, "a", log)
    b = _Logged.apply(a * 2, "b", log)
    c = _Logged.apply(a * 3, "c", log)
    d = _Logged.apply(b + c, "d", log)
    d.sum().backward()
    assert log[0] == "d"
    assert sorted(log[1:3]) == ["b", "c"]
    assert log[3] == "a"


def test_shared_record_runs_once(device):
    log = []
    x = _leaf([1.0], device)
    a = _Logged.apply(x, "a", log)
    (a * 2 + a * 3 + a).sum().backward()
    assert log == ["a"]
    np.testing.assert_array_equal(to_host(x.grad), [6.0])


def test_diamond_sums_both_paths(device):
    x = _leaf([1.0, 2.0], device)
    y = x.exp()
    (y.sin() + y.cos()).sum().backward()
    value = np.exp([1.0, 2.0])
    expected = (np.cos(value) - np.sin(value)) * value
    np.testing.assert_allclose(to_host(x.grad), expected, rtol=1e-12)


def test_reused_input_sums_gradients(device):
    x = _leaf([3.0], device)
    (x + x + x).sum().backward()
    np.testing.assert_array_equal(to_host(x.grad), [3.0])


def test_square_by_product(device):
    x = _leaf([3.0, -2.0], device)
    (x * x).sum().backward()
    np.testing.assert_array_equal(to_host(x.grad), [6.0, -4.0])


def test_grad_accumulates_across_backward(device):
    x = _leaf([1.0, 2.0], device)
    (x * 3).sum().backward()
    (x * x).sum().backward()
    np.testing.assert_array_equal(to_host(x.grad), [5.0, 7.0])


def test_broadcast_gradient_sums_to_input_shape(device):
    a = _leaf(np.ones((3, 1)), device)
    b = _leaf(np.ones((1, 4)), device)
    c = _leaf(2.0, device)
    (a * b * c).sum().backward()
    assert a.grad.shape == (3, 1)
    assert b.grad.shape == (1, 4)
    assert c.grad.shape == ()
    np.testing.assert_array_equal(to_host(a.grad), np.full((3, 1), 8.0))
    np.testing.assert_array_equal(to_host(b.grad), np.full((1, 4), 6.0))
    assert c.grad.item() == 12.0


def test_long_chain_has_no_recursion_limit(device):
    x = _leaf([1.0], device)
    y = x
    for _ in range(100_000):
        y = y * 1.0
    y.sum().backward()
    np.testing.assert_array_equal(to_host(x.grad), [1.0])


# -- retain_graph and errors --------------------------------------------------


def test_second_backward_without_retain_graph_raises(device):
    x = _leaf([1.0, 2.0], device)
    y = (x.exp() * x).sum()
    y.backward()
    with pytest.raises(GraphFreedError, match="retain_graph=True"):
        y.backward()


def test_retain_graph_allows_second_backward(device):
    x = _leaf([1.0, 2.0], device)
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_array_equal(to_host(x.grad), [4.0, 8.0])


def test_non_scalar_backward_needs_gradient(device):
    x = _leaf([1.0, 2.0], device)
    with pytest.raises(GraphError, match=r"shape \(2,\) needs a 'gradient'"):
        (x * 2).backward()


def test_non_scalar_backward_with_gradient(device):
    x = _leaf([1.0, 2.0], device)
    (x * 2).backward(gf.tensor([1.0, -1.0], dtype=gf.float64, device=device))
    np.testing.assert_array_equal(to_host(x.grad), [2.0, -2.0])


def test_gradient_of_wrong_shape_raises(device):
    x = _leaf([1.0, 2.0], device)
    wrong = gf.ones(3, dtype=gf.float64, device=device)
    with pytest.raises(GraphError, match=r"'gradient' has shape \(3,\)"):
        (x * 2).backward(wrong)


def test_backward_without_grad_raises(device):
    x = gf.tensor([1.0], device=device)
    with pytest.raises(GraphError, match="does not require grad"):
        (x * 2).sum().backward()


@pytest.mark.parametrize("dtype", ["int64", "int32", "bool"])
def test_requires_grad_on_integer_raises(dtype, device):
    with pytest.raises(TypeError, match="floating-point"):
        gf.tensor([1, 0], dtype=dtype, device=device, requires_grad=True)
    t = gf.tensor([1, 0], dtype=dtype, device=device)
    with pytest.raises(TypeError, match=f"dtype {dtype}"):
        t.requires_grad = True


def test_backward_returning_wrong_shape_raises(device):
    class BadShape(gf.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return grad[:1]

    x = _leaf([1.0, 2.0, 3.0], device)
    with pytest.raises(GraphError, match="BadShape"):
        BadShape.apply(x).sum().backward()


# -- graph lifetime -----------------------------------------------------------


@pytest.fixture
def gc_disabled():
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def test_saved_arrays_released_after_backward(device, gc_disabled):
    x = _leaf([1.0, 2.0], device)
    hidden = x.exp()
    record = hidden.grad_fn
    loss = (hidden * hidden).sum()
    saved = weakref.ref(hidden.data)
    del hidden
    loss.backward()
    assert record.saved == ()
    assert saved() is None


def test_graph_freed_when_outputs_dropped(device, gc_disabled):
    x = _leaf([1.0, 2.0], device)
    hidden = x.exp()
    loss = (hidden.sin() * hidden).sum()
    tensor_ref = weakref.ref(hidden)
    array_ref = weakref.ref(hidden.data)
    record_ref = weakref.ref(hidden.grad_fn)
    del hidden, loss
    assert tensor_ref() is None
    assert array_ref() is None
    assert record_ref() is None


def test_retained_graph_freed_when_outputs_dropped(device, gc_disabled):
    x = _leaf([1.0, 2.0], device)
    hidden = x.tanh()
    loss = (hidden * x).sum()
    loss.backward(retain_graph=True)
    record_ref = weakref.ref(hidden.grad_fn)
    array_ref = weakref.ref(hidden.data)
    del hidden, loss
    assert record_ref() is None
    assert array_ref() is None


# -- hooks and retain_grad ----------------------------------------------------


def test_leaf_hook_sees_gradient(device):
    seen = []
    x = _leaf([1.0, 2.0], device)
    x.register_hook(lambda g: seen.append(to_host(g).copy()))
    (x * 3).sum().backward()
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0], [3.0, 3.0])


def test_leaf_hook_sees_summed_gradient_once(device):
    seen = []
    x = _leaf([1.0], device)
    x.register_hook(lambda g: seen.append(g.item()))
    (x * 2 + x * 5).sum().backward()
    assert seen == [7.0]


def test_leaf_hook_replaces_gradient(device):
    x = _leaf([1.0, 2.0], device)
    x.register_hook(lambda g: g * 10)
    (x * 3).sum().backward()
    np.testing.assert_array_equal(to_host(x.grad), [30.0, 30.0])


def test_non_leaf_hook_replaces_upstream_gradient(device):
    x = _leaf([1.0, 2.0], device)
    y = x * 2
    y.register_hook(lambda g: g + 1)
    (y * 3).sum().backward()
    np.testing.assert_array_equal(to_host(x.grad), [8.0, 8.0])


def test_hook_handle_remove(device):
    seen = []
    x = _leaf([1.0], device)
    y = x * 2
    handle = y.register_hook(lambda g: seen.append(g.item()))
    leaf_handle = x.register_hook(lambda g: g * 0)
    handle.remove()
    leaf_handle.remove()
    y.sum().backward()
    assert seen == []
    np.testing.assert_array_equal(to_host(x.grad), [2.0])


def test_register_hook_needs_requires_grad(device):
    with pytest.raises(GraphError, match="requires grad"):
        gf.tensor([1.0], device=device).register_hook(lambda g: g)


def test_non_leaf_grad_is_none_by_default(device):
    x = _leaf([1.0], device)
    y = x * 2
    (y * 3).sum().backward()
    assert y.grad is None


def test_retain_grad_keeps_non_leaf_grad(device):
    x = _leaf([1.0, 2.0], device)
    y = x * 2
    y.retain_grad()
    (y * y).sum().backward()
    assert y.retains_grad
    np.testing.assert_array_equal(to_host(y.grad), [4.0, 8.0])


# -- gf.grad and Tensor.backward(inputs=) -------------------------------------


def test_grad_returns_gradients_without_touching_grad(device):
    x = _leaf([1.0, 2.0], device)
    (dx,) = gf.grad((x**3).sum(), [x])
    np.testing.assert_allclose(to_host(dx), [3.0, 12.0])
    assert x.grad is None


def test_grad_keeps_existing_grad(device):
    x = _leaf([1.0], device)
    (x * 2).sum().backward()
    gf.grad((x * 5).sum(), [x])
    np.testing.assert_array_equal(to_host(x.grad), [2.0])


def test_grad_unused_input_raises(device):
    x = _leaf([1.0], device)
    unused = _leaf([1.0], device)
    with pytest.raises(GraphError, match="allow_unused=True"):
        gf.grad((x * 2).sum(), [x, unused])


def test_grad_allow_unused_returns_none(device):
    x = _leaf([1.0], device)
    unused = _leaf([1.0], device)
    dx, dunused = gf.grad((x * 2).sum(), [x, unused], allow_unused=True)
    assert dunused is None
    assert dx.item() == 2.0


def test_grad_several_outputs_and_grad_outputs(device):
    x = _leaf([1.0, 2.0], device)
    first, second = x * 2, x * x
    weights = [
        gf.tensor([1.0, 10.0], dtype=gf.float64, device=device),
        gf.tensor([3.0, -1.0], dtype=gf.float64, device=device),
    ]
    (dx,) = gf.grad([first, second], [x], grad_outputs=weights)
    np.testing.assert_array_equal(to_host(dx), [2.0 + 6.0, 20.0 - 4.0])


def test_grad_outputs_count_mismatch_raises(device):
    x = _leaf([1.0], device)
    with pytest.raises(ValueError, match="1 grad_outputs for 2 outputs"):
        gf.grad([x * 2, x * 3], [x], grad_outputs=[gf.ones_like(x)])


def test_grad_with_respect_to_non_leaf(device):
    x = _leaf([1.0, 2.0], device)
    y = x * 3
    (dy,) = gf.grad((y * y).sum(), [y])
    np.testing.assert_array_equal(to_host(dy), [6.0, 12.0])


def test_grad_input_without_requires_grad_raises(device):
    x = _leaf([1.0], device)
    constant = gf.tensor([1.0], device=device)
    with pytest.raises(GraphError, match=r"inputs\[1\]"):
        gf.grad((x * constant).sum(), [x, constant])


def test_backward_inputs_limits_leaves(device):
    x = _leaf([1.0], device)
    w = _leaf([2.0], device)
    (x * w).sum().backward(inputs=[w])
    assert x.grad is None
    assert w.grad.item() == 1.0


def test_backward_inputs_accumulates(device):
    x = _leaf([1.0], device)
    w = _leaf([2.0], device)
    (x * w).sum().backward(inputs=[x])
    (x * w).sum().backward(inputs=x)
    assert x.grad.item() == 4.0


def test_autograd_backward_several_roots(device):
    x = _leaf([1.0, 2.0], device)
    gf.autograd.backward([(x * 2).sum(), (x * x).sum()])
    np.testing.assert_array_equal(to_host(x.grad), [4.0, 6.0])


# -- second order -------------------------------------------------------------


def test_grad_without_create_graph_has_no_grad_fn(device):
    x = _leaf([1.0, 2.0], device)
    (dx,) = gf.grad((x.sin() * x).sum(), [x])
    assert dx.grad_fn is None
    assert not dx.requires_grad


def test_backward_without_create_graph_leaves_plain_grad(device):
    x = _leaf([1.0, 2.0], device)
    (x.exp() * x).sum().backward()
    assert x.grad.grad_fn is None


def test_create_graph_grad_is_differentiable(device):
    x = _leaf([1.0, 2.0], device)
    (dx,) = gf.grad((x**3).sum(), [x], create_graph=True)
    assert dx.grad_fn is not None
    (ddx,) = gf.grad(dx.sum(), [x])
    np.testing.assert_allclose(to_host(ddx), [6.0, 12.0])


def test_backward_create_graph_records_grad(device):
    x = _leaf([1.0, 2.0], device)
    (x**3).sum().backward(create_graph=True)
    assert x.grad.grad_fn is not None
    (ddx,) = gf.grad(x.grad.sum(), [x])
    np.testing.assert_allclose(to_host(ddx), [6.0, 12.0])


def _mlp(m, x, w1, b1, w2):
    hidden = m.tanh(x @ w1 + b1)
    return (m.sigmoid(hidden @ w2) ** 2).sum()


def test_hessian_vector_product_matches_torch(device):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    arrays = [rng.standard_normal(s) for s in ((4, 3), (3, 5), (5,), (5, 2))]
    vectors = [rng.standard_normal(a.shape) for a in arrays[1:]]

    x = gf.tensor(arrays[0], device=device)
    params = [_leaf(a, device) for a in arrays[1:]]
    grads = gf.grad(_mlp(gf, x, *params), params, create_graph=True)
    dot = sum((g * gf.tensor(v, device=device)).sum() for g, v in zip(grads, vectors))
    hvp = gf.grad(dot, params)

    t_x = torch.tensor(arrays[0])
    t_params = [torch.tensor(a, requires_grad=True) for a in arrays[1:]]
    t_grads = torch.autograd.grad(_mlp(torch, t_x, *t_params), t_params,
                                  create_graph=True)
    t_dot = sum((g * torch.tensor(v)).sum() for g, v in zip(t_grads, vectors))
    t_hvp = torch.autograd.grad(t_dot, t_params)
    for ours, theirs in zip(hvp, t_hvp):
        np.testing.assert_allclose(to_host(ours), theirs.numpy(), rtol=1e-10)


def test_grad_outputs_of_wrong_shape_raises(device):
    x = _leaf([1.0, 2.0], device)
    wrong = gf.ones(1, 2, dtype=gf.float64, device=device)
    with pytest.raises(GraphError, match=r"gf.grad: 'gradient' has shape \(1, 2\)"):
        gf.grad(x * 2, [x], grad_outputs=[wrong])


class _DropsFirstGradient(gf.autograd.Function):
    """Returns None for its first input although that input requires grad."""

    @staticmethod
    def forward(ctx, a, b):
        return a + b

    @staticmethod
    def backward(ctx, grad):
        return None, grad


def test_none_gradient_does_not_stall_parents():
    x = gf.tensor([1.0, 2.0], dtype=gf.float64, requires_grad=True)
    shared = x * 3
    # shared reaches the loss directly and through an edge that returns None;
    # the record behind shared must still run once the None is reported.
    out = _DropsFirstGradient.apply(shared * 1, x) + shared
    out.sum().backward()
    np.testing.assert_array_equal(to_host(x.grad), [4.0, 4.0])


# -- leaf gradients kept without a copy ------------------------------------------


class _Fresh(gf.autograd.Function):
    """Doubles its input; backward reports each gradient array it creates."""

    created = []

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        out = grad * 2
        _Fresh.created.append(weakref.ref(out))
        return out


class _GiveBackInput(gf.autograd.Function):
    """Returns its saved input array itself as the gradient."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.copy()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return x


def test_fresh_leaf_gradient_is_kept():
    _Fresh.created.clear()
    x = gf.tensor([1.0, 2.0], requires_grad=True)
    _Fresh.apply(x).sum().backward()
    assert _Fresh.created[0]() is x.grad.data


def test_shared_gradient_is_copied_per_leaf():
    a = gf.tensor([1.0, 2.0], requires_grad=True)
    b = gf.tensor([3.0, 4.0], requires_grad=True)
    ((a + b) * 2).sum().backward()  # the add hands one array to both leaves
    assert not np.shares_memory(a.grad.data, b.grad.data)
    (a * 1).sum().backward()
    np.testing.assert_array_equal(a.grad.data, [3.0, 3.0])
    np.testing.assert_array_equal(b.grad.data, [2.0, 2.0])


def test_root_gradient_of_user_is_copied():
    a = gf.tensor([1.0, 2.0], requires_grad=True)
    b = gf.tensor([3.0, 4.0], requires_grad=True)
    mine = np.array([5.0, 6.0], dtype=np.float32)
    (a + b).backward(gf.tensor(mine))
    assert not np.shares_memory(a.grad.data, mine)
    assert not np.shares_memory(b.grad.data, mine)
    a.grad.data += 1
    np.testing.assert_array_equal(mine, [5.0, 6.0])


def test_gradient_kept_by_hook_is_copied():
    stored = []
    x = gf.tensor([1.0, 2.0], requires_grad=True)
    x.register_hook(stored.append)
    _Fresh.apply(x).sum().backward()
    assert not np.shares_memory(stored[0].data, x.grad.data)


def test_saved_array_returned_as_gradient_is_copied():
    x = gf.tensor([1.0, 2.0], requires_grad=True)
    _GiveBackInput.apply(x).sum().backward()
    assert not np.shares_memory(x.grad.data, x.data)
    x.grad.data += 1
    np.testing.assert_array_equal(x.data, [1.0, 2.0])


def test_create_graph_gives_each_leaf_its_grad():
    a = gf.tensor([1.0, 1.0, 1.0], requires_grad=True)
    b = gf.tensor([1.0, 1.0, 1.0], requires_grad=True)
    c = gf.tensor([1.0, 2.0, 3.0])
    ((a + b) * c).sum().backward(create_graph=True)
    assert a.grad is not b.grad
    (a * 5).sum().backward()
    np.testing.assert_array_equal(a.grad.data, [6.0, 7.0, 8.0])
    np.testing.assert_array_equal(b.grad.data, [1.0, 2.0, 3.0])


def test_create_graph_broadcast_grad_is_writable():
    a = gf.tensor([1.0, 2.0], requires_grad=True)
    b = gf.tensor([3.0, 4.0], requires_grad=True)
    (a + b).sum().backward(create_graph=True)
    (a * 2).sum().backward()
    np.testing.assert_array_equal(a.grad.data, [3.0, 3.0])
    np.testing.assert_array_equal(b.grad.data, [1.0, 1.0])


def test_create_graph_grad_keeps_its_graph():
    x = gf.tensor([1.0, 2.0], requires_grad=True)
    (x ** 3).sum().backward(create_graph=True)
    assert x.grad.grad_fn is not None
    (g,) = gf.grad(x.grad.sum(), [x])
    np.testing.assert_allclose(g.data, [6.0, 12.0])
