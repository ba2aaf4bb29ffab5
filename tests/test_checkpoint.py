"""gf.checkpoint, checkpoint_sequential and the selective Policy."""

import numpy as np
import pytest
from conftest import to_host

import gradflow as gf
from gradflow.nn.functional import dropout


def _mlp(depth, width, device, dtype=gf.float32, p=0.0):
    layers = []
    for _ in range(depth):
        layers += [gf.nn.Linear(width, width, device=device, dtype=dtype),
                   gf.nn.GELU()]
        if p:
            layers.append(gf.nn.Dropout(p))
    return gf.nn.Sequential(*layers)


def _grads(model, x, run):
    model.zero_grad()
    if x.requires_grad:
        x.grad = None
    run(model, x).square().sum().backward()
    grads = [to_host(p.grad).copy() for p in model.parameters()]
    if x.requires_grad:
        grads.append(to_host(x.grad).copy())
    return grads


def _assert_same(expected, actual, device):
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        if device.type == "cpu":
            assert np.array_equal(e, a)
        else:
            np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


def _plain(model, x):
    return model(x)


def _whole(model, x):
    return gf.checkpoint(model, x)


def _sequential(model, x):
    return gf.checkpoint_sequential(model, 3, x)


def _selective(model, x):
    return gf.checkpoint(model, x, policy=gf.checkpoint.Policy())


def _selective_sequential(model, x):
    return gf.checkpoint_sequential(model, 3, x, policy=gf.checkpoint.Policy())


MODES = [_whole, _sequential, _selective, _selective_sequential]


@pytest.mark.parametrize("dtype", [gf.float32, gf.float64])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.__name__.strip("_"))
def test_gradients_bitwise(device, dtype, mode):
    model = _mlp(4, 16, device, dtype)
    x = gf.randn(8, 16, dtype=dtype, device=device, requires_grad=True)
    _assert_same(_grads(model, x, _plain), _grads(model, x, mode), device)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.__name__.strip("_"))
def test_dropout_replayed(device, mode):
    model = _mlp(3, 16, device, p=0.5)
    x = gf.randn(8, 16, device=device, requires_grad=True)
    state = gf.get_rng_state(device)
    expected = _grads(model, x, _plain)
    gf.set_rng_state(state, device)
    actual = _grads(model, x, mode)
    _assert_same(expected, actual, device)


def test_rng_state_unchanged_by_backward():
    model = _mlp(2, 8, "cpu", p=0.5)
    y = gf.checkpoint(model, gf.randn(4, 8))
    before = gf.rand(3).numpy()
    gf.manual_seed(7)
    gf.rand(3)
    after_draw = gf.get_rng_state()
    y.sum().backward()
    assert gf.get_rng_state() == after_draw
    assert before.shape == (3,)


def test_params_without_input_grad():
    model = _mlp(2, 8, "cpu")
    x = gf.randn(4, 8)
    y = gf.checkpoint(model, x)
    assert y.requires_grad
    expected = _grads(model, x, _plain)
    _assert_same(expected, _grads(model, x, _whole), gf.device("cpu"))


def test_captured_tensor_with_graph():
    a = gf.randn(5, requires_grad=True)
    h = a * 3.0
    x = gf.randn(5, requires_grad=True)
    y = gf.checkpoint(lambda t: (t * h).sin(), x)
    y.sum().backward()
    got = (a.grad.numpy().copy(), x.grad.numpy().copy())
    a.grad = x.grad = None
    ((x * (a * 3.0)).sin()).sum().backward()
    assert np.array_equal(got[0], a.grad.numpy())
    assert np.array_equal(got[1], x.grad.numpy())


def test_cut_region_edges_of_c_record():
    # An elementwise op's C record keeps its edges in a tuple, which the cut
    # replaces with a list that points at the proxy.
    from gradflow.checkpoint import _region

    a = gf.randn(5, requires_grad=True)
    h = a * 3.0
    t = gf.randn(5, requires_grad=True)
    record = (t * h).grad_fn
    outside = (h.grad_fn, h._out_index)
    proxy = gf.randn(5, requires_grad=True)
    _region._cut_region_edges([record], {outside: proxy})
    assert record.edges[0] is t
    assert record.edges[1] is proxy


