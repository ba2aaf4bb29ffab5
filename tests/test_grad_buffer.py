"""GradientBuffer: gradients as views of one flat array, and clipping over it."""

import copy
import math

import numpy as np
import pytest

import gradflow as gf
from conftest import to_host
from gradflow.nn import utils
from gradflow.nn.utils import GradientBuffer, clip_grad_norm_, clip_grad_value_


def _model(device="cpu", dtype=gf.float32):
    gf.manual_seed(3)
    model = gf.nn.Sequential(
        gf.nn.Linear(4, 6), gf.nn.GELU(), gf.nn.Linear(6, 3), gf.nn.Tanh(),
        gf.nn.Linear(3, 2),
    )
    return model.to(device=device, dtype=dtype)


def _step(model, device, seed=0):
    rng = np.random.default_rng(seed)
    x = gf.tensor(rng.standard_normal((5, 4)), dtype=model[0].weight.dtype, device=device)
    (model(x) ** 2).sum().backward()


def _grads(model):
    return [to_host(p.grad).copy() for p in model.parameters()]


@pytest.fixture
def spy_buffer_path(monkeypatch):
    """Count the calls of clip_grad_norm_ that took the flat-buffer path."""
    calls = []
    original = utils._clip_buffer

    def counted(*args):
        calls.append(args[0])
        return original(*args)

    monkeypatch.setattr(utils, "_clip_buffer", counted)
    return calls


# -- gradients in the buffer ---------------------------------------------------


@pytest.mark.parametrize("dtype", [gf.float32, gf.float64])
def test_backward_fills_buffer_equally(dtype, device):
    plain, buffered = _model(device, dtype), _model(device, dtype)
    buffer = GradientBuffer(buffered.parameters())
    for seed in range(3):  # the first backward fills, the others accumulate
        _step(plain, device, seed)
        _step(buffered, device, seed)
        for a, b in zip(_grads(plain), _grads(buffered)):
            np.testing.assert_array_equal(a, b)
    flat = buffer.arrays[0]
    offset = 0
    for p in buffered.parameters():
        np.testing.assert_array_equal(
            to_host(flat[offset:offset + p.data.size]), to_host(p.grad).ravel()
        )
        offset += p.data.size
    assert offset == flat.size


def test_existing_gradients_are_kept():
    model = _model()
    _step(model, "cpu")
    before = _grads(model)
    buffer = GradientBuffer(model.parameters())
    for old, p in zip(before, model.parameters()):
        np.testing.assert_array_equal(to_host(p.grad), old)
        assert np.shares_memory(p.grad.data, buffer.arrays[0])


def test_zero_grad_then_backward_refills(spy_buffer_path):
    model = _model()
    buffer = GradientBuffer(model.parameters())
    optimizer = gf.optim.SGD(model.parameters(), lr=0.1)
    _step(model, "cpu")
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    clip_grad_norm_(list(model.parameters()), 1.0)
    assert spy_buffer_path == []  # no gradient at all: nothing in place
    _step(model, "cpu")
    for p in model.parameters():
        assert np.shares_memory(p.grad.data, buffer.arrays[0])
    clip_grad_norm_(list(model.parameters()), 1.0)
    assert spy_buffer_path == [buffer]


def test_optimizer_steps_match_plain():
    plain, buffered = _model(), _model()
    GradientBuffer(buffered.parameters())
    runs = []
    for model in (plain, buffered):
        optimizer = gf.optim.Adam(model.parameters(), lr=0.01)
        for seed in range(4):
            optimizer.zero_grad(set_to_none=seed % 2 == 0)
            _step(model, "cpu", seed)
            clip_grad_norm_(model.parameters(), 0.5)
            optimizer.step()
        runs.append([p.data.copy() for p in model.parameters()])
    for a, b in zip(*runs):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_mixed_dtypes_one_array_each():
    a = gf.tensor(np.ones(3), dtype=gf.float32, requires_grad=True)
    b = gf.tensor(np.ones(2), dtype=gf.float64, requires_grad=True)
    buffer = GradientBuffer([a, b])
    assert sorted(str(f.dtype) for f in buffer.arrays) == ["float32", "float64"]
    ((a * 3).sum() + (b * 4).sum()).backward()
    norm = clip_grad_norm_([a, b], 1.0)
    assert norm.dtype == gf.float64
    np.testing.assert_allclose(norm.item(), math.sqrt(3 * 9 + 2 * 16), rtol=1e-12)


