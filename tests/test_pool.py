"""Max, average and adaptive average pooling, functions and layers."""

import numpy as np
import pytest

import gradflow as gf
from conftest import assert_matches_torch, to_host
from gradflow.nn._pool import (
    AdaptiveAvgPool2d, AvgPool2d, MaxPool2d, adaptive_avg_pool2d, avg_pool2d,
    max_pool2d,
)

MAX_CASES = [
    {"kernel_size": 2},
    {"kernel_size": 3, "stride": 2, "padding": 1},
    {"kernel_size": (3, 2), "stride": (1, 2), "padding": (1, 1), "dilation": (2, 1)},
    {"kernel_size": 3, "stride": 2, "ceil_mode": True},
    {"kernel_size": 2, "stride": 2, "padding": 1, "ceil_mode": True},
]

AVG_CASES = [
    {"kernel_size": 2},
    {"kernel_size": 3, "stride": 2, "padding": 1},
    {"kernel_size": 3, "stride": 2, "padding": 1, "count_include_pad": False},
    {"kernel_size": 3, "stride": 2, "ceil_mode": True},
    {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True},
    {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True,
     "count_include_pad": False},
    {"kernel_size": 2, "divisor_override": 3},
]

ADAPTIVE_SIZES = [1, (2, 3), (3, None), (5, 7), (7, 8)]


def _compare_with_torch(gf_fn, torch_fn, shape, device):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape)
    assert_matches_torch(gf_fn, torch_fn, x, rng.standard_normal, device, atol=1e-12)


@pytest.mark.parametrize("kwargs", MAX_CASES)
def test_max_pool2d_matches_torch(device, kwargs):
    torch = pytest.importorskip("torch")
    _compare_with_torch(lambda x: max_pool2d(x, **kwargs),
                        lambda x: torch.nn.functional.max_pool2d(x, **kwargs),
                        (2, 3, 7, 8), device)


@pytest.mark.parametrize("kwargs", AVG_CASES)
def test_avg_pool2d_matches_torch(device, kwargs):
    torch = pytest.importorskip("torch")
    _compare_with_torch(lambda x: avg_pool2d(x, **kwargs),
                        lambda x: torch.nn.functional.avg_pool2d(x, **kwargs),
                        (2, 3, 7, 8), device)


@pytest.mark.parametrize("size", ADAPTIVE_SIZES)
def test_adaptive_avg_pool2d_matches_torch(device, size):
    torch = pytest.importorskip("torch")
    _compare_with_torch(
        lambda x: adaptive_avg_pool2d(x, size),
        lambda x: torch.nn.functional.adaptive_avg_pool2d(x, size),
        (2, 3, 7, 8), device,
    )


def test_max_pool2d_indices_match_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(4).standard_normal((2, 2, 6, 5))
    _, indices = max_pool2d(gf.tensor(x), 3, 2, 1, return_indices=True)
    _, expected = torch.nn.functional.max_pool2d(torch.tensor(x), 3, 2, 1,
                                                 return_indices=True)
    np.testing.assert_array_equal(to_host(indices), expected.numpy())


def test_max_pool2d_indices_need_no_grad():
    x = gf.randn(1, 1, 4, 4, requires_grad=True)
    _, indices = max_pool2d(x, 2, return_indices=True)
    assert not indices.requires_grad


def test_max_pool2d_tie_goes_to_first(device):
    x = gf.ones(1, 1, 2, 2, device=device, requires_grad=True)
    max_pool2d(x, 2).sum().backward()
    np.testing.assert_array_equal(to_host(x.grad)[0, 0], [[1, 0], [0, 0]])


def test_max_pool2d_gradcheck(device):
    x = gf.randn(1, 2, 5, 5, dtype=gf.float64, device=device, requires_grad=True)
    assert gf.gradcheck(lambda t: max_pool2d(t, 3, 2, 1), x)


def test_max_pool2d_second_order_gradcheck(device):
    x = gf.randn(1, 1, 4, 4, dtype=gf.float64, device=device, requires_grad=True)

    def input_grad_sum(t):
        (grad,) = gf.grad(max_pool2d(t, 2).square().sum(), [t], create_graph=True)
        return grad.sum()

    assert gf.gradcheck(input_grad_sum, x)


def test_avg_pool2d_gradcheck(device):
    x = gf.randn(1, 2, 5, 5, dtype=gf.float64, device=device, requires_grad=True)
    assert gf.gradcheck(
        lambda t: avg_pool2d(t, 3, 2, 1, ceil_mode=True, count_include_pad=False), x
    )


def test_adaptive_avg_pool2d_gradcheck(device):
    x = gf.randn(1, 2, 5, 4, dtype=gf.float64, device=device, requires_grad=True)
    assert gf.gradcheck(lambda t: adaptive_avg_pool2d(t, (3, 3)), x)


@pytest.mark.parametrize("pool", [
    lambda x: max_pool2d(x, 2), lambda x: avg_pool2d(x, 2),
    lambda x: adaptive_avg_pool2d(x, 2),
])
def test_pool_unbatched_matches_batched(device, pool):
    x = gf.randn(3, 6, 6, device=device)
    np.testing.assert_allclose(to_host(pool(x)), to_host(pool(x.unsqueeze(0))[0]))


def test_pool_keeps_float32(device):
    out = avg_pool2d(gf.randn(1, 1, 4, 4, device=device), 2)
    assert out.dtype == gf.float32


@pytest.mark.parametrize("call, error, words", [
    (lambda: max_pool2d(gf.randn(4, 4), 2), ValueError, "(N, C, H, W)"),
    (lambda: max_pool2d(gf.randn(1, 1, 4, 4), 2, padding=2), ValueError,
     "at most half"),
    (lambda: max_pool2d(gf.randn(1, 1, 2, 2), 3), ValueError, "kernel spans 3"),
    (lambda: avg_pool2d(gf.randn(1, 1, 4, 4), 0), ValueError, "positive"),
    (lambda: avg_pool2d(gf.ones(1, 1, 4, 4, dtype=gf.int64), 2), TypeError,
     "floating"),
    (lambda: avg_pool2d(gf.randn(1, 1, 4, 4), 2, divisor_override=0), ValueError,
     "non-zero"),
    (lambda: adaptive_avg_pool2d(gf.randn(1, 1, 4, 4), 0), ValueError,
     "positive"),
])
def test_pool_rejects(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value)


def test_max_pool_layer_default_stride():
    layer = MaxPool2d(3)
    assert layer.stride == 3
    assert layer(gf.randn(1, 1, 9, 9)).shape == (1, 1, 3, 3)


def test_avg_pool_layer_forward():
    layer = AvgPool2d(2, stride=1, padding=1, count_include_pad=False)
    out = layer(gf.ones(1, 1, 3, 3))
    np.testing.assert_allclose(to_host(out), np.ones((1, 1, 4, 4)))


def test_adaptive_pool_layer_forward():
    layer = AdaptiveAvgPool2d((1, None))
    assert layer(gf.randn(2, 3, 5, 4)).shape == (2, 3, 1, 4)
