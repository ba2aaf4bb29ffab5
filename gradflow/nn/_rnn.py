"""Recurrent layers: RNN, LSTM and GRU over whole sequences, and their cells.

Weights, gate order, shapes and defaults follow PyTorch's layers, so the
state_dict of a PyTorch layer (``torch.nn.LSTM`` for ``LSTM``, and so on)
loads unchanged. Each time
step is a handful of gradflow ops, so backward is backpropagation through
time over every step of the call, on NumPy and CuPy alike.

For truncated BPTT, carry the returned state into the next call detached
(``h = h.detach()``): a state that still points into a graph whose saved
arrays an earlier backward freed is rejected with a ``GraphFreedError``.
"""

import collections
import math

from .. import _ops
from .._factories import rand, zeros
from .._ops._common import check_float
from .._tensor import Tensor
from ..autograd import _grad_mode
from ..errors import GraphFreedError
from ._dropout import check_dropout_p, dropout
from ._module import Module, Parameter

__all__ = ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell"]

# Gate blocks stacked in weight_ih / weight_hh, in PyTorch's order:
# LSTM (input, forget, cell, output), GRU (reset, update, new).
_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}

# How many records behind a carried state are searched for a freed one. A
# state returned by these layers is at most one record (the stack of final
# states) away from a record that a backward through it freed. A state
# transformed further may hide the freed record deeper, and then the later
# backward raises the engine's less specific GraphFreedError instead.
_FREED_SEARCH_LIMIT = 64


def check_carried_state(layer, state):
    """Raise GraphFreedError if ``state`` leads into a graph freed by backward."""
    if state is None or state.grad_fn is None or not _grad_mode.is_grad_enabled():
        return
    # Breadth first, so the records nearest to the state are searched first.
    queue = collections.deque([state.grad_fn])
    seen = set()
    while queue and len(seen) < _FREED_SEARCH_LIMIT:
        record = queue.popleft()
        if record in seen:
            continue
        seen.add(record)
        if record._released:
            raise GraphFreedError(
                f"{layer}: the hidden state passed in (shape "
                f"{tuple(state.shape)}) is still attached to the graph of an "
                "earlier call, whose saved arrays a backward through it has "
                "already freed. For truncated backpropagation through time, detach "
                "the state you carry between segments (h = h.detach(), and "
                "c = c.detach() for an LSTM). To backpropagate through both "
                "segments, pass retain_graph=True to the earlier backward."
            )
        queue.extend(e[0] for e in record.edges if type(e) is tuple)


def _uniform_parameter(shape, bound, device, dtype):
    values = rand(*shape, dtype=dtype, device=device) * (2 * bound) - bound
    return Parameter(values)


# -- one time step --------------------------------------------------------
#
# ``x_proj`` is input @ weight_ih.T + bias_ih for this step, already
# computed for the whole sequence in one matmul. For RNN and LSTM it also
# contains bias_hh, since the two biases are simply summed. GRU's bias_hh
# is inside the reset gate's product, so it is passed separately.


def rnn_step(x_proj, h, weight_hh_t, activation):
    return activation(x_proj + h @ weight_hh_t)


def lstm_step(x_proj, state, weight_hh_t, weight_hr_t=None):
    h, c = state
    gates = x_proj + h @ weight_hh_t
    i, f, g, o = _ops.chunk(gates, 4, axis=-1)
    c = _ops.sigmoid(f) * c + _ops.sigmoid(i) * _ops.tanh(g)
    h = _ops.sigmoid(o) * _ops.tanh(c)
    if weight_hr_t is not None:
        h = h @ weight_hr_t
    return h, c


def gru_step(x_proj, h, weight_hh_t, bias_hh):
    hidden = h @ weight_hh_t
    if bias_hh is not None:
        hidden = hidden + bias_hh
    x_r, x_z, x_n = _ops.chunk(x_proj, 3, axis=-1)
    h_r, h_z, h_n = _ops.chunk(hidden, 3, axis=-1)
    r = _ops.sigmoid(x_r + h_r)
    z = _ops.sigmoid(x_z + h_z)
    n = _ops.tanh(x_n + r * h_n)
    return n + z * (h - n)


