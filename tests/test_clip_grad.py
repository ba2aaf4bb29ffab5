"""clip_grad_norm_ and clip_grad_value_, on both paths, against float64 references.

The multi-tensor CUDA kernels run on a GPU when one is usable and under
Numba's CUDA simulator otherwise (see conftest.py), on small inputs.
"""

import math

import numpy as np
import pytest

import gradflow as gf
import gradflow_kernels
from conftest import to_host
from gradflow.nn.utils import clip_grad_norm_, clip_grad_value_

_NORM_TYPES = [1.0, 2.0, 3.0, math.inf]


def _parameters(shapes, dtype=gf.float32, device="cpu"):
    params = []
    for shape in shapes:
        p = gf.tensor(np.zeros(shape), dtype=dtype, device=device, requires_grad=True)
        p.grad = gf.tensor(np.random.randn(*shape), dtype=dtype, device=device)
        params.append(p)
    return params


def _reference_norm(arrays, norm_type):
    flat = np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])
    if norm_type == math.inf:
        return np.abs(flat).max()
    return (np.abs(flat) ** norm_type).sum() ** (1.0 / norm_type)


def _grads(params):
    # Copies, because to_host returns a CPU gradient's own array.
    return [to_host(p.grad).copy() for p in params]


# -- clip_grad_norm_ ------------------------------------------------------------


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("norm_type", _NORM_TYPES)
def test_norm_matches_reference(norm_type, foreach, device):
    params = _parameters([(3, 4), (5,), (2, 2, 2)], device=device)
    before = _grads(params)
    expected = _reference_norm(before, norm_type)
    norm = clip_grad_norm_(params, 0.5, norm_type=norm_type, foreach=foreach)
    assert norm.shape == ()
    assert norm.dtype == gf.float32
    np.testing.assert_allclose(float(norm.item()), expected, rtol=1e-6)
    coefficient = min(0.5 / (expected + 1e-6), 1.0)
    for old, new in zip(before, _grads(params)):
        np.testing.assert_allclose(new, old * coefficient, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("foreach", [None, False])
def test_norm_below_max_leaves_grads(foreach):
    params = _parameters([(10,), (3, 3)])
    before = _grads(params)
    clip_grad_norm_(params, 1e6, foreach=foreach)
    for old, new in zip(before, _grads(params)):
        assert np.array_equal(old, new)


def test_norm_skips_none_grads():
    params = _parameters([(4,), (6,)])
    frozen = gf.tensor(np.ones(3), requires_grad=True)
    expected = _reference_norm(_grads(params), 2.0)
    norm = clip_grad_norm_([params[0], frozen, params[1]], 1.0)
    assert frozen.grad is None
    np.testing.assert_allclose(norm.item(), expected, rtol=1e-6)


def test_norm_without_grads_is_zero():
    norm = clip_grad_norm_([gf.tensor(np.ones(3), requires_grad=True)], 1.0)
    assert norm.shape == ()
    assert norm.item() == 0.0


@pytest.mark.parametrize("foreach", [None, False])
def test_norm_zero_size_grads(foreach):
    params = _parameters([(0,), (3,), (0, 4)])
    expected = _reference_norm(_grads(params), 2.0)
    norm = clip_grad_norm_(params, 1e-3, foreach=foreach)
    np.testing.assert_allclose(norm.item(), expected, rtol=1e-6)
    assert params[0].grad.shape == (0,)
    assert params[2].grad.shape == (0, 4)


@pytest.mark.parametrize("norm_type", _NORM_TYPES)
@pytest.mark.parametrize("foreach", [None, False])
def test_norm_all_zero_grads_stay_zero(norm_type, foreach):
    params = _parameters([(5,), (2, 3)])
    for p in params:
        p.grad = gf.zeros_like(p)
    norm = clip_grad_norm_(params, 1.0, norm_type=norm_type, foreach=foreach)
    assert norm.item() == 0.0
    for grad in _grads(params):
        assert np.array_equal(grad, np.zeros_like(grad))
        assert not np.signbit(grad).any()


@pytest.mark.parametrize("foreach", [None, False])
def test_norm_accepts_single_tensor(foreach):
    (param,) = _parameters([(7,)])
    expected = _reference_norm([param.grad.data], 2.0)
    norm = clip_grad_norm_(param, 1.0, foreach=foreach)
    np.testing.assert_allclose(norm.item(), expected, rtol=1e-6)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("foreach", [None, False])
def test_nonfinite_raises_before_change(bad, foreach, device):
    params = _parameters([(3,), (4,), (2,)], device=device)
    params[1].grad.data[2] = bad
    before = _grads(params)
    names = ["encoder.weight", "encoder.bias", "head"]
    named = list(zip(names, params))
    with pytest.raises(RuntimeError, match=r"parameter 1 \('encoder.bias'\)"):
        clip_grad_norm_(named, 1.0, error_if_nonfinite=True, foreach=foreach)
    for old, new in zip(before, _grads(params)):
        np.testing.assert_array_equal(old, new)


def test_nonfinite_message_uses_index_without_names():
    params = _parameters([(3,), (4,)])
    params[0].grad.data[0] = math.inf
    with pytest.raises(RuntimeError, match=r"non-finite gradients: parameter 0\."):
        clip_grad_norm_(params, 1.0, error_if_nonfinite=True)


def test_overflowed_norm_says_grads_are_finite():
    params = _parameters([(3,)], dtype=gf.float64)
    params[0].grad.data[:] = 1e300
    with pytest.raises(RuntimeError, match="every gradient is finite"):
        clip_grad_norm_(params, 1.0, norm_type=3.0, error_if_nonfinite=True)


@pytest.mark.parametrize("foreach", [None, False])
def test_nan_grad_without_check_spreads_nan(foreach):
    params = _parameters([(3,), (4,)])
    params[0].grad.data[1] = math.nan
    norm = clip_grad_norm_(params, 1.0, foreach=foreach)
    assert math.isnan(norm.item())
    for grad in _grads(params):
        assert np.isnan(grad).all()


@pytest.mark.parametrize("foreach", [None, False])
def test_inf_norm_type_with_nan(foreach):
    params = _parameters([(3,), (4,)])
    params[1].grad.data[0] = math.nan
    norm = clip_grad_norm_(params, 1.0, norm_type=math.inf, foreach=foreach)
    assert math.isnan(norm.item())


@pytest.mark.parametrize("foreach", [None, False])
def test_inf_grad_without_check(foreach):
    params = _parameters([(3,), (4,)])
    params[0].grad.data[0] = math.inf
    norm = clip_grad_norm_(params, 1.0, foreach=foreach)
    assert norm.item() == math.inf
    grad = _grads(params)[1]
    assert np.array_equal(grad, np.zeros_like(grad))


@pytest.mark.parametrize("foreach", [None, False])
def test_mixed_dtypes(foreach):
    params = _parameters([(5,), (3,)], dtype=gf.float32)
    params += _parameters([(4,)], dtype=gf.float64)
    params += _parameters([(6,)], dtype=gf.float16)
    before = _grads(params)
    expected = _reference_norm(before, 2.0)
    norm = clip_grad_norm_(params, 1.0, foreach=foreach)
    assert norm.dtype == gf.float64
    np.testing.assert_allclose(norm.item(), expected, rtol=1e-6)
    coefficient = 1.0 / (expected + 1e-6)
    for old, new in zip(before, _grads(params)):
        tolerance = 2e-3 if new.dtype == np.float16 else 1e-6
        np.testing.assert_allclose(new, old * coefficient, rtol=tolerance)


def test_thousands_of_small_tensors():
    params = _parameters([(8,)] * 3000)
    before = _grads(params)
    expected = _reference_norm(before, 2.0)
    norm = clip_grad_norm_(params, 2.0)
    np.testing.assert_allclose(norm.item(), expected, rtol=1e-6)
    last = _grads(params)[-1]
    np.testing.assert_allclose(last, before[-1] * 2.0 / expected, rtol=1e-5)


def test_large_float32_norm_is_accurate():
    values = np.random.default_rng(3).standard_normal(10_000_000).astype(np.float32)
    param = gf.zeros(values.size, requires_grad=True)
    param.grad = gf.tensor(values)
    values64 = values.astype(np.float64)
    expected = math.sqrt(np.sum(values64 * values64))
    norm = clip_grad_norm_([param], 1e9)
    np.testing.assert_allclose(norm.item(), expected, rtol=1e-6)


def test_chunked_tensors_match_reference(monkeypatch):
    from gradflow_kernels import _clip_cpu

    monkeypatch.setattr(_clip_cpu, "CHUNK", 5)
    params = _parameters([(23,), (5,), (1,), (11,)], dtype=gf.float64)
    before = _grads(params)
    expected = _reference_norm(before, 3.0)
    norm = clip_grad_norm_(params, 1.0, norm_type=3.0)
    np.testing.assert_allclose(norm.item(), expected, rtol=1e-12)


def test_version_counter_bumps():
    (param,) = _parameters([(4,)])
    version = param.grad._version[0]
    clip_grad_norm_([param], 1e-3)
    assert param.grad._version[0] == version + 1


def test_rejects_bad_norm_type():
    with pytest.raises(ValueError, match="norm_type"):
        clip_grad_norm_(_parameters([(3,)]), 1.0, norm_type=0.0)


def test_rejects_non_tensor():
    with pytest.raises(TypeError, match="parameter 1 is a list"):
        clip_grad_norm_([_parameters([(3,)])[0], [1.0]], 1.0)


@pytest.mark.parametrize("norm_type", _NORM_TYPES)
def test_matches_torch(norm_type):
    torch = pytest.importorskip("torch")
    shapes = [(5, 3), (7,), (2, 2, 2)]
    params = _parameters(shapes)
    torch_params = []
    for p in params:
        t = torch.zeros(p.shape, requires_grad=True)
        t.grad = torch.tensor(to_host(p.grad))
        torch_params.append(t)
    norm = clip_grad_norm_(params, 0.7, norm_type=norm_type)
    torch_norm = torch.nn.utils.clip_grad_norm_(torch_params, 0.7, norm_type=norm_type)
    np.testing.assert_allclose(norm.item(), torch_norm.item(), rtol=1e-6)
    for p, t in zip(params, torch_params):
        np.testing.assert_allclose(
            to_host(p.grad), t.grad.numpy(), rtol=1e-6, atol=1e-7
        )


# -- which path ran -------------------------------------------------------------


def _count_plans(monkeypatch):
    calls = {"plans": 0}
    build = gradflow_kernels.multi_tensor_plan

    def counting(arrays):
        plan = build(arrays)
        calls["plans"] += plan is not None
        return plan

    monkeypatch.setattr(gradflow_kernels, "multi_tensor_plan", counting)
    return calls


def test_foreach_none_uses_kernels(monkeypatch):
    calls = _count_plans(monkeypatch)
    clip_grad_norm_(_parameters([(3,), (4,)]), 1.0)
    assert calls["plans"] == 1


def test_foreach_false_uses_loop(monkeypatch):
    calls = _count_plans(monkeypatch)
    clip_grad_norm_(_parameters([(3,), (4,)]), 1.0, foreach=False)
    assert calls["plans"] == 0


def test_float16_on_cpu_uses_loop(monkeypatch):
    calls = _count_plans(monkeypatch)
    clip_grad_norm_(_parameters([(3,)], dtype=gf.float16), 1.0)
    assert calls["plans"] == 0


def test_foreach_true_rejects_float16_on_cpu():
    with pytest.raises(RuntimeError, match="foreach=True"):
        clip_grad_norm_(_parameters([(3,)], dtype=gf.float16), 1.0, foreach=True)


def test_strided_grad_uses_loop(monkeypatch):
    calls = _count_plans(monkeypatch)
    params = _parameters([(3,), (4, 5)])
    params[1].grad = gf.tensor(np.random.randn(5, 4).astype(np.float32).T)
    before = _grads(params)
    norm = clip_grad_norm_(params, 1.0)
    assert calls["plans"] == 0
    np.testing.assert_allclose(norm.item(), _reference_norm(before, 2.0), rtol=1e-6)


# -- the CUDA kernels, under the simulator or on a GPU ------------------------


def _cuda_arrays(arrays):
    from gradflow_kernels import _launch

    if _launch.SIMULATOR:
        return arrays
    import cupy

    return [cupy.asarray(a) for a in arrays]


class _CountingKernel:
    """Stands in for a CUDA kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = 0

    def __getitem__(self, configuration):
        self.launches += 1
        return self.kernel[configuration]


@pytest.mark.parametrize("norm_type", _NORM_TYPES)
def test_cuda_plan_matches_reference(norm_type, monkeypatch):
    from gradflow_kernels import _clip_cuda

    # Small chunks, so that tensors span several chunks and blocks.
    monkeypatch.setattr(_clip_cuda, "CHUNK", 16)
    rng = np.random.default_rng(4)
    host = [rng.standard_normal(n).astype(np.float32) for n in (40, 0, 7, 33)]
    host += [rng.standard_normal((3, 5)), rng.standard_normal(9).astype(np.float16)]
    expected = _reference_norm(host, norm_type)
    arrays = _cuda_arrays([a.copy() for a in host])
    plan = _clip_cuda.CudaPlan.build(arrays)
    state = to_host(plan.norm(norm_type, 0.25))
    np.testing.assert_allclose(state[0], expected, rtol=1e-6)
    np.testing.assert_allclose(state[1], 0.25 / (expected + 1e-6), rtol=1e-6)
    plan.scale_(plan.norm(norm_type, 0.25))
    for old, new in zip(host, arrays):
        tolerance = 2e-3 if old.dtype == np.float16 else 1e-6
        np.testing.assert_allclose(to_host(new), old * state[1], rtol=tolerance)


def test_cuda_plan_nan_propagates():
    from gradflow_kernels import _clip_cuda

    host = [np.array([1.0, np.nan, 2.0], np.float32), np.array([3.0], np.float32)]
    for norm_type in (2.0, math.inf):
        plan = _clip_cuda.CudaPlan.build(_cuda_arrays([a.copy() for a in host]))
        assert math.isnan(to_host(plan.norm(norm_type, 1.0))[0])


def test_cuda_launches_independent_of_count(monkeypatch):
    from gradflow_kernels import _clip_cuda

    counts = []
    for count in (2, 40):
        kernels = {}
        for name in ("_reduce_kernel", "_finish_kernel", "_scale_kernel"):
            kernels[name] = _CountingKernel(getattr(_clip_cuda, name))
            monkeypatch.setattr(_clip_cuda, name, kernels[name])
        arrays = _cuda_arrays([np.ones(3, np.float32) for _ in range(count)])
        plan = _clip_cuda.CudaPlan.build(arrays)
        plan.scale_(plan.norm(2.0, 0.1))
        counts.append(sum(k.launches for k in kernels.values()))
    assert counts == [3, 3]


# -- clip_grad_value_ -----------------------------------------------------------


def test_value_clamps(device):
    params = _parameters([(20,), (4, 4)], device=device)
    before = _grads(params)
    clip_grad_value_(params, 0.5)
    for old, new in zip(before, _grads(params)):
        np.testing.assert_array_equal(new, np.clip(old, -0.5, 0.5))


def test_value_keeps_nan():
    (param,) = _parameters([(3,)])
    param.grad.data[1] = math.nan
    clip_grad_value_(param, 0.1)
    assert math.isnan(to_host(param.grad)[1])


def test_value_rejects_negative():
    with pytest.raises(ValueError, match="clip_value"):
        clip_grad_value_(_parameters([(3,)]), -1.0)


def test_norm_beyond_float32_range_raises():
    # The float64 norm (about 6e38) is finite but reads as inf in float32.
    param = gf.zeros(4, requires_grad=True)
    param.grad = gf.tensor(np.full(4, 3e38, np.float32))
    with pytest.raises(RuntimeError, match="overflows float32"):
        clip_grad_norm_([param], 1.0, error_if_nonfinite=True)
    assert np.all(to_host(param.grad) == np.float32(3e38))


def test_norm_beyond_float32_range_returns_inf():
    param = gf.zeros(4, requires_grad=True)
    param.grad = gf.tensor(np.full(4, 3e38, np.float32))
    norm = clip_grad_norm_([param], 1.0)
    assert norm.dtype == np.float32
    assert np.isinf(norm.item())
