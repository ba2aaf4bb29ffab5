"""Tests of Adam's fused CPU loop: it runs, and it matches the per-parameter path."""

import numpy as np
import pytest

import gradflow as gf
from gradflow_kernels import _adam_cpu

# 70_000 elements span two chunks of the loop (CHUNK is 2**16).
SHAPES = [(70_000,), (3, 4), (5,), (), (0,)]
STEPS = 5
CASES = [
    {},
    {"betas": (0.8, 0.99), "eps": 1e-6},
    {"weight_decay": 0.1},
    {"amsgrad": True},
    {"amsgrad": True, "weight_decay": 0.05},
    {"maximize": True},
    {"maximize": True, "amsgrad": True, "weight_decay": 0.02},
    {"betas": (0.0, 0.0)},
]
# The float32 loop is checked against the per-parameter path run in float64
# from the same values: the loop rounds once per stored value, but NumPy's
# float32 expressions round after every operation, so with beta1 = 0 their
# m = m + (g - m) carries a rounding error of the old m's size, not g's.
TOLERANCES = {np.float32: dict(rtol=2e-6, atol=1e-7),
              np.float64: dict(rtol=1e-13, atol=1e-15)}


@pytest.fixture
def loop_calls(monkeypatch):
    """Count the calls of the fused loop (one per group and dtype per step)."""
    calls = []
    loop = _adam_cpu.adam_chunks

    def counting(*args):
        calls.append(args[4].dtype)
        return loop(*args)

    monkeypatch.setattr(_adam_cpu, "adam_chunks", counting)
    return calls


def _params(dtype, shapes=SHAPES, values=None):
    # ``values``: the dtype the random values are rounded to first, so that
    # a float64 run can start from exactly the values of a float32 run.
    rng = np.random.default_rng(1)
    return [gf.tensor(rng.standard_normal(s).astype(values or dtype).astype(dtype),
                      requires_grad=True)
            for s in shapes]


def _set_gradients(params, step, values=None):
    rng = np.random.default_rng(100 + step)
    for p in params:
        g = rng.standard_normal(p.data.shape).astype(values or p.data.dtype)
        p.grad = gf.tensor(g.astype(p.data.dtype))


def _train(make, dtype, fused, options, shapes=SHAPES, values=None):
    params = _params(dtype, shapes, values)
    opt = make(params, lr=0.01, fused=fused, **options)
    for step in range(STEPS):
        _set_gradients(params, step, values)
        opt.step()
    return params, opt