def _activation(nonlinearity):
    if nonlinearity == "tanh":
        return _ops.tanh
    if nonlinearity == "relu":
        return _ops.relu
    raise ValueError(
        f"RNN: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}"
    )


def _check_input(layer, x, expected_ndim, input_size):
    if not isinstance(x, Tensor):
        raise TypeError(f"{layer}: input must be a Tensor, got {type(x).__name__}")
    if x.ndim not in expected_ndim or x.shape[-1] != input_size:
        dims = " or ".join(f"{n}-D" for n in expected_ndim)
        raise ValueError(
            f"{layer}: expected a {dims} input whose last axis is input_size="
            f"{input_size}, got shape {tuple(x.shape)}"
        )
    check_float(layer, x)


def _check_state(layer, name, state, shape):
    if tuple(state.shape) != tuple(shape):
        raise ValueError(
            f"{layer}: {name} must have shape {tuple(shape)} for this input, "
            f"got {tuple(state.shape)}"
        )
    check_carried_state(layer, state)


# -- cells ----------------------------------------------------------------


class _CellBase(Module):
    def __init__(self, input_size, hidden_size, bias, gates, device, dtype):
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            _check_positive(type(self).__name__, name, value)
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)
        self.bias = bool(bias)
        bound = 1.0 / math.sqrt(hidden_size)
        rows = gates * hidden_size
        self.weight_ih = _uniform_parameter((rows, input_size), bound, device, dtype)
        self.weight_hh = _uniform_parameter((rows, hidden_size), bound, device, dtype)
        if bias:
            self.bias_ih = _uniform_parameter((rows,), bound, device, dtype)
            self.bias_hh = _uniform_parameter((rows,), bound, device, dtype)
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)

    def extra_repr(self):
        text = f"{self.input_size}, {self.hidden_size}"
        return text if self.bias else text + ", bias=False"

    def _project(self, x, fold_bias_hh):
        x_proj = x @ self.weight_ih.T
        if self.bias:
            bias = self.bias_ih + self.bias_hh if fold_bias_hh else self.bias_ih
            x_proj = x_proj + bias
        return x_proj

    def _prepare(self, x):
        """Return ``x`` as (N, input_size), and whether it came with a batch axis."""
        _check_input(type(self).__name__, x, (1, 2), self.input_size)
        batched = x.ndim == 2
        if not batched:
            x = x.unsqueeze(0)
        return x, batched

    def _initial(self, x, hx, batched, name="hx"):
        layer = type(self).__name__
        shape = (x.shape[0], self.hidden_size)
        if hx is None:
            return zeros(*shape, dtype=x.dtype, device=x.device)
        if not batched:
            hx = hx.unsqueeze(0)
        _check_state(layer, name, hx, shape)
        return hx


class RNNCell(_CellBase):
    """One step of an Elman RNN: h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh).

    ``input`` is (N, input_size) or (input_size,), ``hx`` (N, hidden_size)
    or (hidden_size,) and defaults to zeros. Returns h' of hx's shape.
    ``nonlinearity`` is "tanh" or "relu".

    >>> cell = gf.nn.RNNCell(3, 5)
    >>> cell(gf.randn(2, 3)).shape
    (2, 5)
    """

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh",
                 device=None, dtype=None):
        _activation(nonlinearity)
        super().__init__(input_size, hidden_size, bias, 1, device, dtype)
        self.nonlinearity = nonlinearity

    def forward(self, input, hx=None):
        x, batched = self._prepare(input)
        h = self._initial(x, hx, batched)
        x_proj = self._project(x, fold_bias_hh=True)
        h = rnn_step(x_proj, h, self.weight_hh.T, _activation(self.nonlinearity))
        return h if batched else h.squeeze(0)


