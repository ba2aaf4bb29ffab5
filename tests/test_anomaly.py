"""Anomaly detection: the first op that made a NaN or Inf, its phase and its line."""

import inspect

import numpy as np
import pytest
from conftest import to_host

import gradflow as gf
from gradflow.autograd import _engine, _function


def _line_of(marker):
    """Return the line number in this file of the source line containing ``marker``."""
    lines = inspect.getsource(inspect.getmodule(_line_of)).splitlines()
    matches = [i + 1 for i, line in enumerate(lines) if marker in line]
    assert len(matches) == 1, marker  # callers split the marker to match once
    return matches[0]


def test_forward_names_op_and_line():
    x = gf.tensor([0.0, 1.0], requires_grad=True)
    with pytest.raises(gf.AnomalyError) as info:
        with gf.detect_anomaly():
            gf.log(x)  # forward-log
    error = info.value
    assert error.op == "Log"
    assert error.phase == "forward"
    assert error.from_input is False
    assert error.source == (__file__, _line_of("# forward-" + "log"))
    assert "shape (2,) float32" in str(error)
    assert "gf.log(x)" in str(error)


def test_backward_names_creation_line():
    x = gf.tensor([0.0, 4.0], dtype=gf.float64, requires_grad=True)
    with gf.detect_anomaly():
        y = gf.sqrt(x)  # backward-sqrt
        with pytest.raises(gf.AnomalyError) as info:
            y.sum().backward()
    error = info.value
    assert error.op == "Sqrt"
    assert error.phase == "backward"
    assert error.source == (__file__, _line_of("# backward-" + "sqrt"))
    assert "gradient of input 0" in str(error)
    assert "Inf" in str(error)


def test_nan_in_input_not_blamed():
    x = gf.tensor([1.0, float("nan")], requires_grad=True)
    pattern = r"input 0 of 'Mul'.*already contains NaN"
    with pytest.raises(gf.AnomalyError, match=pattern):
        with gf.detect_anomaly():
            x * 2.0
    with pytest.raises(gf.AnomalyError) as info:
        with gf.detect_anomaly():
            x * 2.0
    assert info.value.from_input is True


def test_inf_in_input_passes():
    x = gf.tensor([1.0, -float("inf")], requires_grad=True)
    with gf.detect_anomaly():
        y = (x * 2.0 + 1.0).sum()
        y.backward()
    assert y.item() == -float("inf")
    assert x.grad.numpy().tolist() == [2.0, 2.0]


def test_nan_from_inf_blames_op():
    x = gf.tensor([float("inf"), 1.0])
    with pytest.raises(gf.AnomalyError) as info:
        with gf.detect_anomaly():
            x - x  # inf-minus-inf
    error = info.value
    assert error.op == "Sub"
    assert error.from_input is False
    assert error.source == (__file__, _line_of("# inf-" + "minus-inf"))
    assert "contain Inf but no NaN" in str(error)


def test_inf_gradient_passes():
    x = gf.tensor([1.0, 2.0], requires_grad=True)
    with gf.detect_anomaly():
        (x * 3.0).backward(gf.tensor([1.0, float("inf")]))
    assert x.grad.numpy().tolist() == [3.0, float("inf")]


def test_nan_scalar_argument_is_input():
    x = gf.tensor([1.0, 2.0])
    with pytest.raises(gf.AnomalyError, match=r"input 1 of 'Mul'.*the number nan"):
        with gf.detect_anomaly():
            x * float("nan")


def test_nan_root_gradient_is_input():
    x = gf.tensor([1.0, 2.0], requires_grad=True)
    with gf.detect_anomaly():
        y = x * 3.0
        with pytest.raises(gf.AnomalyError, match=r"arriving at 'Mul'") as info:
            y.backward(gf.tensor([1.0, float("nan")]))
    assert info.value.from_input is True
    assert info.value.phase == "backward"


def test_first_bad_op_reported():
    x = gf.tensor([-1.0, 1.0], requires_grad=True)
    with pytest.raises(gf.AnomalyError) as info:
        with gf.detect_anomaly():
            y = gf.sqrt(x)  # NaN at -1: this op is the first
            z = gf.exp(y * 1000.0)
            z.sum()
    assert info.value.op == "Sqrt"