def test_zero_size_parameter():
    a = gf.tensor(np.zeros((0, 3)), requires_grad=True)
    b = gf.tensor(np.ones(2), requires_grad=True)
    buffer = GradientBuffer([a, b])
    ((a * 2).sum() + (b * 2).sum()).backward()
    assert a.grad.shape == (0, 3)
    np.testing.assert_allclose(clip_grad_norm_(buffer.params, 10.0).item(), math.sqrt(8))


# -- clipping through the buffer ---------------------------------------------------


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, math.inf])
def test_clip_norm_matches_separate(norm_type, device, spy_buffer_path):
    plain, buffered = _model(device), _model(device)
    buffer = GradientBuffer(buffered.parameters())
    _step(plain, device)
    _step(buffered, device)
    expected = clip_grad_norm_(plain.parameters(), 0.1, norm_type=norm_type)
    got = clip_grad_norm_(buffered.parameters(), 0.1, norm_type=norm_type)
    assert spy_buffer_path == [buffer]
    assert got.dtype == expected.dtype
    assert got.shape == ()
    np.testing.assert_allclose(got.item(), expected.item(), rtol=1e-6)
    for a, b in zip(_grads(plain), _grads(buffered)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)


def test_clip_value_through_buffer():
    plain, buffered = _model(), _model()
    GradientBuffer(buffered.parameters())
    _step(plain, "cpu")
    _step(buffered, "cpu")
    clip_grad_value_(plain.parameters(), 0.05)
    clip_grad_value_(buffered.parameters(), 0.05)
    for a, b in zip(_grads(plain), _grads(buffered)):
        np.testing.assert_array_equal(a, b)


def test_other_lists_take_general_path(spy_buffer_path):
    model = _model()
    buffer = GradientBuffer(model.parameters())
    _step(model, "cpu")
    params = list(model.parameters())
    clip_grad_norm_(params[1:], 1e3)                  # a subset
    clip_grad_norm_(params[::-1], 1e3)                # another order
    clip_grad_norm_(model.named_parameters(), 1e3)    # (name, tensor) pairs
    clip_grad_norm_(params, 1e3, foreach=False)       # the reference loop
    assert spy_buffer_path == []
    clip_grad_norm_(params, 1e3)
    assert spy_buffer_path == [buffer]


def test_assigned_gradient_leaves_slot(spy_buffer_path):
    model = _model()
    buffer = GradientBuffer(model.parameters())
    _step(model, "cpu")
    first = model[0].weight
    mine = gf.ones(*first.shape)
    first.grad = mine
    total = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in _grads(model)))
    norm = clip_grad_norm_(model.parameters(), 1e-3)
    assert spy_buffer_path == []
    assert first.grad is mine
    assert float(mine.data.max()) < 1.0  # the user's tensor was scaled in place
    np.testing.assert_allclose(norm.item(), total, rtol=1e-6)
    buffer.zero_()
    assert first.grad is mine  # zeroed where it is
    assert all(float(np.abs(g).max()) == 0.0 for g in _grads(model))
    first.grad = None
    _step(model, "cpu")
    assert np.shares_memory(first.grad.data, buffer.arrays[0])
    clip_grad_norm_(model.parameters(), 1.0)
    assert spy_buffer_path == [buffer]