class LSTMCell(_CellBase):
    """One LSTM step, returning (h', c').

    Gates are i, f, g, o (input, forget, cell, output) in that order along
    the rows of ``weight_ih`` and ``weight_hh``: c' = f * c + i * g and
    h' = o * tanh(c'). ``hx`` is a pair (h, c), each (N, hidden_size) or
    (hidden_size,), and defaults to zeros.

    >>> h, c = gf.nn.LSTMCell(3, 5)(gf.randn(2, 3))
    """

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, 4, device, dtype)

    def forward(self, input, hx=None):
        x, batched = self._prepare(input)
        h0, c0 = (None, None) if hx is None else _pair("LSTMCell", hx)
        h = self._initial(x, h0, batched, "h_0")
        c = self._initial(x, c0, batched, "c_0")
        x_proj = self._project(x, fold_bias_hh=True)
        h, c = lstm_step(x_proj, (h, c), self.weight_hh.T)
        if not batched:
            return h.squeeze(0), c.squeeze(0)
        return h, c


class GRUCell(_CellBase):
    """One GRU step, with gates r, z, n (reset, update, new) in that order.

    n = tanh(x W_in^T + b_in + r * (h W_hn^T + b_hn)) and
    h' = (1 - z) * n + z * h, as in PyTorch. Shapes as for ``RNNCell``.

    >>> gf.nn.GRUCell(3, 5)(gf.randn(2, 3)).shape
    (2, 5)
    """

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, 3, device, dtype)

    def forward(self, input, hx=None):
        x, batched = self._prepare(input)
        h = self._initial(x, hx, batched)
        x_proj = self._project(x, fold_bias_hh=False)
        h = gru_step(x_proj, h, self.weight_hh.T, self.bias_hh)
        return h if batched else h.squeeze(0)


def _pair(layer, hx):
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        raise TypeError(
            f"{layer}: hx must be a pair (h_0, c_0) of tensors, got "
            f"{type(hx).__name__}"
        )
    return hx[0], hx[1]


# -- whole sequences ------------------------------------------------------