def test_create_graph_backward_phase():
    x = gf.tensor([0.0, 1.0], dtype=gf.float64, requires_grad=True)
    with gf.detect_anomaly():
        y = gf.sqrt(x).sum()
        with pytest.raises(gf.AnomalyError) as info:
            gf.grad(y, x, create_graph=True)
    assert info.value.phase == "backward"
    assert "create_graph=True" in str(info.value)


def test_finite_run_passes():
    x = gf.randn(4, 3, requires_grad=True)
    with gf.detect_anomaly():
        loss = (gf.tanh(x @ x.T) ** 2).mean()
        loss.backward()
    assert np.isfinite(x.grad.numpy()).all()


def test_integer_ops_ignored():
    with gf.detect_anomaly():
        out = gf.arange(5) * 2
    assert out.numpy().tolist() == [0, 2, 4, 6, 8]


def test_context_restores_state():
    assert not gf.is_anomaly_enabled()
    with gf.detect_anomaly():
        assert gf.is_anomaly_enabled()
        with gf.detect_anomaly(mode="flag"):
            assert gf.is_anomaly_enabled()
        assert gf.anomaly._mode == "eager"
    assert not gf.is_anomaly_enabled()
    assert _function.anomaly_hook is None
    assert _engine.anomaly_hook is None


def test_context_restores_after_error():
    with pytest.raises(gf.AnomalyError):
        with gf.detect_anomaly():
            gf.log(gf.tensor([0.0]))
    assert not gf.is_anomaly_enabled()
    assert np.geterr()["divide"] == "warn"


def test_global_switch():
    gf.set_detect_anomaly(True)
    try:
        assert gf.is_anomaly_enabled()
        with pytest.raises(gf.AnomalyError):
            gf.log(gf.tensor([0.0]))
    finally:
        gf.set_detect_anomaly(False)
    assert not gf.is_anomaly_enabled()


def test_switch_rejects_bad_arguments():
    with pytest.raises(TypeError, match="enabled must be True or False, got 1"):
        gf.set_detect_anomaly(1)
    with pytest.raises(ValueError, match="mode must be 'eager' or 'flag', got 'lazy'"):
        gf.set_detect_anomaly(True, mode="lazy")
    assert not gf.is_anomaly_enabled()


def test_decorator_form():
    @gf.detect_anomaly()
    def step(x):
        return gf.log(x)

    with pytest.raises(gf.AnomalyError):
        step(gf.tensor([0.0]))


def test_detection_off_lets_nan_through():
    with np.errstate(divide="ignore"):
        out = gf.log(gf.tensor([0.0]))
    assert np.isinf(out.numpy()).all()


# -- flag mode, the path CUDA uses, run here on NumPy arrays -------------------


def test_flag_mode_raises_at_exit():
    ran_after_bad_op = []
    with pytest.raises(gf.AnomalyError, match="mode='flag'"):
        with gf.detect_anomaly(mode="flag"):
            gf.log(gf.tensor([0.0]))
            ran_after_bad_op.append(True)
    assert ran_after_bad_op == [True]


def test_flag_mode_finite_block():
    with gf.detect_anomaly(mode="flag"):
        (gf.randn(3, requires_grad=True) * 2).sum().backward()
    assert not gf.is_anomaly_enabled()


def test_flag_mode_sees_backward():
    x = gf.tensor([0.0, 1.0], requires_grad=True)
    y = gf.sqrt(x).sum()  # forward is finite, its gradient at 0 is not
    with pytest.raises(gf.AnomalyError, match="mode='flag'"):
        with gf.detect_anomaly(mode="flag"):
            y.backward()


def test_flag_mode_reads_host_once(monkeypatch):
    # On CUDA a per-op host read would synchronize, so flag mode must only
    # read its flags once, at the end of the step.
    def per_op_read(value):
        raise AssertionError("flag mode checked an op on the host")

    reads = []
    read_flags = gf.anomaly._read_flags

    def counted_read_flags():
        reads.append(1)
        return read_flags()

    monkeypatch.setattr(gf.anomaly, "_is_finite", per_op_read)
    monkeypatch.setattr(gf.anomaly, "_read_flags", counted_read_flags)

    def step():
        x = gf.randn(4, 3, requires_grad=True)
        (gf.tanh(x) * 2).sum().backward()

    gf.anomaly.check_step(step)
    assert reads == [1]


