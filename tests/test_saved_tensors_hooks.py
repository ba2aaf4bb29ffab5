"""gf.autograd.graph.saved_tensors_hooks: packing what records save."""

import numpy as np
import pytest

import gradflow as gf
from gradflow.autograd.graph import saved_tensors_hooks


class _HostCopy:
    """Packs each saved Tensor as a NumPy copy and counts both hooks."""

    def __init__(self):
        self.packed = 0
        self.unpacked = 0

    def pack(self, tensor):
        self.packed += 1
        return tensor.detach().numpy().copy()

    def unpack(self, array):
        self.unpacked += 1
        return gf.tensor(array)


def _loss(x, w):
    return ((x @ w).tanh() * x.sum()).sin().sum()


def _grads(x, w, hooks=None):
    x.grad = w.grad = None
    if hooks is None:
        loss = _loss(x, w)
    else:
        with saved_tensors_hooks(hooks.pack, hooks.unpack):
            loss = _loss(x, w)
    loss.backward()
    return x.grad.numpy().copy(), w.grad.numpy().copy()


def test_hooks_gradients_bitwise():
    x = gf.randn(3, 4, requires_grad=True)
    w = gf.randn(4, 5, requires_grad=True)
    hooks = _HostCopy()
    expected = _grads(x, w)
    actual = _grads(x, w, hooks)
    assert np.array_equal(expected[0], actual[0])
    assert np.array_equal(expected[1], actual[1])
    assert hooks.packed > 0
    assert hooks.unpacked == hooks.packed


def _packing_as_is(seen):
    def pack(tensor):
        seen.append(tensor)
        return tensor

    return saved_tensors_hooks(pack, lambda t: t)


def test_hooks_see_saved_tensors():
    x = gf.randn(4, requires_grad=True)
    seen = []
    with _packing_as_is(seen):
        x.sin()
    assert len(seen) == 1
    assert seen[0] is x


def test_output_packed_without_graph():
    x = gf.randn(4, requires_grad=True)
    seen = []
    with _packing_as_is(seen):
        y = x.exp()   # saves its output
    y.sum().backward()
    assert len(seen) == 1
    assert seen[0].grad_fn is None
    assert np.array_equal(seen[0].numpy(), y.detach().numpy())
    assert np.array_equal(x.grad.numpy(), y.detach().numpy())


def test_innermost_hooks_apply():
    outer, inner = _HostCopy(), _HostCopy()
    x = gf.randn(4, requires_grad=True)
    with saved_tensors_hooks(outer.pack, outer.unpack):
        with saved_tensors_hooks(inner.pack, inner.unpack):
            a = x.sin()
        b = a.cos()
    (b.sum()).backward()
    assert inner.packed == 1
    assert outer.packed == 1
    assert inner.unpacked == 1
    assert outer.unpacked == 1


def test_records_outside_block_unpacked():
    hooks = _HostCopy()
    x = gf.randn(4, requires_grad=True)
    with saved_tensors_hooks(hooks.pack, hooks.unpack):
        pass
    x.sin().sum().backward()
    assert hooks.packed == 0
    assert hooks.unpacked == 0


def test_unpack_after_block_ends():
    hooks = _HostCopy()
    x = gf.randn(4, requires_grad=True)
    with saved_tensors_hooks(hooks.pack, hooks.unpack):
        y = x.sin()
    y.sum().backward()
    assert hooks.unpacked == 1
    assert np.array_equal(x.grad.numpy(), np.cos(x.detach().numpy()))


def test_hooks_create_graph_bitwise():
    results = []
    for hooks in (None, _HostCopy()):
        gf.manual_seed(1)
        x = gf.randn(5, dtype=gf.float64, requires_grad=True)
        w = gf.randn(5, dtype=gf.float64, requires_grad=True)
        if hooks is None:
            y = (x * w).tanh().sum()
        else:
            with saved_tensors_hooks(hooks.pack, hooks.unpack):
                y = (x * w).tanh().sum()
        (gx,) = gf.grad(y, [x], create_graph=True)
        (gx * gx).sum().backward()
        results.append((x.grad.numpy().copy(), w.grad.numpy().copy()))
    assert np.array_equal(results[0][0], results[1][0])
    assert np.array_equal(results[0][1], results[1][1])


def test_leaf_input_keeps_gradient_path():
    x = gf.randn(4, dtype=gf.float64, requires_grad=True)
    with saved_tensors_hooks(lambda t: t.detach().numpy().copy(), gf.tensor):
        y = (x * x).sum()
    (gx,) = gf.grad(y, [x], create_graph=True)
    (gxx,) = gf.grad(gx.sum(), [x])
    assert np.array_equal(gx.detach().numpy(), 2 * x.detach().numpy())
    assert np.array_equal(gxx.numpy(), np.full(4, 2.0))