class RNNBase(Module):
    """The shared machinery of ``RNN``, ``LSTM`` and ``GRU`` (see those)."""

    def __init__(self, mode, input_size, hidden_size, num_layers=1, bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, proj_size=0,
                 device=None, dtype=None):
        super().__init__()
        _check_sizes(mode, input_size, hidden_size, num_layers, proj_size)
        self.mode = mode
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = check_dropout_p(type(self).__name__, dropout)
        self.bidirectional = bool(bidirectional)
        self.proj_size = int(proj_size)
        self._make_weights(device, dtype)

    def _make_weights(self, device, dtype):
        rows = _GATES[self.mode] * self.hidden_size
        bound = 1.0 / math.sqrt(self.hidden_size)
        real_hidden = self.proj_size or self.hidden_size
        directions = 2 if self.bidirectional else 1
        for layer in range(self.num_layers):
            width = self.input_size if layer == 0 else real_hidden * directions
            for suffix in ("", "_reverse")[:directions]:
                shapes = [("weight_ih", (rows, width)),
                          ("weight_hh", (rows, real_hidden))]
                if self.bias:
                    shapes += [("bias_ih", (rows,)), ("bias_hh", (rows,))]
                if self.proj_size:
                    shapes.append(("weight_hr", (self.proj_size, self.hidden_size)))
                for kind, shape in shapes:
                    param = _uniform_parameter(shape, bound, device, dtype)
                    setattr(self, f"{kind}_l{layer}{suffix}", param)

    def extra_repr(self):
        text = f"{self.input_size}, {self.hidden_size}"
        for name, default in (("num_layers", 1), ("bias", True),
                              ("batch_first", False), ("dropout", 0.0),
                              ("bidirectional", False), ("proj_size", 0)):
            value = getattr(self, name)
            if value != default:
                text += f", {name}={value}"
        return text

    def forward(self, input, hx=None):
        """Run the layers over the sequence (the subclasses document the shapes)."""
        layer_name = type(self).__name__
        _check_input(layer_name, input, (2, 3), self.input_size)
        batched = input.ndim == 3
        x = input if batched else input.unsqueeze(1)
        if batched and self.batch_first:
            x = x.transpose(0, 1)
        states = self._initial_states(x, hx, batched)
        output, finals = self._run_layers(x, states)
        if batched and self.batch_first:
            output = output.transpose(0, 1)
        finals = tuple(_ops.stack(parts, axis=0) for parts in finals)
        if not batched:
            output = output.squeeze(1)
            finals = tuple(f.squeeze(1) for f in finals)
        return output, (finals if self.mode == "LSTM" else finals[0])

    def _state_shapes(self, batch):
        slots = self.num_layers * (2 if self.bidirectional else 1)
        h_shape = (slots, batch, self.proj_size or self.hidden_size)
        if self.mode == "LSTM":
            return [("h_0", h_shape), ("c_0", (slots, batch, self.hidden_size))]
        return [("hx", h_shape)]

    def _initial_states(self, x, hx, batched):
        """Return per-state lists of (N, size) tensors, one per layer and direction."""
        shapes = self._state_shapes(x.shape[1])
        if hx is None:
            passed = [None] * len(shapes)
        elif self.mode == "LSTM":
            passed = list(_pair(type(self).__name__, hx))
        else:
            passed = [hx]
        states = []
        for (name, shape), state in zip(shapes, passed):
            if state is None:
                state = zeros(*shape, dtype=x.dtype, device=x.device)
            else:
                state = state if batched else state.unsqueeze(1)
                _check_state(type(self).__name__, name, state, shape)
            states.append([s.squeeze(0) for s in _ops.split(state, 1, axis=0)])
        return states

    def _run_layers(self, x, states):
        directions = 2 if self.bidirectional else 1
        finals = [[] for _ in states]
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                slot = layer * directions + direction
                initial = [s[slot] for s in states]
                out, last = self._run_direction(x, layer, direction, initial)
                outputs.append(out)
                for bucket, value in zip(finals, last):
                    bucket.append(value)
            x = outputs[0] if directions == 1 else _ops.cat(outputs, axis=-1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = dropout(x, self.dropout, training=True)
        return x, finals

    def _run_direction(self, x, layer, direction, initial):
        """Run one layer in one direction over time-major ``x`` (L, N, features)."""
        name = f"l{layer}" + ("_reverse" if direction else "")
        weights = self._weights(name)
        # One (N, gates * H) block of rows per time step.
        steps = _ops.split(self._project(x, weights), x.shape[1], axis=0)
        order = range(len(steps) - 1, -1, -1) if direction else range(len(steps))
        state = initial[0] if self.mode != "LSTM" else tuple(initial)
        outputs = [None] * len(steps)
        for t in order:
            state = self._step(steps[t], state, weights)
            outputs[t] = state[0] if self.mode == "LSTM" else state
        last = state if self.mode == "LSTM" else (state,)
        return _ops.stack(outputs, axis=0), last

    def _weights(self, name):
        weights = {
            "ih": getattr(self, f"weight_ih_{name}"),
            "hh_t": getattr(self, f"weight_hh_{name}").T,
            "b_ih": getattr(self, f"bias_ih_{name}") if self.bias else None,
            "b_hh": getattr(self, f"bias_hh_{name}") if self.bias else None,
        }
        if self.proj_size:
            weights["hr_t"] = getattr(self, f"weight_hr_{name}").T
        return weights

    def _project(self, x, weights):
        """Return the (L * N, gates * H) input projection of (L, N, features) ``x``."""
        x_proj = x.reshape(-1, x.shape[-1]) @ weights["ih"].T
        if weights["b_ih"] is None:
            return x_proj
        if self.mode == "GRU":
            return x_proj + weights["b_ih"]
        return x_proj + (weights["b_ih"] + weights["b_hh"])

    def _step(self, x_proj, state, weights):
        if self.mode == "LSTM":
            return lstm_step(x_proj, state, weights["hh_t"], weights.get("hr_t"))
        if self.mode == "GRU":
            return gru_step(x_proj, state, weights["hh_t"], weights["b_hh"])
        activation = _ops.tanh if self.mode == "RNN_TANH" else _ops.relu
        return rnn_step(x_proj, state, weights["hh_t"], activation)


def _check_sizes(mode, input_size, hidden_size, num_layers, proj_size):
    layer = {"RNN_TANH": "RNN", "RNN_RELU": "RNN"}.get(mode, mode)
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                        ("num_layers", num_layers)):
        _check_positive(layer, name, value)
    if proj_size and mode != "LSTM":
        raise ValueError(f"{layer}: proj_size is supported by LSTM only")
    if not 0 <= proj_size < hidden_size:
        raise ValueError(
            f"{layer}: proj_size must be in [0, hidden_size={hidden_size}), "
            f"got {proj_size}"
        )


