"""Embedding lookup, function and layer."""

import numpy as np
import pytest

import gradflow as gf
from conftest import to_host
from gradflow.nn._embedding import Embedding, embedding


def test_embedding_matches_torch(device):
    torch = pytest.importorskip("torch")
    layer = Embedding(6, 3, padding_idx=4).double().to(device)
    reference = torch.nn.Embedding(6, 3, padding_idx=4).double()
    with torch.no_grad():
        reference.weight.copy_(torch.tensor(to_host(layer.weight.detach())))
    indices = np.array([[0, 4, 1], [1, 1, 5]])
    grad_out = np.random.default_rng(8).standard_normal((2, 3, 3))
    out = layer(gf.tensor(indices, device=device))
    out.backward(gf.tensor(grad_out, device=device))
    expected = reference(torch.tensor(indices))
    expected.backward(torch.tensor(grad_out))
    np.testing.assert_allclose(to_host(out.detach()), expected.detach().numpy())
    np.testing.assert_allclose(to_host(layer.weight.grad),
                               reference.weight.grad.numpy(), atol=1e-12)


def test_embedding_repeated_index_accumulates(device):
    weight = gf.randn(4, 2, device=device, requires_grad=True)
    embedding(gf.tensor([1, 1, 1, 2], device=device), weight).sum().backward()
    np.testing.assert_allclose(to_host(weight.grad)[:, 0], [0, 3, 1, 0])


def test_embedding_padding_row_starts_zero():
    layer = Embedding(5, 3, padding_idx=2)
    np.testing.assert_array_equal(to_host(layer.weight.detach())[2], [0, 0, 0])


def test_embedding_padding_row_gets_no_grad(device):
    layer = Embedding(5, 3, padding_idx=-1).to(device)
    layer(gf.tensor([4, 4, 0], device=device)).sum().backward()
    assert layer.padding_idx == 4
    np.testing.assert_array_equal(to_host(layer.weight.grad)[4], [0, 0, 0])
    np.testing.assert_array_equal(to_host(layer.weight.grad)[0], [1, 1, 1])


def test_embedding_init_is_standard_normal():
    weight = to_host(Embedding(4000, 8).weight.detach())
    assert abs(weight.mean()) < 0.02
    assert abs(weight.std() - 1) < 0.02


def test_embedding_gradcheck(device):
    weight = gf.randn(5, 2, dtype=gf.float64, device=device, requires_grad=True)
    indices = gf.tensor([[1, 3], [3, 0]], device=device)
    assert gf.gradcheck(lambda w: embedding(indices, w), weight)


def test_embedding_second_order_gradcheck(device):
    weight = gf.randn(4, 2, dtype=gf.float64, device=device, requires_grad=True)
    indices = gf.tensor([1, 1, 2], device=device)

    def weight_grad_sum(w):
        loss = (embedding(indices, w, padding_idx=2) ** 3).sum()
        (grad,) = gf.grad(loss, [w], create_graph=True)
        return grad.sum()

    assert gf.gradcheck(weight_grad_sum, weight)


def test_embedding_from_pretrained_freezes():
    table = gf.randn(3, 2)
    layer = Embedding.from_pretrained(table)
    assert not layer.weight.requires_grad
    np.testing.assert_array_equal(to_host(layer(gf.tensor([2]))), to_host(table)[2:])


def test_embedding_from_pretrained_trainable():
    layer = Embedding.from_pretrained(gf.randn(3, 2), freeze=False)
    assert layer.weight.requires_grad


@pytest.mark.parametrize("indices, error, words", [
    ([0, 6], IndexError, "index 6 is out of range"),
    ([-1], IndexError, "index -1 is out of range"),
    ([1.0], TypeError, "integer tensor"),
])
def test_embedding_rejects_indices(indices, error, words):
    with pytest.raises(error) as info:
        Embedding(6, 2)(gf.tensor(indices))
    assert words in str(info.value)


@pytest.mark.parametrize("kwargs, error", [
    ({"padding_idx": 6}, ValueError),
    ({"max_norm": 1.0}, NotImplementedError),
    ({"sparse": True}, NotImplementedError),
])
def test_embedding_layer_rejects(kwargs, error):
    with pytest.raises(error):
        Embedding(6, 2, **kwargs)


def test_embedding_repr():
    assert repr(Embedding(10, 3, padding_idx=0)) == "Embedding(10, 3, padding_idx=0)"
