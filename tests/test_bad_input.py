"""The catalogue of wrong uses: each raises a stated exception with a helpful message.

One table, one row per wrong use. Each row gives the call, the exception
type, and a regex that the message must match. The regex checks that the
message names the op and the offending shapes, dtypes or values, and, where
the fix is not obvious from that, what to do.
"""

import re

import numpy as np
import pytest

import gradflow as gf
from gradflow import nn

BINARY_OPS = ("add", "sub", "mul", "div", "pow", "maximum", "minimum")
SHAPES = r"\(2, 3\) and \(4, 5\)"
BROADCAST_HINT = r"cannot be broadcast together.*Reshape or unsqueeze"
NEEDS_CUDA = pytest.mark.skipif(
    not gf.cuda.is_available(), reason="needs a CUDA device"
)


def _leaf(*shape):
    return gf.randn(*shape, requires_grad=True)


# -- helpers for the rows that need a few statements -------------------------


def _backward_twice():
    x = _leaf(3)
    y = (x * x).sum()
    y.backward()
    y.backward()


def _modify_saved(change):
    x = _leaf(3)
    y = x * 2
    z = y * y  # 'Mul' saves y
    change(y)
    z.sum().backward()


def _iadd(t):
    t += 1


def _imul(t):
    t *= 2


def _setitem(t):
    t[0] = 5.0


def _linear_state(**changes):
    layer = nn.Linear(3, 2)
    state = dict(layer.state_dict())
    for key, value in changes.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    return layer, state


def _load_strict(**changes):
    layer, state = _linear_state(**changes)
    layer.load_state_dict(state)


def _load_loose(**changes):
    layer, state = _linear_state(**changes)
    layer.load_state_dict(state, strict=False)


# -- the catalogue ----------------------------------------------------------