def test_zero_keeps_missing_gradients_none():
    model = _model()
    model[0].bias.requires_grad = False
    buffer = GradientBuffer(model.parameters())
    optimizer = gf.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    before = model[0].bias.data.copy()
    for _ in range(2):
        buffer.zero_()
        _step(model, "cpu")
        optimizer.step()
    assert model[0].bias.grad is None
    np.testing.assert_array_equal(model[0].bias.data, before)


def test_zero_after_cast_zeroes_in_place():
    model = _model()
    buffer = GradientBuffer(model.parameters())
    _step(model, "cpu")
    model.to(dtype=gf.float64)
    buffer.zero_()
    for p in model.parameters():
        assert p.grad.dtype == gf.float64
        assert float(np.abs(p.grad.data).max()) == 0.0


def test_foreach_true_without_kernels_raises():
    a = gf.tensor([1.0, 2.0], dtype=gf.float16, requires_grad=True)
    GradientBuffer([a])
    (a * 2).sum().backward()
    with pytest.raises(RuntimeError, match="foreach=True"):
        clip_grad_norm_([a], 1.0, foreach=True)
    np.testing.assert_allclose(clip_grad_norm_([a], 10.0).item(), math.sqrt(8), rtol=1e-3)


def test_nonfinite_error_keeps_buffer():
    model = _model()
    buffer = GradientBuffer(model.parameters())
    _step(model, "cpu")
    model[2].bias.grad.data[1] = np.nan
    before = buffer.arrays[0].copy()
    with pytest.raises(RuntimeError, match=r"parameter 3\b"):
        clip_grad_norm_(model.parameters(), 1e-3, error_if_nonfinite=True)
    np.testing.assert_array_equal(buffer.arrays[0], before)


def test_scaling_bumps_every_version():
    model = _model()
    GradientBuffer(model.parameters())
    _step(model, "cpu")
    grads = [p.grad for p in model.parameters()]
    versions = [int(g._version[0]) for g in grads]
    clip_grad_norm_(model.parameters(), 1e-3)
    assert [int(g._version[0]) for g in grads] == [v + 1 for v in versions]


def test_filling_one_slot_keeps_other_versions():
    a = gf.tensor([1.0, 2.0], requires_grad=True)
    b = gf.tensor([3.0, 4.0], requires_grad=True)
    w = gf.tensor([1.0, 1.0], requires_grad=True)
    GradientBuffer([a, b])
    (a * 2).sum().backward()
    y = (w * a.grad).sum()  # saves a.grad for backward
    (b * 3).sum().backward()
    y.backward()
    np.testing.assert_array_equal(w.grad.data, [2.0, 2.0])


# -- leaving the buffer -------------------------------------------------------------


def test_release_copies_each_gradient():
    model = _model()
    buffer = GradientBuffer(model.parameters())
    _step(model, "cpu")
    before = _grads(model)
    buffer.release()
    assert len(buffer) == 0
    for old, p in zip(before, model.parameters()):
        np.testing.assert_array_equal(p.grad.data, old)
        assert p.grad.data.base is None
    again = GradientBuffer(model.parameters())  # may join a new buffer
    assert len(again) == len(before)


def test_deepcopy_owns_its_gradients():
    model = _model()
    buffer = GradientBuffer(model.parameters())
    _step(model, "cpu")
    twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert q._grad_buffer is None
        assert not np.shares_memory(q.grad.data, buffer.arrays[0])
        np.testing.assert_array_equal(p.grad.data, q.grad.data)


def test_cast_model_gets_fresh_gradients():
    model = _model()
    buffer = GradientBuffer(model.parameters())
    model.to(dtype=gf.float64)
    _step(model, "cpu")
    for p in model.parameters():
        assert p.grad.dtype == gf.float64
        assert not np.shares_memory(p.grad.data, buffer.arrays[0])
    norm = clip_grad_norm_(model.parameters(), 1e-3)
    assert norm.dtype == gf.float64


