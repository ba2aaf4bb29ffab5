"""RNN, LSTM, GRU and their cells: values, gradients, BPTT and carried state."""

import numpy as np
import pytest
from conftest import assert_close, device_tensor, load_torch_state, to_host

import gradflow as gf
from gradflow.errors import GraphFreedError


def _flatten(result):
    output, state = result
    return [output, *state] if isinstance(state, tuple) else [output, state]


def _weighted_sum(tensors, weights, wrap):
    total = None
    for t, w in zip(tensors, weights):
        term = (t * wrap(w)).sum()
        total = term if total is None else total + term
    return total


SEQUENCE_CASES = {
    "rnn_tanh": ("RNN", dict(), (5, 3, 4), None),
    "rnn_relu_2_layers": ("RNN", dict(nonlinearity="relu", num_layers=2),
                          (5, 3, 4), None),
    "lstm_2_layers_bidirectional": ("LSTM", dict(num_layers=2, bidirectional=True),
                                    (5, 3, 4), None),
    "gru_2_layers_bidirectional": ("GRU", dict(num_layers=2, bidirectional=True),
                                   (5, 3, 4), None),
    "lstm_proj": ("LSTM", dict(num_layers=2, proj_size=3), (5, 3, 4), None),
    "gru_no_bias_batch_first": ("GRU", dict(bias=False, batch_first=True),
                                (3, 5, 4), None),
    "lstm_initial_state": ("LSTM", dict(), (5, 3, 4), "pair"),
    "gru_initial_state_bidirectional": ("GRU", dict(bidirectional=True),
                                        (5, 3, 4), "h"),
    "lstm_unbatched": ("LSTM", dict(), (5, 4), "pair"),
}


def _initial_state(kind, layer, input_shape, rng):
    if kind is None:
        return None
    batched = len(input_shape) == 3
    slots = layer.num_layers * (2 if layer.bidirectional else 1)
    lead = (slots, input_shape[1]) if batched else (slots,)
    h = rng.standard_normal(lead + (layer.proj_size or layer.hidden_size,))
    if kind == "h":
        return h
    return h, rng.standard_normal(lead + (layer.hidden_size,))


def _convert_state(state, wrap):
    if state is None:
        return ()
    if isinstance(state, tuple):
        return (tuple(wrap(s) for s in state),)
    return (wrap(state),)


@pytest.mark.parametrize("case", list(SEQUENCE_CASES))
def test_sequence_layer_matches_torch(case, device):
    torch = pytest.importorskip("torch")
    name, kwargs, shape, state_kind = SEQUENCE_CASES[case]
    reference = getattr(torch.nn, name)(4, 6, **kwargs).double()
    layer = getattr(gf.nn, name)(4, 6, device=device, dtype=gf.float64, **kwargs)
    load_torch_state(layer, reference)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape)
    state = _initial_state(state_kind, layer, shape, rng)
    torch_x = torch.tensor(x, requires_grad=True)
    gf_x = device_tensor(x, device, requires_grad=True)
    expected = _flatten(reference(torch_x, *_convert_state(state, torch.tensor)))
    gf_state = _convert_state(state, lambda a: device_tensor(a, device))
    got = _flatten(layer(gf_x, *gf_state))
    weights = [rng.standard_normal(tuple(t.shape)) for t in expected]
    _weighted_sum(expected, weights, torch.tensor).backward()
    _weighted_sum(got, weights, lambda w: device_tensor(w, device)).backward()
    for mine, theirs in zip(got, expected):
        assert tuple(mine.shape) == tuple(theirs.shape)
        assert_close(mine, theirs.detach().numpy())
    assert_close(gf_x.grad, torch_x.grad.numpy())
    for (param_name, param), (_, theirs) in zip(layer.named_parameters(),
                                                reference.named_parameters()):
        assert_close(param.grad, theirs.grad.numpy())


CELL_CASES = {
    "rnn_tanh": ("RNNCell", dict()),
    "rnn_relu": ("RNNCell", dict(nonlinearity="relu")),
    "lstm": ("LSTMCell", dict()),
    "gru": ("GRUCell", dict()),
    "gru_no_bias": ("GRUCell", dict(bias=False)),
}


@pytest.mark.parametrize("case", list(CELL_CASES))
def test_cell_matches_torch(case, device):
    torch = pytest.importorskip("torch")
    name, kwargs = CELL_CASES[case]
    reference = getattr(torch.nn, name)(4, 6, **kwargs).double()
    cell = getattr(gf.nn, name)(4, 6, device=device, dtype=gf.float64, **kwargs)
    load_torch_state(cell, reference)
    rng = np.random.default_rng(1)
    x, h, c = (rng.standard_normal(s) for s in [(3, 4), (3, 6), (3, 6)])
    state = (h, c) if name == "LSTMCell" else h
    torch_x = torch.tensor(x, requires_grad=True)
    gf_x = device_tensor(x, device, requires_grad=True)
    expected = reference(torch_x, *_convert_state(state, torch.tensor))
    got = cell(gf_x, *_convert_state(state, lambda a: device_tensor(a, device)))
    expected = list(expected) if isinstance(expected, tuple) else [expected]
    got = list(got) if isinstance(got, tuple) else [got]
    weights = [rng.standard_normal((3, 6)) for _ in expected]
    _weighted_sum(expected, weights, torch.tensor).backward()
    _weighted_sum(got, weights, lambda w: device_tensor(w, device)).backward()
    for mine, theirs in zip(got, expected):
        assert_close(mine, theirs.detach().numpy())
    assert_close(gf_x.grad, torch_x.grad.numpy())
    for (param_name, param), (_, theirs) in zip(cell.named_parameters(),
                                                reference.named_parameters()):
        assert_close(param.grad, theirs.grad.numpy())