CASES = [
    *(
        pytest.param(
            lambda op=op: getattr(gf, op)(_leaf(2, 3), gf.randn(4, 5)),
            ValueError, rf"^{op}: shapes {SHAPES} {BROADCAST_HINT}", id=f"{op}-shapes",
        )
        for op in BINARY_OPS
    ),
    pytest.param(
        lambda: _leaf(2, 3) + gf.randn(4, 5), ValueError,
        rf"^add: shapes {SHAPES} {BROADCAST_HINT}", id="operator-plus-shapes",
    ),
    pytest.param(
        lambda: gf.where(gf.ones(2, 3) > 0, _leaf(2, 3), gf.randn(4, 5)), ValueError,
        rf"^where: shapes {SHAPES} {BROADCAST_HINT}", id="where-shapes",
    ),
    pytest.param(
        lambda: gf.randn(2, 3) < gf.randn(4, 5), ValueError,
        rf"^less: shapes {SHAPES} {BROADCAST_HINT}", id="compare-shapes",
    ),
    pytest.param(
        lambda: _leaf(2, 3) @ gf.randn(4, 5), ValueError,
        rf"^matmul: shapes {SHAPES} are not aligned.*last axis of the first \(3\)"
        r".*second-to-last axis of the second \(4\)", id="matmul-shapes",
    ),
    pytest.param(
        lambda: _leaf(2, 3) @ gf.tensor(2.0), ValueError,
        r"^matmul: both operands need at least one dimension.*\(2, 3\) and \(\)"
        r".*use \* for scalars", id="matmul-0d",
    ),
    pytest.param(
        lambda: gf.cat([_leaf(2, 3), gf.randn(2, 4)], axis=0), ValueError,
        r"^cat: tensor 1 has shape \(2, 4\).*tensor 0's shape \(2, 3\) outside axis 0",
        id="cat-shapes",
    ),
    pytest.param(
        lambda: gf.reshape(_leaf(2, 3), 4), ValueError,
        r"^reshape: .*\(2, 3\).*\(4,\)", id="reshape-size",
    ),
    *(
        pytest.param(
            lambda op=op: getattr(gf, op)(gf.arange(4)), TypeError,
            rf"^{op}: expected a floating-point tensor, got dtype int64 "
            r"\(shape \(4,\)\)"
            r".*\.float\(\) or \.double\(\)", id=f"{op}-int",
        )
        for op in ("exp", "log", "sqrt", "tanh", "sigmoid", "relu", "mean")
    ),
    pytest.param(
        lambda: gf.tensor([1, 2], requires_grad=True), TypeError,
        r"requires_grad=True needs a floating-point tensor.*dtype int64.*float",
        id="int-requires-grad",
    ),
    pytest.param(
        lambda: setattr(gf.arange(3), "requires_grad", True), TypeError,
        r"requires_grad=True needs a floating-point tensor.*dtype int64",
        id="int-requires-grad-setter",
    ),
    *(
        pytest.param(
            lambda op=op: getattr(gf, op)(_leaf(2, 3), axis=2), IndexError,
            rf"^{op}: axis 2 is out of range for a tensor with 2 dimension\(s\) "
            r"\(valid: -2 to 1\)", id=f"{op}-axis",
        )
        for op in ("sum", "mean", "var", "amax", "logsumexp", "argmax")
    ),
    pytest.param(
        lambda: gf.sum(_leaf(2, 3), axis=(0, -3)), IndexError,
        r"^sum: axis -3 is out of range", id="sum-axis-tuple",
    ),
    pytest.param(
        lambda: gf.cat([_leaf(2, 3), _leaf(2, 3)], axis=2), IndexError,
        r"^cat: axis 2 is out of range", id="cat-axis",
    ),
    pytest.param(
        lambda: gf.squeeze(_leaf(2, 3), 4), IndexError,
        r"^squeeze: axis 4 is out of range", id="squeeze-axis",
    ),
    pytest.param(
        lambda: nn.functional.softmax(_leaf(2, 3), dim=2), IndexError,
        r"softmax.*axis 2 is out of range", id="softmax-axis",
    ),
    pytest.param(
        lambda: _leaf(2, 3)[5], IndexError,
        r"index 5 is invalid for a tensor of shape \(2, 3\)", id="index-range",
    ),
    *(
        pytest.param(
            call, RuntimeError,
            rf"^{name}: expected all tensors on one device, got "
            r"cpu \(\(3,\), float32\), "
            r"cuda:0 \(\(3,\), float32\).*\.to\(device\)",
            id=f"{name}-mixed-devices", marks=NEEDS_CUDA,
        )
        for name, call in (
            ("Add", lambda: _leaf(3) + gf.randn(3, device="cuda")),
            ("Mul", lambda: _leaf(3) * gf.randn(3, device="cuda")),
            ("Concatenate", lambda: gf.cat([_leaf(3), gf.randn(3, device="cuda")])),
        )
    ),
    pytest.param(
        _backward_twice, gf.GraphFreedError,
        r"backward reached 'Mul' a second time.*retain_graph=True", id="backward-twice",
    ),
    pytest.param(
        lambda: (_leaf(3) * 2).backward(), gf.GraphError,
        r"backward\(\) of a tensor of shape \(3,\) needs a 'gradient'.*loss\.sum\(\)",
        id="backward-non-scalar",
    ),
    pytest.param(
        lambda: (_leaf(3) * 2).backward(gf.ones(4)), gf.GraphError,
        r"'gradient' has shape \(4,\) but the tensor has shape \(3,\)",
        id="backward-gradient-shape",
    ),
    pytest.param(
        lambda: gf.randn(3).sum().backward(), gf.GraphError,
        r"backward\(\) on a tensor that does not require grad", id="backward-no-grad",
    ),
    pytest.param(
        lambda: gf.grad((_leaf(3) * 2).sum(), [_leaf(2)]), gf.GraphError,
        r"input 0 \(shape \(2,\)\) of gf\.grad is not reached.*allow_unused=True",
        id="grad-unused-input",
    ),
    *(
        pytest.param(
            lambda change=change: _modify_saved(change), gf.InplaceModificationError,
            r"a tensor that 'Mul' saved for backward \(an input, shape \(3,\)\) was "
            r"modified in place.*out-of-place op", id=f"saved-{name}",
        )
        for name, change in (
            ("iadd", _iadd), ("imul", _imul), ("setitem", _setitem),
            ("add_", lambda t: t.add_(1)), ("mul_", lambda t: t.mul_(2)),
            ("zero_", lambda t: t.zero_()),
        )
    ),
    *(
        pytest.param(
            lambda change=change: change(_leaf(3)), gf.GraphError,
            rf"^{re.escape(name)}: a leaf tensor that requires grad \(shape \(3,\)\) "
            r"cannot be changed in place.*gf\.no_grad\(\)", id=f"leaf-{name}",
        )
        for name, change in (
            ("__iadd__", _iadd), ("__imul__", _imul), ("__setitem__", _setitem),
            ("add_", lambda t: t.add_(1)), ("mul_", lambda t: t.mul_(2)),
            ("zero_", lambda t: t.zero_()),
        )
    ),
    pytest.param(
        lambda: nn.functional.cross_entropy(_leaf(4, 3), gf.tensor([0, 1, 3, 2])),
        IndexError, r"^cross_entropy: class index 3 is out of range; valid indices "
        r"are 0 to 2.*3 classes", id="cross-entropy-class",
    ),
    pytest.param(
        lambda: nn.functional.cross_entropy(_leaf(4, 3), gf.tensor([0, -1, 2, 2])),
        IndexError, r"^cross_entropy: class index -1 is out of range",
        id="cross-entropy-negative",
    ),
    pytest.param(
        lambda: nn.CrossEntropyLoss()(_leaf(4, 3), gf.tensor([0, 1, 9, 2])),
        IndexError, r"^cross_entropy: class index 9 is out of range",
        id="cross-entropy-module-class",
    ),
    pytest.param(
        lambda: nn.functional.nll_loss(_leaf(4, 3), gf.tensor([0, 1, 5, 2])),
        IndexError, r"^nll_loss: class index 5 is out of range", id="nll-class",
    ),
    pytest.param(
        lambda: nn.functional.cross_entropy(
            _leaf(4, 3), gf.tensor([0.0, 1.0, 2.0, 2.0])),
        ValueError, r"^cross_entropy: .*class probabilities.*\(4, 3\), got \(4,\)"
        r".*integer target", id="cross-entropy-float-target",
    ),
    pytest.param(
        lambda: nn.functional.binary_cross_entropy(
            gf.sigmoid(_leaf(4, 3)), gf.full((4, 3), 1.5)),
        ValueError, r"^binary_cross_entropy: every target value must be in \[0, 1\], "
        r"but target\[0, 0\] is 1\.5 \(shape \(4, 3\)\)", id="bce-target-range",
    ),
    pytest.param(
        lambda: nn.functional.binary_cross_entropy(gf.full((4, 3), 2.0), gf.rand(4, 3)),
        ValueError, r"^binary_cross_entropy: every input value must be in \[0, 1\], "
        r"but input\[0, 0\] is 2\.0 .*binary_cross_entropy_with_logits",
        id="bce-input-range",
    ),
    pytest.param(
        lambda: nn.functional.mse_loss(_leaf(4, 3), gf.randn(3, 4)),
        ValueError,
        r"^mse_loss: target shape \(3, 4\) does not match input shape \(4, 3\)",
        id="mse-shapes",
    ),
    pytest.param(
        lambda: gf.optim.SGD([], lr=0.1), ValueError,
        r"^SGD got an empty parameter list.*model\.parameters\(\)",
        id="optimizer-no-params",
    ),
    pytest.param(
        lambda: gf.optim.SGD(nn.Linear(3, 2).parameters(), lr=-0.1), ValueError,
        r"^SGD: invalid lr -0\.1\b.*>= 0", id="sgd-negative-lr",
    ),
    pytest.param(
        lambda: gf.optim.Adam(nn.Linear(3, 2).parameters(), lr=-1e-3), ValueError,
        r"^Adam: invalid lr -0\.001\b.*>= 0", id="adam-negative-lr",
    ),
    pytest.param(
        lambda: _load_strict(bias=None), RuntimeError,
        r"load_state_dict into Linear failed, and nothing was changed:\s+"
        r"missing key\(s\): 'bias'", id="load-missing-key",
    ),
    pytest.param(
        lambda: _load_strict(extra=gf.zeros(1)), RuntimeError,
        r"load_state_dict into Linear failed.*\s+unexpected key\(s\): 'extra'",
        id="load-unexpected-key",
    ),
    pytest.param(
        lambda: _load_strict(weight=gf.zeros(5, 5)), RuntimeError,
        r"load_state_dict into Linear failed.*\s+'weight': shape \(5, 5\) in the "
        r"state_dict does not match shape \(2, 3\)", id="load-shape",
    ),
    pytest.param(
        lambda: _load_loose(weight=gf.zeros(5, 5)), RuntimeError,
        r"'weight': shape \(5, 5\) in the state_dict does not match shape \(2, 3\)",
        id="load-shape-not-strict",
    ),
]