def test_outputs_kwargs_and_constants():
    x = gf.randn(3, 4, requires_grad=True)
    w = gf.randn(4, 4, requires_grad=True)

    def fn(x, scale, *, weight, name):
        h = (x @ weight) * scale
        return h.tanh(), name, h.exp()

    a, name, b = gf.checkpoint(fn, x, 2.0, weight=w, name="block")
    assert name == "block"
    (a.sum() + b.sum()).backward()
    got = (x.grad.numpy().copy(), w.grad.numpy().copy())
    x.grad = w.grad = None
    a, _, b = fn(x, 2.0, weight=w, name="block")
    (a.sum() + b.sum()).backward()
    assert np.array_equal(got[0], x.grad.numpy())
    assert np.array_equal(got[1], w.grad.numpy())


def test_one_output_used():
    x = gf.randn(6, requires_grad=True)
    a, b = gf.checkpoint(lambda t: (t.sin(), t.cos()), x)
    b.sum().backward()
    assert np.array_equal(x.grad.numpy(), -np.sin(x.detach().numpy()))


def test_nested_checkpoints():
    model = _mlp(4, 8, "cpu")
    inner = list(model.children())

    def outer(x):
        x = gf.checkpoint(gf.nn.Sequential(*inner[:4]), x)
        return gf.checkpoint(gf.nn.Sequential(*inner[4:]), x)

    x = gf.randn(4, 8, requires_grad=True)
    expected = _grads(model, x, _plain)
    actual = _grads(model, x, lambda m, t: gf.checkpoint(outer, t))
    _assert_same(expected, actual, gf.device("cpu"))


def test_grad_function():
    x = gf.randn(5, requires_grad=True)
    w = gf.randn(5, requires_grad=True)
    (gx, gw) = gf.grad(gf.checkpoint(lambda t: (t * w).tanh(), x).sum(), [x, w])
    (ex, ew) = gf.grad((x * w).tanh().sum(), [x, w])
    assert np.array_equal(gx.numpy(), ex.numpy())
    assert np.array_equal(gw.numpy(), ew.numpy())
    assert x.grad is None


def test_create_graph_second_order():
    x = gf.randn(5, dtype=gf.float64, requires_grad=True)
    a = gf.randn(5, dtype=gf.float64, requires_grad=True)
    h = a * 2.0

    def f(t):
        return (t * t * h).sin()

    (gx,) = gf.grad(gf.checkpoint(f, x).sum(), [x], create_graph=True)
    (hx, ha) = gf.grad(gx.sum(), [x, a], retain_graph=True)
    (ex,) = gf.grad(f(x).sum(), [x], create_graph=True)
    (fx, fa) = gf.grad(ex.sum(), [x, a])
    np.testing.assert_allclose(hx.numpy(), fx.numpy(), rtol=1e-12)
    np.testing.assert_allclose(ha.numpy(), fa.numpy(), rtol=1e-12)


def _second_order(x, w, checkpointed):
    x.grad = w.grad = None

    def block(u):
        return (u @ w).tanh()

    h = gf.checkpoint(block, x) if checkpointed else block(x)
    (gx,) = gf.grad(h.tanh().sum(), [x], create_graph=True)
    (gx * gx).sum().backward()
    return x.grad.numpy().copy(), w.grad.numpy().copy()


def test_create_graph_bitwise():
    gf.manual_seed(0)
    w = gf.randn(4, 4, requires_grad=True)
    x = gf.randn(3, 4, requires_grad=True)
    expected = _second_order(x, w, checkpointed=False)
    actual = _second_order(x, w, checkpointed=True)
    assert np.array_equal(expected[0], actual[0])
    assert np.array_equal(expected[1], actual[1])


