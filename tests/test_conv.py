"""conv2d / conv1d and the Conv2d / Conv1d layers."""

import math

import numpy as np
import pytest

import gradflow as gf
from conftest import to_host
from gradflow.nn._conv import conv1d, conv2d, Conv1d, Conv2d

# (input shape, weight shape, stride, padding, dilation, groups)
CONV2D_CASES = [
    ((2, 3, 7, 6), (4, 3, 3, 3), 1, 0, 1, 1),
    ((2, 4, 7, 6), (6, 2, 3, 2), 1, 1, 1, 2),
    ((2, 3, 9, 8), (4, 3, 3, 3), 2, (1, 2), 2, 1),
    ((1, 2, 6, 5), (2, 2, 4, 3), 1, "same", (2, 1), 1),
    ((2, 2, 6, 6), (4, 1, 2, 2), (2, 1), "valid", 1, 2),
]

CONV1D_CASES = [
    ((2, 3, 10), (4, 3, 3), 1, 0, 1, 1),
    ((2, 4, 11), (4, 1, 3), 2, 2, 2, 4),
    ((1, 2, 9), (3, 2, 4), 1, "same", 1, 1),
]


def _random_operands(rng, x_shape, w_shape, device):
    arrays = [rng.standard_normal(s) for s in (x_shape, w_shape, w_shape[:1])]
    tensors = [gf.tensor(a, device=device, requires_grad=True) for a in arrays]
    return arrays, tensors


def _compare_with_torch(gf_fn, torch_fn, x_shape, w_shape, device):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    arrays, tensors = _random_operands(rng, x_shape, w_shape, device)
    out = gf_fn(*tensors)
    grad_out = rng.standard_normal(out.shape)
    out.backward(gf.tensor(grad_out, device=device))
    expected_inputs = [torch.tensor(a, requires_grad=True) for a in arrays]
    expected = torch_fn(*expected_inputs)
    expected.backward(torch.tensor(grad_out))
    np.testing.assert_allclose(to_host(out.detach()), expected.detach().numpy(),
                               atol=1e-12)
    for name, t, e in zip(("input", "weight", "bias"), tensors, expected_inputs):
        np.testing.assert_allclose(to_host(t.grad), e.grad.numpy(), atol=1e-12,
                                   err_msg=f"gradient of {name}")


@pytest.mark.parametrize("x_shape, w_shape, stride, padding, dilation, groups",
                         CONV2D_CASES)
def test_conv2d_matches_torch(device, x_shape, w_shape, stride, padding,
                              dilation, groups):
    torch = pytest.importorskip("torch")
    _compare_with_torch(
        lambda x, w, b: conv2d(x, w, b, stride, padding, dilation, groups),
        lambda x, w, b: torch.nn.functional.conv2d(x, w, b, stride, padding,
                                                   dilation, groups),
        x_shape, w_shape, device,
    )


# PyTorch warns that it copies the input for 'same' with an even kernel.
@pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")
@pytest.mark.parametrize("x_shape, w_shape, stride, padding, dilation, groups",
                         CONV1D_CASES)
def test_conv1d_matches_torch(device, x_shape, w_shape, stride, padding,
                              dilation, groups):
    torch = pytest.importorskip("torch")
    _compare_with_torch(
        lambda x, w, b: conv1d(x, w, b, stride, padding, dilation, groups),
        lambda x, w, b: torch.nn.functional.conv1d(x, w, b, stride, padding,
                                                   dilation, groups),
        x_shape, w_shape, device,
    )


@pytest.mark.parametrize("stride, padding, dilation, groups", [
    (1, 1, 1, 1), (2, (0, 1), (1, 2), 2), (1, "same", 1, 1),
])
def test_conv2d_gradcheck(device, stride, padding, dilation, groups):
    x = gf.randn(2, 2, 5, 4, dtype=gf.float64, device=device, requires_grad=True)
    w = gf.randn(2, 2 // groups, 2, 3, dtype=gf.float64, device=device,
                 requires_grad=True)
    b = gf.randn(2, dtype=gf.float64, device=device, requires_grad=True)
    assert gf.gradcheck(
        lambda x, w, b: conv2d(x, w, b, stride, padding, dilation, groups),
        [x, w, b],
    )


def test_conv1d_gradcheck(device):
    x = gf.randn(2, 2, 7, dtype=gf.float64, device=device, requires_grad=True)
    w = gf.randn(3, 2, 3, dtype=gf.float64, device=device, requires_grad=True)
    assert gf.gradcheck(lambda x, w: conv1d(x, w, stride=2, padding=1), [x, w])


def test_conv2d_second_order_gradcheck(device):
    x = gf.randn(1, 2, 4, 4, dtype=gf.float64, device=device, requires_grad=True)
    w = gf.randn(2, 2, 2, 2, dtype=gf.float64, device=device, requires_grad=True)

    def input_grad_sum(x, w):
        loss = conv2d(x, w, padding=1).square().sum()
        (grad_x,) = gf.grad(loss, [x], create_graph=True)
        return grad_x.sum()

    assert gf.gradcheck(input_grad_sum, [x, w])


def test_conv2d_same_even_kernel_shape(device):
    x = gf.randn(1, 1, 6, 5, device=device)
    out = conv2d(x, gf.randn(1, 1, 4, 2, device=device), padding="same")
    assert out.shape == (1, 1, 6, 5)


