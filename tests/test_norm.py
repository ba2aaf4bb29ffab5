"""Batch norm and layer norm, functions and layers."""

import numpy as np
import pytest

import gradflow as gf
from conftest import assert_matches_torch, to_host
from gradflow.nn._norm import (
    BatchNorm1d, BatchNorm2d, LayerNorm, batch_norm, layer_norm,
)

BATCH_NORM_CASES = [
    ("BatchNorm1d", (6, 3)),
    ("BatchNorm1d", (4, 3, 5)),
    ("BatchNorm2d", (4, 3, 3, 2)),
]

LAYERS = {"BatchNorm1d": BatchNorm1d, "BatchNorm2d": BatchNorm2d}


def _assert_state_matches(layer, reference):
    for (name, param), (_, expected) in zip(layer.named_parameters(),
                                            reference.named_parameters()):
        np.testing.assert_allclose(to_host(param.grad), expected.grad.numpy(),
                                   atol=1e-10, err_msg=f"gradient of {name}")
    for (name, buffer), (_, expected) in zip(layer.named_buffers(),
                                             reference.named_buffers()):
        np.testing.assert_allclose(to_host(buffer), expected.numpy(), atol=1e-12,
                                   err_msg=f"buffer {name}")


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("name, shape", BATCH_NORM_CASES)
def test_batch_norm_matches_torch(device, name, shape, momentum):
    torch = pytest.importorskip("torch")
    layer = LAYERS[name](3, momentum=momentum).double().to(device)
    reference = getattr(torch.nn, name)(3, momentum=momentum).double()
    rng = np.random.default_rng(5)
    for training in (True, True, True, False):
        layer.train(training)
        reference.train(training)
        layer.zero_grad()
        reference.zero_grad()
        x = rng.standard_normal(shape) * 2 + 1
        assert_matches_torch(layer, reference, x, rng.standard_normal(shape), device,
                             atol=1e-10)
        _assert_state_matches(layer, reference)


def test_batch_norm_without_running_stats_matches_torch(device):
    torch = pytest.importorskip("torch")
    layer = BatchNorm2d(3, affine=False, track_running_stats=False).double()
    reference = torch.nn.BatchNorm2d(3, affine=False, track_running_stats=False)
    layer.eval()
    reference.double().eval()
    rng = np.random.default_rng(6)
    shape = (2, 3, 4, 4)
    assert_matches_torch(layer.to(device), reference, rng.standard_normal(shape),
                         rng.standard_normal(shape), device, atol=1e-10)
    assert layer.running_mean is None


def test_layer_norm_matches_torch(device):
    torch = pytest.importorskip("torch")
    layer = LayerNorm((3, 4)).double().to(device)
    reference = torch.nn.LayerNorm((3, 4)).double()
    rng = np.random.default_rng(7)
    with torch.no_grad():
        reference.weight.copy_(torch.tensor(rng.standard_normal((3, 4))))
    layer.weight.data[...] = layer.weight.device.xp.asarray(
        reference.weight.detach().numpy())
    assert_matches_torch(layer, reference, rng.standard_normal((2, 3, 4)),
                         rng.standard_normal((2, 3, 4)), device, atol=1e-10)
    _assert_state_matches(layer, reference)


def test_layer_norm_without_bias():
    layer = LayerNorm(5, bias=False)
    assert layer.bias is None
    assert layer.weight.shape == (5,)


def test_batch_norm_gradcheck(device):
    options = {"dtype": gf.float64, "device": device, "requires_grad": True}
    x, weight, bias = gf.randn(4, 3, 2, **options), gf.randn(3, **options), \
        gf.randn(3, **options)
    assert gf.gradcheck(
        lambda x, w, b: batch_norm(x, None, None, w, b, training=True),
        [x, weight, bias],
    )


def test_batch_norm_eval_gradcheck(device):
    options = {"dtype": gf.float64, "device": device}
    x = gf.randn(4, 3, requires_grad=True, **options)
    mean, var = gf.randn(3, **options), gf.rand(3, **options) + 0.5
    assert gf.gradcheck(lambda x: batch_norm(x, mean, var), x)


def test_layer_norm_gradcheck(device):
    options = {"dtype": gf.float64, "device": device, "requires_grad": True}
    x, weight, bias = gf.randn(2, 3, 4, **options), gf.randn(4, **options), \
        gf.randn(4, **options)
    assert gf.gradcheck(lambda x, w, b: layer_norm(x, 4, w, b), [x, weight, bias])


def test_batch_norm_counts_batches():
    layer = BatchNorm1d(2)
    for _ in range(3):
        layer(gf.randn(4, 2))
    layer.eval()
    layer(gf.randn(4, 2))
    assert int(layer.num_batches_tracked.item()) == 3


def test_batch_norm_state_dict_keys():
    keys = list(BatchNorm2d(2).state_dict())
    assert keys == ["weight", "bias", "running_mean", "running_var",
                    "num_batches_tracked"]


def test_batch_norm_checkpoint_updates_once():
    from gradflow.checkpoint import checkpoint

    plain, checkpointed = BatchNorm1d(3), BatchNorm1d(3)
    x = gf.randn(5, 3)
    plain(x).square().sum().backward()
    weight = checkpointed.weight
    checkpoint(checkpointed, x).square().sum().backward()
    assert int(checkpointed.num_batches_tracked.item()) == 1
    np.testing.assert_allclose(to_host(checkpointed.running_mean),
                               to_host(plain.running_mean), atol=1e-7)
    np.testing.assert_allclose(to_host(checkpointed.running_var),
                               to_host(plain.running_var), atol=1e-7)
    np.testing.assert_allclose(to_host(weight.grad), to_host(plain.weight.grad),
                               atol=1e-5)


def test_batch_norm_reset_running_stats():
    layer = BatchNorm1d(2)
    layer(gf.randn(4, 2) + 3)
    layer.reset_running_stats()
    np.testing.assert_array_equal(to_host(layer.running_mean), [0, 0])
    np.testing.assert_array_equal(to_host(layer.running_var), [1, 1])
    assert int(layer.num_batches_tracked.item()) == 0


@pytest.mark.parametrize("call, error, words", [
    (lambda: BatchNorm1d(3)(gf.randn(1, 3)), ValueError, "more than one value"),
    (lambda: BatchNorm1d(3)(gf.randn(2, 3, 4, 4)), ValueError, "rank 2 or 3"),
    (lambda: BatchNorm2d(3)(gf.randn(2, 4, 4, 4)), ValueError,
     "num_features=3"),
    (lambda: BatchNorm1d(0), ValueError, "positive"),
    (lambda: batch_norm(gf.randn(2, 3), None, None), ValueError, "required"),
    (lambda: layer_norm(gf.randn(2, 3), (4,)), ValueError, "last axes"),
    (lambda: LayerNorm((2, 0)), ValueError, "positive"),
])
def test_norm_rejects(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value)
