"""Tests of Adam's fused updates: they run, and they match the per-parameter path.

The CPU loop runs on NumPy parameters, the CUDA kernel on CuPy parameters
when a GPU is usable, and under Numba's CUDA simulator on NumPy parameters
otherwise, with tiny tensors and chunks because the simulator is slow.
"""

import numpy as np
import pytest

import gradflow as gf
import gradflow_kernels
from conftest import to_host
from gradflow_kernels import _adam_cpu

# 70_000 elements span two chunks of the loop (CHUNK is 2**16).
SHAPES = [(70_000,), (3, 4), (5,), (), (0,)]
# Under the simulator CHUNK is 16, so 20 elements span two chunks.
SIMULATOR_SHAPES = [(20,), (3, 4), (5,), (), (0,)]
SIMULATOR_CHUNK = 16
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


class _CountingKernel:
    """Stands in for the CUDA kernel and records the dtype of each launch."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.dtypes = []

    def __getitem__(self, configuration):
        launch = self.kernel[configuration]

        def counting(*args):
            self.dtypes.append(np.dtype(args[4].dtype))
            return launch(*args)

        return counting


def _count_launches(monkeypatch):
    from gradflow_kernels import _adam_cuda

    kernel = _CountingKernel(_adam_cuda._adam_kernel)
    monkeypatch.setattr(_adam_cuda, "_adam_kernel", kernel)
    return kernel.dtypes


@pytest.fixture
def fused_calls(device, loop_calls, monkeypatch):
    """Record the dtype of each fused update on ``device``: loop call or launch."""
    if device.type == "cpu":
        return loop_calls
    return _count_launches(monkeypatch)


@pytest.fixture
def simulated_launches(monkeypatch):
    """Send NumPy parameters through the CUDA kernel under the simulator.

    Returns the dtype of each launch. The chunks shrink to
    ``SIMULATOR_CHUNK`` elements, so that tiny tensors span several.
    """
    from gradflow_kernels import _adam_cuda, _launch

    if not _launch.SIMULATOR:
        pytest.skip(
            "the CUDA simulator is off, so the kernel cannot run on NumPy "
            "arrays; the cuda cases of test_fused_matches_reference run it"
        )
    monkeypatch.setattr(_adam_cuda, "CHUNK", SIMULATOR_CHUNK)
    monkeypatch.setattr(gradflow_kernels, "adam_table", _adam_cuda.CudaAdamTable)
    return _count_launches(monkeypatch)


@pytest.fixture(params=["cpu-loop", "cuda-kernel"])
def numpy_fused_calls(request, loop_calls):
    """Record the fused updates of NumPy parameters: CPU loop or simulated CUDA."""
    if request.param == "cpu-loop":
        return loop_calls
    return request.getfixturevalue("simulated_launches")


def _params(dtype, shapes=SHAPES, values=None, device="cpu"):
    # ``values``: the dtype the random values are rounded to first, so that
    # a float64 run can start from exactly the values of a float32 run.
    rng = np.random.default_rng(1)
    return [gf.tensor(rng.standard_normal(s).astype(values or dtype).astype(dtype),
                      device=device, requires_grad=True)
            for s in shapes]


def _set_gradients(params, step, values=None):
    rng = np.random.default_rng(100 + step)
    for p in params:
        g = rng.standard_normal(p.data.shape).astype(values or p.data.dtype)
        p.grad = gf.tensor(g.astype(p.data.dtype), device=p.device)


def _train(make, dtype, fused, options, shapes=SHAPES, values=None, device="cpu"):
    params = _params(dtype, shapes, values, device)
    opt = make(params, lr=0.01, fused=fused, **options)
    for step in range(STEPS):
        _set_gradients(params, step, values)
        opt.step()
    return params, opt


def _assert_same(fused_params, reference_params, dtype):
    for p, q in zip(fused_params, reference_params):
        assert p.dtype == np.dtype(dtype)
        np.testing.assert_allclose(to_host(p), to_host(q), **TOLERANCES[dtype])


def _check_matches_reference(calls, make, dtype, options, shapes, device="cpu"):
    """Train fused and per-parameter copies, and compare parameters and states."""
    fused, fused_opt = _train(make, dtype, None, options, shapes, device=device)
    assert calls == [np.dtype(dtype)] * STEPS
    reference, reference_opt = _train(
        make, np.float64, False, options, shapes, values=dtype, device=device
    )
    assert len(calls) == STEPS
    _assert_same(fused, reference, dtype)
    for p, q in zip(fused, reference):
        for key, value in reference_opt.state[q].items():
            got = fused_opt.state[p][key]
            if key == "step":
                assert got == value
            else:
                assert got.dtype == p.dtype
                np.testing.assert_allclose(
                    to_host(got), to_host(value), **TOLERANCES[dtype]
                )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("make", [gf.optim.Adam, gf.optim.AdamW])
@pytest.mark.parametrize("options", CASES)
def test_fused_matches_reference(device, fused_calls, make, dtype, options):
    _check_matches_reference(fused_calls, make, dtype, options, SHAPES, device)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("make", [gf.optim.Adam, gf.optim.AdamW])
@pytest.mark.parametrize("options", CASES)
def test_cuda_kernel_matches_reference(simulated_launches, make, dtype, options):
    _check_matches_reference(
        simulated_launches, make, dtype, options, SIMULATOR_SHAPES
    )


@pytest.mark.parametrize("options", CASES[:3])
def test_fused_float32_near_numpy_float32(options):
    fused, _ = _train(gf.optim.Adam, np.float32, None, options)
    reference, _ = _train(gf.optim.Adam, np.float32, False, options)
    for p, q in zip(fused, reference):
        np.testing.assert_allclose(p.data, q.data, rtol=1e-5, atol=1e-6)


def test_fused_mixed_dtypes_one_call_each(numpy_fused_calls):
    params = _params(np.float32, [(4, 3)]) + _params(np.float64, [(6,)])
    opt = gf.optim.Adam(params)
    _set_gradients(params, 0)
    opt.step()
    assert sorted(map(str, numpy_fused_calls)) == ["float32", "float64"]


def test_fused_float32_stays_float32(numpy_fused_calls):
    params = _params(np.float32, [(4, 3)])
    opt = gf.optim.Adam(params, amsgrad=True)
    _set_gradients(params, 0)
    opt.step()
    assert numpy_fused_calls == [np.dtype(np.float32)]
    assert params[0].dtype == gf.float32
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert opt.state[params[0]][key].dtype == gf.float32


def test_fused_false_skips_loop(loop_calls):
    _train(gf.optim.Adam, np.float32, False, {})
    assert loop_calls == []


def test_non_contiguous_param_falls_back(numpy_fused_calls):
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
    # The contiguous parameter still took the fused update, but the strided one
    # did not.
    assert numpy_fused_calls == [np.dtype(np.float64)] * 3
    assert opt.state[strided]["step"] == 3
    np.testing.assert_allclose(strided.data, reference.data, rtol=1e-13)


def test_non_contiguous_grad_falls_back(numpy_fused_calls):
    param = _params(np.float64, [(4, 6)])[0]
    param.grad = gf.tensor(np.ones((6, 4)).T)
    assert not param.grad.data.flags.c_contiguous
    opt = gf.optim.Adam([param])
    opt.step()
    assert numpy_fused_calls == []
    assert opt.state[param]["step"] == 1


def test_float16_falls_back(loop_calls):
    param = gf.tensor(np.ones(4, dtype=np.float16), requires_grad=True)
    param.grad = gf.tensor(np.full(4, 0.5, dtype=np.float16))
    opt = gf.optim.Adam([param], lr=0.1)
    opt.step()
    assert loop_calls == []
    assert param.dtype == gf.float16
    np.testing.assert_allclose(param.data, np.full(4, 0.9), rtol=1e-3)


def test_fused_true_rejects_strided_param(numpy_fused_calls):
    strided = gf.tensor(np.ones((6, 4)).T, requires_grad=True)
    strided.grad = gf.tensor(np.ones((4, 6)))
    opt = gf.optim.Adam([strided], fused=True)
    with pytest.raises(ValueError, match="not C-contiguous"):
        opt.step()
    assert opt.state[strided]["step"] == 0
    assert numpy_fused_calls == []


def test_fused_true_rejects_float16():
    param = gf.tensor(np.ones(4, dtype=np.float16), requires_grad=True)
    param.grad = gf.tensor(np.ones(4, dtype=np.float16))
    with pytest.raises(ValueError, match="no kernel"):
        gf.optim.Adam([param], fused=True).step()


def test_fused_rejects_non_bool():
    with pytest.raises(TypeError, match="fused must be None, True or False"):
        gf.optim.Adam(_params(np.float32, [(2,)]), fused="yes")


def test_fused_steps_per_parameter(numpy_fused_calls):
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
    assert numpy_fused_calls == [np.dtype(np.float64)] * 4
    assert opt.state[fused[0]]["step"] == 4
    assert opt.state[fused[1]]["step"] == 3
    _assert_same(fused, reference, np.float64)


def test_fused_bumps_version(numpy_fused_calls):
    param = _params(np.float32, [(3,)])[0]
    saved = param * 2.0
    version = param._version[0]
    param.grad = gf.tensor(np.ones(3, dtype=np.float32))
    gf.optim.Adam([param]).step()
    assert numpy_fused_calls == [np.dtype(np.float32)]
    assert param._version[0] == version + 1
    assert saved.grad_fn is not None


# The simulator runs the kernel on NumPy scalars, which warn where inf / inf
# makes the NaN. The CPU loop and a GPU do not warn.
@pytest.mark.filterwarnings("ignore:.*invalid value encountered:RuntimeWarning")
def test_fused_nan_gradient_propagates(numpy_fused_calls):
    param = _params(np.float64, [(3,)])[0]
    param.grad = gf.tensor(np.array([np.nan, 1.0, np.inf]))
    opt = gf.optim.Adam([param], amsgrad=True)
    opt.step()
    assert numpy_fused_calls == [np.dtype(np.float64)]
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


def _train_float16_values(dtype, fused, shapes, device="cpu"):
    # |g| stays within [0.5, 2), because float16 stores (1 - beta2) * g * g
    # as 0 for |g| below about 0.005, and eps = 1e-8 then inflates the step.
    params = _params(dtype, shapes, np.float16, device)
    opt = gf.optim.Adam(params, lr=0.01, amsgrad=True, fused=fused)
    rng = np.random.default_rng(7)
    for _ in range(STEPS):
        for p in params:
            shape = p.data.shape
            g = rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
            p.grad = gf.tensor(np.asarray(g, np.float16).astype(dtype), device=p.device)
        opt.step()
    return params, opt


def _assert_float16_close(fused, fused_opt, reference):
    for p, q in zip(fused, reference):
        assert p.dtype == gf.float16
        assert fused_opt.state[p]["max_exp_avg_sq"].dtype == gf.float16
        # Each step rounds the parameter and the moments to float16 once.
        np.testing.assert_allclose(to_host(p), to_host(q), rtol=4e-3, atol=1e-3)


def test_cuda_kernel_float16(simulated_launches):
    fused, fused_opt = _train_float16_values(np.float16, None, SIMULATOR_SHAPES)
    assert simulated_launches == [np.dtype(np.float16)] * STEPS
    reference, _ = _train_float16_values(np.float64, False, SIMULATOR_SHAPES)
    _assert_float16_close(fused, fused_opt, reference)


def test_cuda_launches_independent_of_count(simulated_launches):
    for count in (2, 12):
        params = _params(np.float32, [(3,)] * count)
        opt = gf.optim.AdamW(params)
        _set_gradients(params, 0)
        opt.step()
    assert simulated_launches == [np.dtype(np.float32)] * 2


def test_cuda_fused_float16(device, fused_calls):
    if device.type == "cpu":
        pytest.skip("float16 takes a fused update only on CUDA")
    fused, fused_opt = _train_float16_values(np.float16, None, SHAPES, device)
    assert fused_calls == [np.dtype(np.float16)] * STEPS
    reference, _ = _train_float16_values(np.float64, False, SHAPES, device)
    _assert_float16_close(fused, fused_opt, reference)


# -- state the fused loop must not write through -----------------------------------


def _linear_step(layer, dtype, optimizer):
    x = gf.tensor(np.linspace(-1, 1, 12).reshape(3, 4), dtype=dtype)
    optimizer.zero_grad()
    layer(x).sum().backward()
    optimizer.step()


def test_cast_mid_training_takes_reference_path(loop_calls):
    runs = []
    for fused in (None, False):
        gf.manual_seed(0)
        layer = gf.nn.Linear(4, 3)
        optimizer = gf.optim.Adam(layer.parameters(), lr=1e-2, fused=fused)
        _linear_step(layer, gf.float32, optimizer)
        layer.to(gf.float64)
        _linear_step(layer, gf.float64, optimizer)
        runs.append([p.data.copy() for p in layer.parameters()])
    assert loop_calls == [np.float32]  # the float32 step only
    for fused, reference in zip(*runs):
        assert np.isfinite(fused).all()
        np.testing.assert_allclose(fused, reference, rtol=1e-6)


def test_replaced_data_of_other_size_raises():
    p = gf.nn.Parameter(gf.ones(1000))
    optimizer = gf.optim.Adam([p], lr=0.1)
    p.grad = gf.ones(1000)
    optimizer.step()
    p.data = np.ones(5000, dtype=np.float32)
    p.grad = gf.ones(5000)
    with pytest.raises(ValueError):
        optimizer.step()


def test_read_only_parameter_is_not_written():
    frozen = np.frombuffer(np.ones(4, dtype=np.float32).tobytes(), dtype=np.float32)
    p = gf.from_numpy(frozen)
    p.requires_grad = True
    p.grad = gf.ones(4)
    with pytest.raises(ValueError, match="read-only"):
        gf.optim.Adam([p], lr=0.1).step()
    np.testing.assert_array_equal(frozen, np.ones(4))
    with pytest.raises(ValueError, match="read-only"):
        gf.optim.Adam([p], lr=0.1, fused=True).step()


def test_fused_true_refusal_keeps_step_counts():
    a = gf.nn.Parameter(gf.ones(3))
    b = gf.nn.Parameter(gf.tensor(np.ones((3, 2), dtype=np.float32).T))
    for p in (a, b):
        p.grad = gf.ones(*p.shape)
    optimizer = gf.optim.Adam([a, b], lr=0.1, fused=True)
    with pytest.raises(ValueError, match="fused=True"):
        optimizer.step()
    np.testing.assert_array_equal(a.data, np.ones(3))
    assert optimizer.state.get(a, {}).get("step", 0) == 0


def test_reference_beta1_zero_keeps_gradient():
    p = gf.nn.Parameter(gf.tensor([1e4, -1e4]))
    optimizer = gf.optim.Adam([p], lr=0.1, betas=(0.0, 0.999), fused=False)
    for g in ([1e4, -1e4], [1e-3, 2e-3]):
        p.grad = gf.tensor(g)
        optimizer.step()
    np.testing.assert_array_equal(
        optimizer.state[p]["exp_avg"].data, np.array([1e-3, 2e-3], dtype=np.float32)
    )


def test_fused_subnormal_moment_float64_root(numpy_fused_calls):
    # Gradients near 1e-20 leave float32 exp_avg_sq subnormal. Both fused
    # updates widen the stored moments and take the root in float64, so
    # the result is the float64 formula below, rounded once, bit for bit.
    rng = np.random.default_rng(5)
    grad = (rng.standard_normal(1000) * 1e-20).astype(np.float32)
    p = gf.nn.Parameter(gf.zeros(1000))
    lr, (beta1, beta2) = 0.01, (0.9, 0.999)
    optimizer = gf.optim.Adam([p], lr=lr, betas=(beta1, beta2), eps=1e-30)
    p.grad = gf.tensor(grad)
    optimizer.step()
    assert numpy_fused_calls == [np.dtype(np.float32)]
    g = grad.astype(np.float64)
    m = ((1.0 - beta1) * g).astype(np.float32).astype(np.float64)
    v = ((1.0 - beta2) * g * g).astype(np.float32)
    assert np.mean((v != 0) & (np.abs(v) < np.finfo(np.float32).tiny)) > 0.9
    step_size, inv_correction = lr / (1.0 - beta1), 1.0 / np.sqrt(1.0 - beta2)
    expected = 0.0 - step_size * m / (np.sqrt(v.astype(np.float64)) * inv_correction + 1e-30)
    np.testing.assert_array_equal(optimizer.state[p]["exp_avg_sq"].data, v)
    np.testing.assert_array_equal(p.data, expected.astype(np.float32))