def test_conv2d_unbatched_matches_batched(device):
    x = gf.randn(2, 5, 5, device=device)
    w = gf.randn(3, 2, 3, 3, device=device)
    single = conv2d(x, w, padding=1)
    batched = conv2d(x.unsqueeze(0), w, padding=1)
    assert single.shape == (3, 5, 5)
    np.testing.assert_allclose(to_host(single), to_host(batched[0]), atol=1e-6)


def test_conv2d_float32_result(device):
    x = gf.randn(2, 3, 6, 6, device=device)
    out = conv2d(x, gf.randn(4, 3, 3, 3, device=device))
    assert out.dtype == gf.float32


@pytest.mark.parametrize("x_shape, w_shape, kwargs, error, words", [
    ((3, 8, 8, 1, 1), (2, 3, 3, 3), {}, ValueError, "(N, C, H, W)"),
    ((1, 4, 8, 8), (2, 3, 3, 3), {}, ValueError, "has 4 channels"),
    ((1, 4, 8, 8), (3, 2, 3, 3), {"groups": 2}, ValueError, "does not divide"),
    ((1, 3, 4, 4), (2, 3, 6, 3), {"padding": 0}, ValueError, "kernel spans 6"),
    ((1, 3, 8, 8), (2, 3, 3, 3), {"padding": "same", "stride": 2}, ValueError,
     "stride 1"),
    ((1, 3, 8, 8), (2, 3, 3, 3), {"padding": "full"}, ValueError, "'full'"),
    ((1, 3, 8, 8), (2, 3, 3, 3), {"stride": 0}, ValueError, "positive"),
    ((1, 3, 8, 8), (2, 3, 3, 3), {"padding": -1}, ValueError, "non-negative"),
])
def test_conv2d_rejects(x_shape, w_shape, kwargs, error, words):
    with pytest.raises(error) as info:
        conv2d(gf.randn(*x_shape), gf.randn(*w_shape), **kwargs)
    assert words in str(info.value)


def test_conv2d_rejects_bias_shape():
    with pytest.raises(ValueError, match=r"bias must have shape \(2,\)"):
        conv2d(gf.randn(1, 3, 5, 5), gf.randn(2, 3, 3, 3), gf.randn(3))


def test_conv2d_rejects_dtype_mismatch():
    with pytest.raises(TypeError, match="float64 and float32"):
        conv2d(gf.randn(1, 3, 5, 5, dtype=gf.float64), gf.randn(2, 3, 3, 3))


def test_conv2d_layer_shapes():
    layer = Conv2d(4, 6, (3, 2), groups=2, bias=False)
    assert layer.weight.shape == (6, 2, 3, 2)
    assert layer.bias is None
    assert [name for name, _ in layer.named_parameters()] == ["weight"]


def test_conv2d_layer_init_bound():
    layer = Conv2d(8, 16, 3)
    bound = 1 / math.sqrt(8 * 9)
    weight, bias = to_host(layer.weight.detach()), to_host(layer.bias.detach())
    assert np.abs(weight).max() <= bound
    assert np.abs(weight).max() > 0.9 * bound
    assert np.abs(bias).max() <= bound


def test_conv2d_layer_matches_torch(device):
    torch = pytest.importorskip("torch")
    layer = Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2).double()
    layer.to(device)
    reference = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2).double()
    with torch.no_grad():
        reference.weight.copy_(torch.tensor(to_host(layer.weight.detach())))
        reference.bias.copy_(torch.tensor(to_host(layer.bias.detach())))
    x = np.random.default_rng(2).standard_normal((2, 4, 7, 7))
    layer(gf.tensor(x, device=device)).sum().backward()
    expected = reference(torch.tensor(x))
    expected.sum().backward()
    np.testing.assert_allclose(to_host(layer.weight.grad),
                               reference.weight.grad.numpy(), atol=1e-12)
    np.testing.assert_allclose(to_host(layer.bias.grad),
                               reference.bias.grad.numpy(), atol=1e-12)


def test_conv1d_layer_forward(device):
    layer = Conv1d(3, 5, 4, padding="same").to(device)
    assert layer.weight.shape == (5, 3, 4)
    assert layer(gf.randn(2, 3, 9, device=device)).shape == (2, 5, 9)


def test_conv_layer_repr():
    text = repr(Conv2d(1, 8, 3, padding=1, bias=False))
    assert text == "Conv2d(1, 8, kernel_size=(3, 3), stride=(1, 1), " \
                   "padding=(1, 1), bias=False)"


@pytest.mark.parametrize("kwargs, error", [
    ({"groups": 3}, ValueError),
    ({"padding": "same", "stride": 2}, ValueError),
    ({"padding_mode": "reflect"}, NotImplementedError),
    ({"kernel_size": (3, 3, 3)}, ValueError),
])
def test_conv2d_layer_rejects(kwargs, error):
    arguments = {"in_channels": 4, "out_channels": 4, "kernel_size": 3, **kwargs}
    with pytest.raises(error):
        Conv2d(**arguments)


def test_conv2d_rejects_array_input():
    with pytest.raises(TypeError, match="input must be a Tensor"):
        conv2d(np.zeros((1, 3, 5, 5)), gf.randn(2, 3, 3, 3))