def test_create_graph_stays_outside_buffer():
    w = gf.tensor([1.0, 2.0], requires_grad=True)
    buffer = GradientBuffer([w])
    (w ** 3).sum().backward(create_graph=True)
    assert w.grad.grad_fn is not None
    assert not np.shares_memory(w.grad.data, buffer.arrays[0])
    np.testing.assert_allclose(w.grad.data, [3.0, 12.0])


# -- bad input ------------------------------------------------------------------------


def test_bad_parameters_raise():
    w = gf.tensor([1.0], requires_grad=True)
    with pytest.raises(ValueError, match="GradientBuffer: parameters is empty"):
        GradientBuffer([])
    with pytest.raises(TypeError, match="parameter 1 is a list"):
        GradientBuffer([w, [1.0]])
    with pytest.raises(ValueError, match="parameter 0 was produced by"):
        GradientBuffer([w * 2])
    with pytest.raises(TypeError, match="dtype int64"):
        GradientBuffer([gf.tensor([1, 2])])
    with pytest.raises(ValueError, match="parameter 1 .* appears twice"):
        GradientBuffer([w, w])
    GradientBuffer([w])
    with pytest.raises(ValueError, match="already belongs to a GradientBuffer"):
        GradientBuffer([w])


def test_cast_with_gradients_leaves_buffer(spy_buffer_path):
    model = _model()
    buffer = GradientBuffer(model.parameters())
    _step(model, "cpu")
    before = _grads(model)
    model.to(dtype=gf.float64)
    for old, p in zip(before, model.parameters()):
        assert p.grad.dtype == gf.float64
        assert not np.shares_memory(p.grad.data, buffer.arrays[0])
        np.testing.assert_array_equal(p.grad.data, old.astype(np.float64))
    expected = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in before))
    norm = clip_grad_norm_(model.parameters(), 1e-3)
    assert spy_buffer_path == []
    np.testing.assert_allclose(norm.item(), expected, rtol=1e-12)


def test_frozen_parameter_keeps_fast_path(spy_buffer_path):
    plain, buffered = _model(), _model()
    for model in (plain, buffered):
        model[2].weight.requires_grad = False
    buffer = GradientBuffer(buffered.parameters())
    _step(plain, "cpu")
    _step(buffered, "cpu")
    expected = clip_grad_norm_(plain.parameters(), 1e-2)
    got = clip_grad_norm_(buffered.parameters(), 1e-2)
    assert spy_buffer_path == [buffer]
    assert buffered[2].weight.grad is None
    np.testing.assert_allclose(got.item(), expected.item(), rtol=1e-6)


def test_stale_slots_add_nothing(spy_buffer_path):
    first, second = gf.nn.Linear(3, 2), gf.nn.Linear(3, 2)
    params = list(first.parameters()) + list(second.parameters())
    buffer = GradientBuffer(params)
    x = gf.ones(4, 3)
    (first(x).sum() + second(x).sum()).backward()
    for p in params:
        p.grad = None
    first(x).sum().backward()  # the second layer's slots still hold old values
    expected = math.sqrt(sum(float((to_host(p.grad).astype(np.float64) ** 2).sum())
                             for p in first.parameters()))
    norm = clip_grad_norm_(params, 1e6)
    assert spy_buffer_path == [buffer]
    np.testing.assert_allclose(norm.item(), expected, rtol=1e-6)
    assert all(p.grad is None for p in second.parameters())


def test_zeroing_stale_slot_bumps_version():
    first, second = gf.nn.Linear(3, 2), gf.nn.Linear(3, 2)
    params = list(first.parameters()) + list(second.parameters())
    GradientBuffer(params)
    x = gf.ones(4, 3)
    (first(x).sum() + second(x).sum()).backward()
    old = second.weight.grad
    before = int(old._version[0])
    for p in params:
        p.grad = None
    first(x).sum().backward()
    clip_grad_norm_(params, 1e6)  # zeroes the stale slot that ``old`` views
    assert float(np.abs(old.data).max()) == 0.0
    assert int(old._version[0]) > before