def _step(device, calls):
    x = gf.tensor([4.0, 0.0], dtype=gf.float64, device=device, requires_grad=True)
    noise = gf.rand(2, dtype=gf.float64, device=device)
    calls.append(noise.numpy() if device.type == "cpu" else noise.cpu().numpy())
    loss = (gf.sqrt(x) + noise).sum()  # step-sqrt
    loss.backward()
    return loss


def test_check_step_finite_returns_result(device):
    def step():
        x = gf.ones(3, device=device, requires_grad=True)
        loss = (x * 2).sum()
        loss.backward()
        return loss

    assert gf.anomaly.check_step(step).item() == 6.0
    assert not gf.is_anomaly_enabled()


def test_check_step_names_op(device):
    calls = []
    with pytest.raises(gf.AnomalyError) as info:
        gf.anomaly.check_step(_step, device, calls)
    assert info.value.op == "Sqrt"
    assert info.value.phase == "backward"
    assert info.value.source == (__file__, _line_of("# step-" + "sqrt"))
    assert len(calls) == 2


def test_check_step_replays_rng(device):
    calls = []
    with pytest.raises(gf.AnomalyError):
        gf.anomaly.check_step(_step, device, calls)
    assert np.array_equal(calls[0], calls[1])


def test_check_step_unrepeatable_step():
    state = {"first": True}

    def step():
        value = 0.0 if state["first"] else 1.0
        state["first"] = False
        return gf.log(gf.tensor([value]))

    with pytest.raises(gf.AnomalyError, match="does not repeat itself"):
        gf.anomaly.check_step(step)
    assert not gf.is_anomaly_enabled()


# -- masked attention: its -inf bias is a legitimate value ---------------------


def _causal_attention(q):
    return gf.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)


def _bool_mask_attention(q):
    mask = gf.tensor(np.tril(np.ones((4, 4), dtype=bool)), device=q.device)
    return gf.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)


def _padded_attention(q):
    module = gf.nn.MultiheadAttention(8, 2, batch_first=True, device=q.device)
    x = q[0]  # (2, 4, 8): batch, length, features
    # The second sequence is fully padded, so its rows are all -inf.
    padding = gf.tensor([[False, False, True, True], [True, True, True, True]],
                        device=q.device)
    out, _ = module(x, x, x, key_padding_mask=padding)
    return out


ATTENTION_CASES = {
    "causal": _causal_attention,
    "bool_mask": _bool_mask_attention,
    "key_padding_mask": _padded_attention,
}


@pytest.mark.parametrize("attention", ATTENTION_CASES.values(),
                         ids=ATTENTION_CASES.keys())
def test_masked_attention_eager(device, attention):
    q = gf.randn(1, 2, 4, 8, device=device, requires_grad=True)
    with gf.detect_anomaly():
        attention(q).sum().backward()
    assert np.isfinite(to_host(q.grad)).all()


@pytest.mark.parametrize("attention", ATTENTION_CASES.values(),
                         ids=ATTENTION_CASES.keys())
def test_masked_attention_flag(device, attention):
    q = gf.randn(1, 2, 4, 8, device=device, requires_grad=True)
    with gf.detect_anomaly(mode="flag"):
        attention(q).sum().backward()
    assert np.isfinite(to_host(q.grad)).all()


@pytest.mark.parametrize("attention", ATTENTION_CASES.values(),
                         ids=ATTENTION_CASES.keys())
def test_masked_attention_check_step(device, attention):
    q = gf.randn(1, 2, 4, 8, device=device, requires_grad=True)

    def step():
        loss = attention(q).sum()
        loss.backward()
        return loss

    assert np.isfinite(to_host(gf.anomaly.check_step(step)))


def test_flag_mode_nan_from_inf():
    x = gf.tensor([float("inf"), 1.0])
    with pytest.raises(gf.AnomalyError, match="mode='flag'"):
        with gf.detect_anomaly(mode="flag"):
            x - x


def test_flag_mode_inf_input_passes():
    x = gf.tensor([1.0, -float("inf")], requires_grad=True)
    with gf.detect_anomaly(mode="flag"):
        (x * 2.0).sum().backward()
    assert not gf.is_anomaly_enabled()