def test_create_graph_recomputes_once():
    w = gf.randn(4, 4, requires_grad=True)
    x = gf.randn(3, 4, requires_grad=True)
    before = gf.checkpoint.recompute_count()
    _second_order(x, w, checkpointed=True)
    assert gf.checkpoint.recompute_count() - before == 1


def test_create_graph_captured_graph_bitwise():
    a = gf.randn(5, dtype=gf.float64, requires_grad=True)
    x = gf.randn(5, dtype=gf.float64, requires_grad=True)
    results = []
    for checkpointed in (False, True):
        x.grad = a.grad = None
        h = a * 3.0

        def block(t):
            return (t * h).sin()

        y = gf.checkpoint(block, x) if checkpointed else block(x)
        (gx,) = gf.grad(y.square().sum(), [x], create_graph=True)
        (gx * gx).sum().backward()
        results.append((x.grad.numpy().copy(), a.grad.numpy().copy()))
    assert np.array_equal(results[0][0], results[1][0])
    assert np.array_equal(results[0][1], results[1][1])


def test_create_graph_then_first_order():
    x = gf.randn(5, requires_grad=True)
    y = gf.checkpoint(lambda t: t.sin() * t, x)
    (gx,) = gf.grad(y.sum(), [x], create_graph=True)
    before = gf.checkpoint.recompute_count()
    y.sum().backward()
    assert gf.checkpoint.recompute_count() == before
    assert np.array_equal(x.grad.numpy(), gx.detach().numpy())


def test_gradcheck_through_checkpoint():
    w = gf.randn(3, 3, dtype=gf.float64, requires_grad=True)

    def f(x, w):
        return gf.checkpoint(lambda t: gf.gelu(t @ w), x)

    x = gf.randn(2, 3, dtype=gf.float64, requires_grad=True)
    assert gf.gradcheck(f, (x, w))


def test_no_grad_runs_plainly():
    calls = []
    with gf.no_grad():
        y = gf.checkpoint(lambda t: calls.append(1) or t * 2, gf.ones(2))
    assert not y.requires_grad
    assert calls == [1]


def test_retain_graph_twice():
    x = gf.randn(4, requires_grad=True)
    y = gf.checkpoint(lambda t: t.exp().sum(), x)
    y.backward(retain_graph=True)
    y.backward()
    assert np.array_equal(x.grad.numpy(), 2 * np.exp(x.detach().numpy()))


class _RunningMean(gf.nn.Module):
    """Scales its input and counts forwards, skipping recomputed ones."""

    def __init__(self):
        super().__init__()
        self.weight = gf.nn.Parameter(gf.ones(4))
        self.updates = 0
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if not gf.checkpoint.is_recomputing():
            self.updates += 1
        return x * self.weight


def test_stateful_layer_updated_once():
    layer = _RunningMean()
    flags = []
    y = gf.checkpoint(lambda t: flags.append(gf.checkpoint.is_recomputing())
                      or layer(t), gf.randn(2, 4))
    y.sum().backward()
    assert layer.calls == 2
    assert layer.updates == 1
    assert flags == [False, True]
    assert not gf.checkpoint.is_recomputing()


def test_inplace_change_detected():
    x = gf.randn(4, requires_grad=True)
    h = x * 1.0
    y = gf.checkpoint(lambda t: t.sin(), h)
    with gf.no_grad():
        h += 1
    with pytest.raises(gf.InplaceModificationError):
        y.sum().backward()


def test_recompute_count_sequential():
    model = _mlp(6, 4, "cpu")
    before = gf.checkpoint.recompute_count()
    gf.checkpoint_sequential(model, 4, gf.randn(2, 4)).sum().backward()
    assert gf.checkpoint.recompute_count() - before == 3


def test_segment_bounds_uniform():
    assert gf.checkpoint.segment_bounds(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]


def test_sequential_rejects_bad_segments():
    with pytest.raises(ValueError, match="segments"):
        gf.checkpoint_sequential(_mlp(1, 2, "cpu"), 5, gf.randn(1, 2))