GRADCHECK_CASES = {
    "rnn_tanh": ("RNN", dict(num_layers=2)),
    "lstm_bidirectional_proj": ("LSTM", dict(bidirectional=True, proj_size=1)),
    "gru_bidirectional": ("GRU", dict(bidirectional=True)),
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_sequence_layer_gradcheck(case, device):
    name, kwargs = GRADCHECK_CASES[case]
    layer = getattr(gf.nn, name)(2, 2, device=device, dtype=gf.float64, **kwargs)
    x = gf.randn(3, 2, 2, dtype=gf.float64, device=device, requires_grad=True)
    slots = layer.num_layers * (2 if layer.bidirectional else 1)
    h0 = gf.randn(slots, 2, layer.proj_size or 2, dtype=gf.float64, device=device,
                  requires_grad=True)
    c0 = gf.randn(slots, 2, 2, dtype=gf.float64, device=device, requires_grad=True)
    params = list(layer.parameters())

    def run(x, h0, c0, *params):
        state = (h0, c0) if name == "LSTM" else h0
        return tuple(_flatten(layer(x, state)))

    assert gf.gradcheck(run, [x, h0, c0, *params])


@pytest.mark.parametrize("name", ["RNNCell", "LSTMCell", "GRUCell"])
def test_cell_gradcheck(name, device):
    cell = getattr(gf.nn, name)(3, 2, device=device, dtype=gf.float64)
    x = gf.randn(2, 3, dtype=gf.float64, device=device, requires_grad=True)
    h = gf.randn(2, 2, dtype=gf.float64, device=device, requires_grad=True)
    c = gf.randn(2, 2, dtype=gf.float64, device=device, requires_grad=True)
    params = list(cell.parameters())

    def run(x, h, c, *params):
        return cell(x, (h, c)) if name == "LSTMCell" else cell(x, h)

    assert gf.gradcheck(run, [x, h, c, *params])


SHAPE_CASES = {
    "lstm_batch_first_bidirectional": (
        "LSTM", dict(num_layers=3, batch_first=True, bidirectional=True), (2, 7, 4),
        [(2, 7, 10), (6, 2, 5), (6, 2, 5)]),
    "gru_unbatched": ("GRU", dict(num_layers=2), (7, 4), [(7, 5), (2, 5)]),
    "rnn_time_major": ("RNN", dict(), (7, 2, 4), [(7, 2, 5), (1, 2, 5)]),
    "lstm_proj_unbatched": ("LSTM", dict(proj_size=3), (7, 4),
                            [(7, 3), (1, 3), (1, 5)]),
}


@pytest.mark.parametrize("case", list(SHAPE_CASES))
def test_sequence_layer_shapes(case, device):
    name, kwargs, input_shape, expected = SHAPE_CASES[case]
    layer = getattr(gf.nn, name)(4, 5, device=device, **kwargs)
    got = _flatten(layer(gf.randn(*input_shape, device=device)))
    assert [tuple(t.shape) for t in got] == expected


def test_parameter_names_match_torch():
    torch = pytest.importorskip("torch")
    for name, kwargs in (("LSTM", dict(num_layers=2, bidirectional=True, proj_size=2)),
                         ("GRU", dict(bias=False)), ("RNN", dict(num_layers=2)),
                         ("LSTMCell", dict()), ("GRUCell", dict(bias=False))):
        reference = getattr(torch.nn, name)(3, 4, **kwargs)
        layer = getattr(gf.nn, name)(3, 4, **kwargs)
        theirs = [(n, tuple(p.shape)) for n, p in reference.state_dict().items()]
        mine = [(n, tuple(p.shape)) for n, p in layer.state_dict().items()]
        assert mine == theirs, name


def test_initial_weights_are_bounded():
    layer = gf.nn.LSTM(3, 16)
    bound = 1 / np.sqrt(16)
    for param in layer.parameters():
        values = to_host(param)
        assert np.abs(values).max() <= bound
        assert values.std() > bound / 4


# -- backpropagation through time -------------------------------------------


def test_bptt_across_calls_equals_one_call(device):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 2, 3))
    whole = gf.nn.LSTM(3, 4, device=device, dtype=gf.float64)
    split = gf.nn.LSTM(3, 4, device=device, dtype=gf.float64)
    split.load_state_dict(whole.state_dict())
    out, _ = whole(device_tensor(x, device))
    (out * out).sum().backward()
    first, state = split(device_tensor(x[:3], device))
    second, _ = split(device_tensor(x[3:], device), state)
    ((first * first).sum() + (second * second).sum()).backward()
    for (name, mine), (_, theirs) in zip(split.named_parameters(),
                                         whole.named_parameters()):
        assert_close(mine.grad, to_host(theirs.grad))