def _check_positive(layer, name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{layer}: {name} must be a positive int, got {value!r}")


_SEQUENCE_SHAPES = """
    ``input`` is (L, N, input_size), or (N, L, input_size) with
    ``batch_first=True``, or unbatched (L, input_size). ``output`` has the
    same layout with D * H features (D = 2 if bidirectional, else 1), from
    the last layer at every step. Final states are (num_layers * D, N, H),
    ordered layer by layer with the forward direction first, and
    ``batch_first`` does not apply to them."""


class RNN(RNNBase):
    """A multi-layer Elman RNN over a sequence, returning ``(output, h_n)``.

    Each step is h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh), with
    ``nonlinearity`` "tanh" or "relu". ``hx`` is h_0 and defaults to zeros.
    In training mode, ``dropout`` is applied to the outputs of every layer
    but the last.
    """ + _SEQUENCE_SHAPES + """

    >>> rnn = gf.nn.RNN(3, 5, num_layers=2)
    >>> out, h_n = rnn(gf.randn(7, 2, 3))
    >>> out.shape, h_n.shape
    ((7, 2, 5), (2, 2, 5))
    """

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh",
                 bias=True, batch_first=False, dropout=0.0, bidirectional=False,
                 device=None, dtype=None):
        _activation(nonlinearity)
        mode = "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU"
        super().__init__(mode, input_size, hidden_size, num_layers, bias,
                         batch_first, dropout, bidirectional, 0, device, dtype)
        self.nonlinearity = nonlinearity


class LSTM(RNNBase):
    """A multi-layer LSTM over a sequence, returning ``(output, (h_n, c_n))``.

    ``hx`` is ``(h_0, c_0)`` and defaults to zeros. With ``proj_size`` P > 0,
    each layer's hidden state is projected to P features by ``weight_hr``,
    so ``output`` and h_n have P features per direction (c_n keeps H).
    """ + _SEQUENCE_SHAPES + """

    >>> lstm = gf.nn.LSTM(3, 5, batch_first=True)
    >>> out, (h_n, c_n) = lstm(gf.randn(2, 7, 3))
    >>> out.shape, c_n.shape
    ((2, 7, 5), (1, 2, 5))
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, proj_size=0,
                 device=None, dtype=None):
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias,
                         batch_first, dropout, bidirectional, proj_size, device, dtype)


class GRU(RNNBase):
    """A multi-layer GRU over a sequence, returning ``(output, h_n)``.

    The gates are those of ``GRUCell``. ``hx`` is h_0 and defaults to zeros.
    """ + _SEQUENCE_SHAPES + """

    >>> out, h_n = gf.nn.GRU(3, 5)(gf.randn(7, 2, 3))
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False,
                 device=None, dtype=None):
        super().__init__("GRU", input_size, hidden_size, num_layers, bias,
                         batch_first, dropout, bidirectional, 0, device, dtype)