def test_inplace_change_still_detected():
    x = gf.randn(4, requires_grad=True)
    h = x * 1.0
    with saved_tensors_hooks(lambda t: t, lambda t: t):
        y = h.sin()
    with gf.no_grad():
        h += 1
    with pytest.raises(gf.InplaceModificationError):
        y.sum().backward()


def test_unpack_must_return_tensor():
    x = gf.randn(4, requires_grad=True)
    with saved_tensors_hooks(lambda t: t.detach().numpy(), lambda a: a):
        y = x.sin()
    with pytest.raises(TypeError, match="unpack_hook must return a Tensor"):
        y.sum().backward()


def test_hooks_must_be_callable():
    with pytest.raises(TypeError, match="pack_hook must be callable"):
        saved_tensors_hooks(None, lambda t: t)
    with pytest.raises(TypeError, match="unpack_hook must be callable"):
        saved_tensors_hooks(lambda t: t, "unpack")


def test_ledger_counts_packed_arrays():
    x = gf.randn(64, requires_grad=True)
    h = x * 2.0
    with gf.memory.Ledger() as ledger:
        with saved_tensors_hooks(lambda t: t, lambda t: t):
            as_is = h.sin()
    assert ledger.activation_bytes == 64 * 4
    with gf.memory.Ledger() as ledger:
        with saved_tensors_hooks(lambda t: t.detach().numpy().tobytes(),
                                 lambda b: gf.tensor(np.frombuffer(b, np.float32))):
            moved = h.sin()
    # The bytes object is not an array, so nothing is counted for it.
    assert ledger.activation_bytes == 0
    assert as_is.shape == moved.shape


def _doubled(module):
    # Packs twice the saved value, so the gradients show whose content the
    # backward read.
    return module.autograd.graph.saved_tensors_hooks(
        lambda t: t.detach() * 2, lambda t: t)


_LEAF_LOSSES = {
    "mul_saves_leaves": lambda x, w: (x * x * w).sum(),
    "tanh_saves_output": lambda x, w: (x * w).tanh().sum(),
    "sin_saves_leaf": lambda x, w: (x.sin() * w).sum(),
}


def _leaf_grads_under_hooks(module, loss, create_graph):
    x = module.tensor([0.5, -1.0, 2.0], dtype=module.float64, requires_grad=True)
    w = module.tensor([1.5, 0.3, -0.7], dtype=module.float64, requires_grad=True)
    with _doubled(module):
        y = loss(x, w)
    grad = gf.grad if module is gf else module.autograd.grad
    gx, gw = grad(y, [x, w], create_graph=create_graph)
    result = [gx.detach().numpy().copy(), gw.detach().numpy().copy()]
    if create_graph:
        (gx * gx).sum().backward()
        result += [x.grad.numpy().copy(), w.grad.numpy().copy()]
    return result


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("name", sorted(_LEAF_LOSSES))
def test_unpacked_leaf_content_matches_torch(name, create_graph):
    torch = pytest.importorskip("torch")
    loss = _LEAF_LOSSES[name]
    expected = _leaf_grads_under_hooks(torch, loss, create_graph)
    actual = _leaf_grads_under_hooks(gf, loss, create_graph)
    assert len(actual) == len(expected)
    for e, a in zip(expected, actual):
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-12)


def test_unpacked_leaf_content_example():
    x = gf.tensor([1.0, 2.0, 3.0], requires_grad=True)
    with _doubled(gf):
        y = (x * x).sum()
    (gx,) = gf.grad(y, [x], create_graph=True)
    assert np.array_equal(gx.detach().numpy(), [4.0, 8.0, 12.0])
    (gxx,) = gf.grad(gx.sum(), [x])
    # The unpacked content passes its gradient to x unchanged.
    assert np.array_equal(gxx.numpy(), [2.0, 2.0, 2.0])


def test_unpacked_leaf_itself_returned():
    x = gf.randn(4, requires_grad=True)
    with _packing_as_is([]):
        y = x.sin()
    (saved,) = y.grad_fn.saved_tensors
    assert saved is x


def test_checkpoint_input_content_matches_torch():
    torch = pytest.importorskip("torch")
    from torch.utils import checkpoint as torch_checkpoint

    values = [0.5, -1.0, 2.0]
    xt = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    with _doubled(torch):
        yt = torch_checkpoint.checkpoint(lambda u: u.sin().sum(), xt,
                                         use_reentrant=True)
    yt.backward()
    x = gf.tensor(values, dtype=gf.float64, requires_grad=True)
    with _doubled(gf):
        y = gf.checkpoint(lambda u: u.sin().sum(), x)
    y.backward()
    np.testing.assert_allclose(x.grad.numpy(), xt.grad.numpy(), rtol=1e-12)