def _selective_forward_calls(function, model, x):
    """Return the forward calls of ``function`` in a selective step and backward."""
    calls = []
    original = function.forward

    def counting(ctx, *args, **kwargs):
        calls.append(1)
        return original(ctx, *args, **kwargs)

    function.forward = staticmethod(counting)
    try:
        y = gf.checkpoint(model, x, policy=gf.checkpoint.Policy())
        forward_calls = len(calls)
        y.sum().backward()
    finally:
        function.forward = staticmethod(original)
    return forward_calls, len(calls) - forward_calls


def test_selective_skips_matmul():
    from gradflow.nn._layers import LinearFunction

    model = _mlp(3, 8, "cpu")
    forward_calls, backward_calls = _selective_forward_calls(
        LinearFunction, model, gf.randn(4, 8))
    assert forward_calls == 3
    assert backward_calls == 0


def test_policy_rejects_non_function():
    with pytest.raises(TypeError, match="Function subclasses"):
        gf.checkpoint.Policy(keep=["matmul"])


def test_structure_change_raises():
    flag = []

    def fn(t):
        flag.append(1)
        return (t, t * 2) if len(flag) == 1 else (t * 2,)

    a, b = gf.checkpoint(fn, gf.randn(3, requires_grad=True))
    with pytest.raises(gf.GraphError, match="same ops"):
        b.sum().backward()


def _gelu_chain(depth, width, dtype=gf.float32):
    gf.manual_seed(0)
    return _mlp(depth, width, "cpu", dtype)


def test_selective_grad_function():
    model = _gelu_chain(3, 8)
    x = gf.randn(4, 8, requires_grad=True)
    params = list(model.parameters())
    policy = gf.checkpoint.Policy()
    expected = gf.grad(model(x).square().sum(), [x] + params)
    actual = gf.grad(gf.checkpoint(model, x, policy=policy).square().sum(),
                     [x] + params)
    for e, a in zip(expected, actual):
        assert np.array_equal(e.numpy(), a.numpy())
    assert x.grad is None


def _second_order_gelu(x, w, policy):
    x.grad = w.grad = None

    def block(u):
        return gf.gelu(gf.gelu(u @ w) @ w)

    h = block(x) if policy is None else gf.checkpoint(block, x, policy=policy)
    (gx,) = gf.grad(h.tanh().sum(), [x], create_graph=True)
    (gx * gx).sum().backward()
    return x.grad.numpy().copy(), w.grad.numpy().copy()


@pytest.mark.parametrize("dtype", [gf.float32, gf.float64])
def test_selective_create_graph_bitwise(dtype):
    gf.manual_seed(0)
    w = gf.randn(4, 4, dtype=dtype, requires_grad=True)
    x = gf.randn(3, 4, dtype=dtype, requires_grad=True)
    expected = _second_order_gelu(x, w, None)
    actual = _second_order_gelu(x, w, gf.checkpoint.Policy())
    assert np.array_equal(expected[0], actual[0])
    assert np.array_equal(expected[1], actual[1])


def test_selective_nested_with_whole():
    model = _gelu_chain(4, 8)
    inner = list(model.children())
    policy = gf.checkpoint.Policy()

    def whole_inside(x):
        x = gf.checkpoint(gf.nn.Sequential(*inner[:4]), x)
        return gf.nn.Sequential(*inner[4:])(x)

    def selective_inside(x):
        x = gf.checkpoint(gf.nn.Sequential(*inner[:4]), x, policy=policy)
        return gf.nn.Sequential(*inner[4:])(x)

    x = gf.randn(4, 8, requires_grad=True)
    expected = _grads(model, x, _plain)
    runs = [
        lambda m, t: gf.checkpoint(whole_inside, t, policy=policy),
        lambda m, t: gf.checkpoint(selective_inside, t),
        lambda m, t: gf.checkpoint(
            lambda u: gf.checkpoint(m, u, policy=policy), t, policy=policy),
    ]
    for run in runs:
        _assert_same(expected, _grads(model, x, run), gf.device("cpu"))