@pytest.mark.parametrize(("call", "error", "pattern"), CASES)
def test_bad_input_raises(call, error, pattern):
    with pytest.raises(error) as info:
        call()
    assert info.type is error
    assert re.search(pattern, str(info.value), re.DOTALL), str(info.value)


# -- rows that are not errors, and what a failed load leaves behind ----------


def test_inplace_leaf_allowed_under_no_grad():
    x = _leaf(3)
    with gf.no_grad():
        x += 1
        x *= 2
        x[0] = 1.0
        x.add_(1).mul_(2).zero_()
    assert x.detach().numpy().tolist() == [0.0, 0.0, 0.0]


def test_load_not_strict_reports_keys():
    layer, state = _linear_state(bias=None, extra=gf.zeros(1))
    result = layer.load_state_dict(state, strict=False)
    assert list(result.missing_keys) == ["bias"]
    assert list(result.unexpected_keys) == ["extra"]


def test_failed_load_changes_nothing():
    layer, state = _linear_state(weight=gf.zeros(5, 5), bias=gf.ones(2))
    before = layer.bias.detach().numpy().copy()
    with pytest.raises(RuntimeError):
        layer.load_state_dict(state)
    assert layer.bias.detach().numpy().tolist() == before.tolist()


# Pairs of shapes on both sides of the broadcasting rule: different
# lengths, size-1 and size-0 axes.
SHAPE_PAIRS = [
    ((3,), (2, 3)), ((2,), (3, 1)), ((2, 3), (3, 2)), ((0,), (1,)),
    ((0,), (2,)), ((), (4, 5)), ((4, 1, 3), (5, 1)), ((4, 2, 3), (5, 3)),
    ((1, 1), (1,)), ((2, 1), (2, 2, 3)),
]


@pytest.mark.parametrize("shape_a, shape_b", SHAPE_PAIRS)
def test_broadcast_check_follows_numpy(shape_a, shape_b):
    try:
        np.broadcast_shapes(shape_a, shape_b)
        broadcasts = True
    except ValueError:
        broadcasts = False
    a, b = gf.zeros(*shape_a), gf.zeros(*shape_b)
    if broadcasts:
        assert (a + b).shape == np.broadcast_shapes(shape_a, shape_b)
    else:
        with pytest.raises(ValueError, match=BROADCAST_HINT):
            a + b