def _assert_same(fused_params, reference_params, dtype):
    for p, q in zip(fused_params, reference_params):
        assert p.dtype == np.dtype(dtype)
        np.testing.assert_allclose(p.data, q.data, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("make", [gf.optim.Adam, gf.optim.AdamW])
@pytest.mark.parametrize("options", CASES)
def test_fused_matches_reference(loop_calls, make, dtype, options):
    fused, fused_opt = _train(make, dtype, None, options)
    assert loop_calls == [np.dtype(dtype)] * STEPS
    reference, reference_opt = _train(make, np.float64, False, options, values=dtype)
    assert len(loop_calls) == STEPS
    _assert_same(fused, reference, dtype)
    for p, q in zip(fused, reference):
        for key, value in reference_opt.state[q].items():
            got = fused_opt.state[p][key]
            if key == "step":
                assert got == value
            else:
                assert got.dtype == p.dtype
                np.testing.assert_allclose(got.data, value.data, **TOLERANCES[dtype])


@pytest.mark.parametrize("options", CASES[:3])
def test_fused_float32_near_numpy_float32(options):
    fused, _ = _train(gf.optim.Adam, np.float32, None, options)
    reference, _ = _train(gf.optim.Adam, np.float32, False, options)
    for p, q in zip(fused, reference):
        np.testing.assert_allclose(p.data, q.data, rtol=1e-5, atol=1e-6)


def test_fused_mixed_dtypes_one_call_each(loop_calls):
    params = _params(np.float32, [(4, 3)]) + _params(np.float64, [(6,)])
    opt = gf.optim.Adam(params)
    _set_gradients(params, 0)
    opt.step()
    assert sorted(map(str, loop_calls)) == ["float32", "float64"]


def test_fused_float32_stays_float32():
    params = _params(np.float32, [(4, 3)])
    opt = gf.optim.Adam(params, amsgrad=True)
    _set_gradients(params, 0)
    opt.step()
    assert params[0].dtype == gf.float32
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert opt.state[params[0]][key].dtype == gf.float32


def test_fused_false_skips_loop(loop_calls):
    _train(gf.optim.Adam, np.float32, False, {})
    assert loop_calls == []


def test_non_contiguous_param_falls_back(loop_calls):
    strided = gf.tensor(np.ones((6, 4)).T, requires_grad=True)
    assert not strided.data.flags.c_contiguous
    reference = gf.tensor(np.ones((4, 6)), requires_grad=True)
    plain = _params(np.float64, [(5,)])
    opt = gf.optim.Adam([strided] + plain, lr=0.1)
    reference_opt = gf.optim.Adam([reference], lr=0.1, fused=False)
    for step in range(3):
        grad = np.random.default_rng(step).standard_normal((4, 6))
        strided.grad = gf.tensor(grad)
        reference.grad = gf.tensor(grad)
        _set_gradients(plain, step)
        opt.step()
        reference_opt.step()
    # The contiguous parameter still took the loop; the strided one did not.
    assert loop_calls == [np.dtype(np.float64)] * 3
    assert opt.state[strided]["step"] == 3
    np.testing.assert_allclose(strided.data, reference.data, rtol=1e-13)


def test_non_contiguous_grad_falls_back(loop_calls):
    param = _params(np.float64, [(4, 6)])[0]
    param.grad = gf.tensor(np.ones((6, 4)).T)
    assert not param.grad.data.flags.c_contiguous
    opt = gf.optim.Adam([param])
    opt.step()
    assert loop_calls == []
    assert opt.state[param]["step"] == 1


def test_float16_falls_back(loop_calls):
    param = gf.tensor(np.ones(4, dtype=np.float16), requires_grad=True)
    param.grad = gf.tensor(np.full(4, 0.5, dtype=np.float16))
    opt = gf.optim.Adam([param], lr=0.1)
    opt.step()
    assert loop_calls == []
    assert param.dtype == gf.float16
    np.testing.assert_allclose(param.data, np.full(4, 0.9), rtol=1e-3)


def test_fused_true_rejects_strided_param():
    strided = gf.tensor(np.ones((6, 4)).T, requires_grad=True)
    strided.grad = gf.tensor(np.ones((4, 6)))
    opt = gf.optim.Adam([strided], fused=True)
    with pytest.raises(ValueError, match="not C-contiguous"):
        opt.step()
    assert opt.state[strided]["step"] == 0


def test_fused_true_rejects_float16():
    param = gf.tensor(np.ones(4, dtype=np.float16), requires_grad=True)
    param.grad = gf.tensor(np.ones(4, dtype=np.float16))
    with pytest.raises(ValueError, match="no kernel"):
        gf.optim.Adam([param], fused=True).step()


def test_fused_rejects_non_bool():
    with pytest.raises(TypeError, match="fused must be None, True or False"):
        gf.optim.Adam(_params(np.float32, [(2,)]), fused="yes")


def test_fused_steps_per_parameter(loop_calls):
    # A parameter without a gradient keeps its step, so the tabled tensors
    # carry different bias corrections in one call.
    fused = _params(np.float64, [(3,), (4,)])
    reference = _params(np.float64, [(3,), (4,)])
    opt = gf.optim.Adam(fused, lr=0.05)
    reference_opt = gf.optim.Adam(reference, lr=0.05, fused=False)
    for step in range(4):
        for params in (fused, reference):
            _set_gradients(params, step)
            if step == 1:
                params[1].grad = None
        opt.step()
        reference_opt.step()
    assert opt.state[fused[0]]["step"] == 4
    assert opt.state[fused[1]]["step"] == 3
    _assert_same(fused, reference, np.float64)


def test_fused_bumps_version():
    param = _params(np.float32, [(3,)])[0]
    saved = param * 2.0
    version = param._version[0]
    param.grad = gf.tensor(np.ones(3, dtype=np.float32))
    gf.optim.Adam([param]).step()
    assert param._version[0] == version + 1
    assert saved.grad_fn is not None


def test_fused_nan_gradient_propagates():
    param = _params(np.float64, [(3,)])[0]
    param.grad = gf.tensor(np.array([np.nan, 1.0, np.inf]))
    opt = gf.optim.Adam([param], amsgrad=True)
    opt.step()
    assert np.isnan(param.data[0])
    assert np.isnan(opt.state[param]["max_exp_avg_sq"].data[0])
    assert np.isfinite(param.data[1])


def test_state_dict_without_fused_loads():
    params = _params(np.float32, [(3,)])
    opt = gf.optim.Adam(params)
    _set_gradients(params, 0)
    opt.step()
    state = opt.state_dict()
    assert state["param_groups"][0]["fused"] is None
    del state["param_groups"][0]["fused"]
    restored = gf.optim.Adam(params)
    restored.load_state_dict(state)
    _set_gradients(params, 1)
    restored.step()
    assert restored.state[params[0]]["step"] == 2