class _Residual(gf.nn.Module):
    def __init__(self, width, dtype):
        super().__init__()
        self.linear = gf.nn.Linear(width, width, dtype=dtype)

    def forward(self, x):
        return x + gf.gelu(self.linear(x))


@pytest.mark.parametrize("max_ops", [0, 1, 4, 8])
def test_selective_residual_bitwise(max_ops):
    gf.manual_seed(0)
    model = gf.nn.Sequential(*[_Residual(8, gf.float64) for _ in range(6)])
    x = gf.randn(4, 8, dtype=gf.float64, requires_grad=True)
    policy = gf.checkpoint.Policy(max_recomputed_ops=max_ops)
    expected = _grads(model, x, _plain)
    actual = _grads(model, x, lambda m, t: gf.checkpoint(m, t, policy=policy))
    _assert_same(expected, actual, gf.device("cpu"))


def _peak_bytes(model, x, run):
    with gf.memory.Ledger() as ledger:
        run(model, x).sum().backward()
    return ledger.peak_activation_bytes


def test_selective_halves_chain_memory():
    model = _gelu_chain(6, 16)
    x = gf.randn(8, 16)
    unit = 8 * 16 * 4
    policy = gf.checkpoint.Policy()
    # Plain: each GELU saves its input, and each Linear but the first saves
    # the GELU output before it (the first reads x, a leaf).
    assert _peak_bytes(model, x, _plain) == (6 + 5) * unit
    # Selective: the GELU inputs alone. Backward recomputes one GELU output
    # at a time, after the last GELU has freed its input.
    selective = _peak_bytes(model, x, lambda m, t: gf.checkpoint(m, t, policy=policy))
    assert selective == 6 * unit


def test_selective_without_recomputation():
    model = _gelu_chain(3, 16)
    x = gf.randn(8, 16)
    policy = gf.checkpoint.Policy(max_recomputed_ops=0)
    run = lambda m, t: gf.checkpoint(m, t, policy=policy)  # noqa: E731
    assert _peak_bytes(model, x, run) == _peak_bytes(model, x, _plain)


def test_selective_recomputes_each_gelu_once():
    from gradflow._ops._activation import Gelu

    model = _gelu_chain(4, 8)
    forward_calls, backward_calls = _selective_forward_calls(
        Gelu, model, gf.randn(4, 8))
    assert forward_calls == 4
    # The last GELU's output is not saved by any op, so it is not recomputed.
    assert backward_calls == 3


def test_selective_inplace_change_detected():
    w = gf.randn(4, 4, requires_grad=True)
    x = gf.randn(3, 4, requires_grad=True)

    def block(u):
        h = u @ w
        return gf.gelu(h) @ w, h

    y, h = gf.checkpoint(block, x, policy=gf.checkpoint.Policy())
    with gf.no_grad():
        h += 1
    with pytest.raises(gf.InplaceModificationError):
        y.sum().backward()


def test_policy_rejects_bad_max_ops():
    with pytest.raises(ValueError, match="max_recomputed_ops"):
        gf.checkpoint.Policy(max_recomputed_ops=-1)
    with pytest.raises(ValueError, match="max_recomputed_ops"):
        gf.checkpoint.Policy(max_recomputed_ops=1.5)


def test_checkpoint_rejects_non_policy():
    with pytest.raises(TypeError, match="gf.checkpoint.Policy"):
        gf.checkpoint(lambda t: t * 2, gf.randn(2, requires_grad=True),
                      policy="matmul")


def _leaf_through_input(x, w):
    # Mul saves nothing, so the recipe for its output reads x through the
    # record's edge to the leaf.
    return ((x * 2).sin() * w).sum()


def _leaf_saved(x, w):
    # Sin saves x itself, and the recipe for its output reads that.
    return (x.sin() * w).sum()


