"""The extension API: gf.autograd.Function, its Context, and once_differentiable."""

import numpy as np
import pytest

import gradflow as gf
from gradflow import _fastpath
from conftest import to_host
from gradflow.errors import GraphError


def _leaf(values, device):
    return gf.tensor(values, dtype=gf.float64, device=device, requires_grad=True)


class Cube(gf.autograd.Function):
    """x ** 3, written against ctx.xp so it serves first and second order."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x * x * grad


class ScaledSum(gf.autograd.Function):
    """a * scale + b, with a non-Tensor argument between the two Tensors."""

    @staticmethod
    def forward(ctx, a, scale, b):
        ctx.scale = scale
        ctx.seen_needs = ctx.needs_input_grad
        return a * scale + b

    @staticmethod
    def backward(ctx, grad):
        need_a, _, need_b = ctx.needs_input_grad
        return (grad * ctx.scale if need_a else None), None, (grad if need_b else None)


class SortValues(gf.autograd.Function):
    """Sorted values plus their (non-differentiable) positions."""

    @staticmethod
    def forward(ctx, x):
        order = x.argsort()
        ctx.order = order
        ctx.mark_non_differentiable(order)
        return x[order], order

    @staticmethod
    def backward(ctx, grad_values, grad_order):
        out = ctx.xp.zeros(grad_values.shape, dtype=grad_values.dtype)
        out[ctx.order] = grad_values
        return out


class ArrayOnlyExp(gf.autograd.Function):
    """exp with a backward that works on arrays only."""

    @staticmethod
    def forward(ctx, x):
        xp = np if isinstance(x, np.ndarray) else gf.device("cuda").xp
        out = xp.exp(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    @gf.autograd.once_differentiable
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        assert not isinstance(grad, gf.Tensor)
        return grad * out


def test_forward_receives_arrays(device):
    seen = []

    class Probe(gf.autograd.Function):
        @staticmethod
        def forward(ctx, x, factor):
            seen.append((type(x), factor))
            return x * factor

        @staticmethod
        def backward(ctx, grad):
            return grad, None

    x = _leaf([1.0], device)
    Probe.apply(x, 2.0)
    assert seen[0][0] is type(x.data)
    assert seen[0][1] == 2.0


def test_custom_op_gradcheck(device):
    x = _leaf([0.5, -1.5, 2.0], device)
    assert gf.gradcheck(Cube.apply, x)


def test_custom_op_second_order_gradcheck(device):
    x = _leaf([0.5, -1.5, 2.0], device)

    def first_derivative(t):
        (grad,) = gf.grad(Cube.apply(t).sum(), [t], create_graph=True)
        return grad

    assert gf.gradcheck(first_derivative, x)


def test_custom_op_output_records_function(device):
    y = Cube.apply(_leaf([2.0], device))
    assert y.grad_fn.function is Cube
    assert y.grad_fn.name == "Cube"


def test_custom_op_without_grad_records_nothing(device):
    y = Cube.apply(gf.tensor([2.0], device=device))
    assert y.grad_fn is None
    assert y.item() == 8.0


def test_needs_input_grad_per_argument(device):
    a = _leaf([1.0, 2.0], device)
    b = gf.tensor([5.0, 5.0], dtype=gf.float64, device=device)
    out = ScaledSum.apply(a, 3.0, b)
    assert out.grad_fn.seen_needs == (True, False, False)
    out.sum().backward()
    np.testing.assert_array_equal(to_host(a.grad), [3.0, 3.0])
    assert b.grad is None


def test_non_tensor_argument_gradcheck(device):
    a = _leaf([1.0, 2.0], device)
    b = _leaf([0.5, 0.25], device)
    assert gf.gradcheck(lambda x, y: ScaledSum.apply(x, 3.0, y), [a, b])


def test_mark_non_differentiable_output(device):
    x = _leaf([3.0, 1.0, 2.0], device)
    values, order = SortValues.apply(x)
    assert values.requires_grad
    assert not order.requires_grad
    assert order.grad_fn is None
    np.testing.assert_array_equal(to_host(order), [1, 2, 0])


@pytest.mark.parametrize("fast", [True, False])
def test_mark_non_differentiable_not_kept(fast):
    # apply reads the marked arrays and then drops them, so the record
    # keeps no reference to the output array it names.
    with _fastpath.enabled(fast):
        values, _ = SortValues.apply(_leaf([3.0, 1.0, 2.0], gf.device("cpu")))
    record = values.grad_fn
    assert "_non_diff" not in vars(record)
    assert record._non_diff is None


def test_mark_non_differentiable_backward(device):
    x = _leaf([3.0, 1.0, 2.0], device)
    values, _ = SortValues.apply(x)
    (values * gf.tensor([1.0, 10.0, 100.0], dtype=gf.float64, device=device)).sum() \
        .backward()
    np.testing.assert_array_equal(to_host(x.grad), [100.0, 1.0, 10.0])


def test_once_differentiable_first_order(device):
    x = _leaf([0.0, 1.0], device)
    ArrayOnlyExp.apply(x).sum().backward()
    np.testing.assert_allclose(to_host(x.grad), np.exp([0.0, 1.0]))


def test_once_differentiable_under_create_graph(device):
    x = _leaf([0.0, 1.0], device)
    (grad,) = gf.grad(ArrayOnlyExp.apply(x).sum(), [x], create_graph=True)
    np.testing.assert_allclose(to_host(grad), np.exp([0.0, 1.0]))
    assert grad.grad_fn is None


def test_wrong_number_of_gradients_raises(device):
    class TwoGrads(gf.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * 2, grad

    x = _leaf([1.0], device)
    with pytest.raises(GraphError, match=r"'TwoGrads' returned 2 gradient\(s\)"):
        TwoGrads.apply(x).sum().backward()


def test_saved_tensors_after_backward_raises(device):
    x = _leaf([1.0], device)
    y = Cube.apply(x)
    record = y.grad_fn
    y.sum().backward()
    with pytest.raises(gf.GraphFreedError, match="retain_graph=True"):
        record.saved_tensors


def test_saved_input_changed_in_place_raises(device):
    x = _leaf([1.0, 2.0], device)
    hidden = x * 1
    y = Cube.apply(hidden)
    hidden += 1
    with pytest.raises(gf.InplaceModificationError, match="'Cube'"):
        y.sum().backward()


def test_missing_forward_raises():
    class Empty(gf.autograd.Function):
        pass

    with pytest.raises(NotImplementedError, match="forward"):
        Empty.apply(gf.tensor([1.0]))


def test_custom_op_mixed_devices_raise(device):
    if device.type == "cpu":
        pytest.skip("needs a CUDA device to mix with the CPU")
    a = _leaf([1.0], device)
    b = _leaf([1.0], "cpu")
    with pytest.raises(RuntimeError, match="ScaledSum: expected all tensors"):
        ScaledSum.apply(a, 1.0, b)


class SavedKinds(gf.autograd.Function):
    """x * 2, recording the type of what ``ctx.saved_tensors`` returns."""

    @staticmethod
    def forward(ctx, x, kinds):
        ctx.kinds = kinds
        ctx.save_for_backward(x)
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        ctx.kinds.append(type(x))
        return grad * 2 + x * 0, None


def test_saved_tensors_are_arrays_in_plain_backward(device):
    kinds = []
    x = _leaf([1.0], device)
    SavedKinds.apply(x, kinds).sum().backward()
    assert kinds == [type(x.data)]


def test_saved_tensors_are_tensors_under_create_graph(device):
    kinds = []
    x = _leaf([1.0], device)
    gf.grad(SavedKinds.apply(x, kinds).sum(), [x], create_graph=True)
    assert kinds == [gf.Tensor]