def test_truncated_bptt_stops_at_detached_state(device):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 2, 3))
    layer = gf.nn.GRU(3, 4, device=device, dtype=gf.float64)
    fresh = gf.nn.GRU(3, 4, device=device, dtype=gf.float64)
    fresh.load_state_dict(layer.state_dict())
    first, h = layer(device_tensor(x[:3], device))
    first.sum().backward()
    layer.zero_grad()
    h = h.detach()
    second, _ = layer(device_tensor(x[3:], device), h)
    second.sum().backward()
    constant_h = device_tensor(to_host(h), device)
    expected, _ = fresh(device_tensor(x[3:], device), constant_h)
    expected.sum().backward()
    for (name, mine), (_, theirs) in zip(layer.named_parameters(),
                                         fresh.named_parameters()):
        assert_close(mine.grad, to_host(theirs.grad))


@pytest.mark.parametrize("name", ["RNN", "LSTM", "GRU"])
def test_carried_state_without_detach_raises(name, device):
    layer = getattr(gf.nn, name)(3, 4, device=device)
    out, state = layer(gf.randn(5, 2, 3, device=device))
    out.sum().backward()
    with pytest.raises(GraphFreedError, match=r"h = h\.detach\(\)"):
        layer(gf.randn(5, 2, 3, device=device), state)


def test_carried_cell_state_without_detach_raises(device):
    cell = gf.nn.LSTMCell(3, 4, device=device)
    h, c = cell(gf.randn(2, 3, device=device))
    h.sum().backward()
    with pytest.raises(GraphFreedError, match="detach"):
        cell(gf.randn(2, 3, device=device), (h, c))


def test_carried_state_after_retain_graph_is_accepted(device):
    layer = gf.nn.LSTM(3, 4, device=device)
    out, state = layer(gf.randn(5, 2, 3, device=device))
    out.sum().backward(retain_graph=True)
    again, _ = layer(gf.randn(5, 2, 3, device=device), state)
    again.sum().backward()
    assert layer.weight_hh_l0.grad is not None


def test_carried_state_accepted_without_grad(device):
    layer = gf.nn.GRU(3, 4, device=device)
    out, h = layer(gf.randn(5, 2, 3, device=device))
    out.sum().backward()
    with gf.no_grad():
        out, _ = layer(gf.randn(5, 2, 3, device=device), h)
    assert not out.requires_grad


# -- dropout and argument checks ---------------------------------------------


def test_dropout_between_layers(device):
    layer = gf.nn.LSTM(3, 8, num_layers=2, dropout=0.5, device=device)
    plain = gf.nn.LSTM(3, 8, num_layers=2, device=device)
    plain.load_state_dict(layer.state_dict())
    x = gf.randn(4, 2, 3, device=device)
    first, _ = layer(x)
    second, _ = layer(x)
    layer.eval()
    evaluated, _ = layer(x)
    expected, _ = plain(x)
    assert not np.allclose(to_host(first), to_host(second))
    assert_close(evaluated, to_host(expected), tol=0)


def test_single_layer_ignores_dropout(device):
    layer = gf.nn.GRU(3, 8, dropout=0.5, device=device)
    x = gf.randn(4, 2, 3, device=device)
    first, _ = layer(x)
    second, _ = layer(x)
    assert_close(first, to_host(second), tol=0)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="nonlinearity"):
        gf.nn.RNN(3, 4, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="nonlinearity"):
        gf.nn.RNNCell(3, 4, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="proj_size"):
        gf.nn.LSTM(3, 4, proj_size=4)
    with pytest.raises(ValueError, match="hidden_size"):
        gf.nn.LSTM(3, 0)
    with pytest.raises(ValueError, match="input_size"):
        gf.nn.GRUCell(0, 4)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        gf.nn.LSTM(3, 4, dropout=1.5)


def test_invalid_inputs_raise(device):
    layer = gf.nn.LSTM(3, 4, num_layers=2, device=device)
    with pytest.raises(ValueError, match="input_size=3"):
        layer(gf.randn(5, 2, 4, device=device))
    h = gf.zeros(1, 2, 4, device=device)
    with pytest.raises(ValueError, match=r"h_0 must have shape \(2, 2, 4\)"):
        layer(gf.randn(5, 2, 3, device=device), (h, h))
    with pytest.raises(TypeError, match="pair"):
        layer(gf.randn(5, 2, 3, device=device), gf.zeros(2, 2, 4, device=device))
    with pytest.raises(TypeError, match="floating-point"):
        layer(gf.ones(5, 2, 3, dtype=gf.int64, device=device))