def _leaf_grads(block, policy, change):
    x = gf.tensor([0.1, 0.2, 0.3], requires_grad=True)
    w = gf.tensor([1.0, 2.0, 3.0], requires_grad=True)
    if policy is None:
        y = block(x, w)
    else:
        y = gf.checkpoint(block, x, w, policy=policy)
    change(x)
    y.backward()
    return x.grad.numpy().copy(), w.grad.numpy().copy()


def _assign_zeros(x):
    x.data = np.zeros(3, np.float32)


@pytest.mark.parametrize("block", [_leaf_through_input, _leaf_saved])
def test_selective_leaf_data_assigned(block):
    expected = _leaf_grads(block, None, _assign_zeros)
    actual = _leaf_grads(block, gf.checkpoint.Policy(), _assign_zeros)
    assert np.array_equal(expected[0], actual[0])
    assert np.array_equal(expected[1], actual[1])
    x = np.array([0.1, 0.2, 0.3], np.float32)
    assert np.allclose(actual[1], np.sin(2 * x if block is _leaf_through_input else x))


def _changing_inside(change, through_input):
    # The change comes after the op that reads x and before the op that
    # saves that op's output.
    def block_through_input(x, w):
        h = x * 2
        change(x)
        return (h.sin() * w).sum()

    def block_saved(x, w):
        h = x.sin()
        change(x)
        return (h * w).sum()

    return block_through_input if through_input else block_saved


def _multiply_by_zero(x):
    with gf.no_grad():
        x.mul_(0)


@pytest.mark.parametrize("through_input", [True, False])
@pytest.mark.parametrize("change", [_assign_zeros, _multiply_by_zero])
def test_selective_leaf_changed_inside(change, through_input):
    # The output of the op that read x can no longer be recomputed, so it is
    # saved as it is.
    block = _changing_inside(change, through_input)
    unchanged = lambda x: None  # noqa: E731
    if change is _multiply_by_zero and not through_input:
        # Sin saved x itself, so plain autograd raises as well.
        for policy in (None, gf.checkpoint.Policy()):
            with pytest.raises(gf.InplaceModificationError, match="'Sin' saved"):
                _leaf_grads(block, policy, unchanged)
        return
    expected = _leaf_grads(block, None, unchanged)
    actual = _leaf_grads(block, gf.checkpoint.Policy(), unchanged)
    assert np.array_equal(expected[0], actual[0])
    assert np.array_equal(expected[1], actual[1])


def test_selective_leaf_inplace_raises():
    # Plain autograd needs nothing of x here, but the policy recomputes x * 2
    # from x's array, which now contains zeros, so backward must raise.
    policy = gf.checkpoint.Policy()
    with pytest.raises(gf.InplaceModificationError, match="Policy"):
        _leaf_grads(_leaf_through_input, policy, _multiply_by_zero)
    # With Mul kept, its output is saved and nothing reads x in backward.
    keep = gf.checkpoint.Policy(keep=[gf._ops._arith.Mul])
    expected = _leaf_grads(_leaf_through_input, None, _multiply_by_zero)
    actual = _leaf_grads(_leaf_through_input, keep, _multiply_by_zero)
    assert np.array_equal(expected[0], actual[0])
    assert np.array_equal(expected[1], actual[1])


def test_selective_leaf_ledger_counts():
    x = gf.randn(16, requires_grad=True)
    w = gf.randn(16, requires_grad=True)
    with gf.memory.Ledger() as ledger:
        y = gf.checkpoint(_leaf_through_input, x, w, policy=gf.checkpoint.Policy())
        # Both recipes read x's array, and the last Mul saves w: leaves alone.
        assert ledger.activation_bytes == 0
        assert ledger.leaf_bytes == 2 * 16 * 4
        old = x.data
        x.data = np.zeros(16, np.float32)
        # The recipes keep the array that x had in the forward.
        assert ledger.holds(old)
        assert ledger.leaf_bytes == 2 * 16 * 4
        y.backward()
        assert ledger.total_bytes == 0
