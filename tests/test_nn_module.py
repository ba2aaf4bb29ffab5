"""gradflow.nn: Module, Parameter, the basic layers, containers and init."""

import math

import numpy as np
import pytest
from conftest import to_host

import gradflow as gf
from gradflow import nn
from gradflow.nn._layers import LinearFunction


class Affine(nn.Module):
    def __init__(self, size=3):
        super().__init__()
        self.scale = nn.Parameter(gf.ones(size))
        self.shift = nn.Parameter(gf.zeros(size))
        self.register_buffer("count", gf.zeros(1))
        self.register_buffer("scratch", gf.zeros(2), persistent=False)

    def forward(self, x):
        return x * self.scale + self.shift


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = Affine()
        self.second = Affine()
        self.note = "not registered"

    def forward(self, x):
        return self.second(self.first(x))


# -- Parameter ----------------------------------------------------------------


def test_parameter_requires_grad():
    assert nn.Parameter(gf.zeros(2)).requires_grad


def test_parameter_is_tensor():
    assert isinstance(nn.Parameter(gf.zeros(2)), gf.Tensor)


def test_parameter_shares_data():
    source = gf.zeros(2)
    assert nn.Parameter(source).data is source.data


def test_parameter_frozen():
    assert not nn.Parameter(gf.zeros(2), requires_grad=False).requires_grad


def test_parameter_repr():
    assert repr(nn.Parameter(gf.zeros(1))).startswith("Parameter containing:")


def test_parameter_rejects_integer_grad():
    with pytest.raises(TypeError, match="floating-point"):
        nn.Parameter(gf.tensor([1, 2]))


def test_parameter_op_result_is_tensor():
    out = nn.Parameter(gf.ones(2)) * 2
    assert type(out) is gf.Tensor


# -- registration and traversal -----------------------------------------------


def test_module_registers_parameters():
    names = [name for name, _ in Pair().named_parameters()]
    assert names == ["first.scale", "first.shift", "second.scale", "second.shift"]


def test_module_registers_buffers():
    names = [name for name, _ in Pair().named_buffers()]
    assert names == ["first.count", "first.scratch", "second.count", "second.scratch"]


def test_module_plain_attribute():
    module = Pair()
    assert "note" not in dict(module.named_children())
    assert module.note == "not registered"


def test_module_children_and_modules():
    module = Pair()
    assert [name for name, _ in module.named_children()] == ["first", "second"]
    assert [name for name, _ in module.named_modules()] == ["", "first", "second"]
    assert len(list(module.modules())) == 3


def test_module_parameters_no_recurse():
    assert list(Pair().parameters(recurse=False)) == []


def test_module_shared_parameter_once():
    module = Pair()
    module.second.scale = module.first.scale
    params = list(module.parameters())
    assert len(params) == 3
    assert "second.scale" in module.state_dict()


def test_module_shared_child_once():
    module = Pair()
    module.second = module.first
    assert len(list(module.parameters())) == 2
    assert len(list(module.modules())) == 2


def test_module_reassign_keeps_order():
    module = Pair()
    module.first = Affine()
    assert list(module.state_dict())[0] == "first.scale"


def test_module_parameter_none():
    module = nn.Module()
    module.register_parameter("bias", None)
    assert module.bias is None
    assert list(module.parameters()) == []


def test_module_assign_tensor_to_parameter_rejected():
    module = Affine()
    with pytest.raises(TypeError, match="which is a Parameter"):
        module.scale = gf.ones(3)


def test_module_assign_buffer():
    module = Affine()
    module.count = gf.ones(1)
    np.testing.assert_array_equal(to_host(module.state_dict()["count"]), [1.0])


def test_module_register_existing_name():
    module = Pair()
    with pytest.raises(KeyError, match="already exists"):
        module.register_buffer("note", gf.zeros(1))


def test_module_register_dotted_name():
    with pytest.raises(KeyError, match="no '.'"):
        nn.Module().register_parameter("a.b", nn.Parameter(gf.zeros(1)))


def test_module_register_wrong_type():
    with pytest.raises(TypeError, match="gf.nn.Parameter"):
        nn.Module().register_parameter("w", gf.zeros(1))


def test_module_before_init():
    class Broken(nn.Module):
        def __init__(self):
            self.weight = nn.Parameter(gf.zeros(1))

    with pytest.raises(AttributeError, match="super\\(\\).__init__\\(\\)"):
        Broken()


def test_module_delattr():
    module = Affine()
    del module.shift
    assert [name for name, _ in module.named_parameters()] == ["scale"]


def test_module_missing_attribute():
    with pytest.raises(AttributeError, match="no attribute 'weight'"):
        Affine().weight


def test_module_get_submodule():
    module = nn.Sequential(Pair())
    assert module.get_submodule("0.second") is module[0].second


def test_module_forward_missing():
    with pytest.raises(NotImplementedError, match="no forward"):
        nn.Module()(gf.ones(1))


def test_module_call_runs_forward():
    out = Affine()(gf.full((3,), 2.0))
    np.testing.assert_array_equal(to_host(out), [2.0, 2.0, 2.0])


def test_module_apply_order():
    visited = []
    Pair().apply(lambda m: visited.append(type(m).__name__))
    assert visited == ["Affine", "Affine", "Pair"]


def test_module_repr_nested():
    text = repr(nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU())))
    expected = (
        "Sequential(\n"
        "  (0): Linear(in_features=2, out_features=3, bias=True)\n"
        "  (1): Sequential(\n"
        "    (0): ReLU()\n"
        "  )\n"
        ")"
    )
    assert text == expected


# -- modes and gradients ------------------------------------------------------


def test_module_train_eval():
    module = nn.Sequential(nn.Dropout(), Pair())
    module.eval()
    assert not any(m.training for m in module.modules())
    module.train()
    assert all(m.training for m in module.modules())


def test_module_train_rejects_non_bool():
    with pytest.raises(TypeError, match="bool"):
        Pair().train("yes")


def test_module_zero_grad_to_none():
    module = Affine()
    module(gf.ones(3)).sum().backward()
    module.zero_grad()
    assert module.scale.grad is None


def test_module_zero_grad_in_place():
    module = Affine()
    module(gf.ones(3)).sum().backward()
    grad = module.scale.grad
    module.zero_grad(set_to_none=False)
    assert module.scale.grad is grad
    np.testing.assert_array_equal(to_host(grad), np.zeros(3))


def test_module_requires_grad_off():
    module = Pair().requires_grad_(False)
    assert not any(p.requires_grad for p in module.parameters())


# -- freezing -----------------------------------------------------------------


def _record_linear_backward(monkeypatch):
    calls = []
    original = LinearFunction.backward

    def recording(ctx, grad):
        result = original(ctx, grad)
        calls.append((ctx.needs_input_grad, result))
        return result

    monkeypatch.setattr(LinearFunction, "backward", staticmethod(recording))
    return calls


def test_frozen_weight_gets_no_grad(device, monkeypatch):
    calls = _record_linear_backward(monkeypatch)
    layer = nn.Linear(3, 2, device=device)
    layer.weight.requires_grad_(False)
    x = gf.randn(4, 3, device=device, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is None
    assert x.grad is not None
    assert len(calls) == 1
    assert calls[0][0] == (True, False, True)
    assert calls[0][1][1] is None


def test_frozen_weight_skips_matmul(device, monkeypatch):
    calls = _record_linear_backward(monkeypatch)
    layer = nn.Linear(3, 2, device=device)
    layer.weight.requires_grad_(False)
    layer(gf.randn(4, 3, device=device)).sum().backward()
    assert layer.weight.grad is None
    assert layer.bias.grad is not None
    assert calls[0][0] == (False, False, True)
    # Neither the input's nor the weight's gradient product was computed.
    assert calls[0][1][0] is None
    assert calls[0][1][1] is None


def test_frozen_layer_records_nothing(device, monkeypatch):
    calls = _record_linear_backward(monkeypatch)
    layer = nn.Linear(3, 2, device=device).requires_grad_(False)
    x = gf.randn(4, 3, device=device, requires_grad=True)
    (layer(x) * x[:, :2]).sum().backward()
    assert calls[0][0] == (True, False, False)


# -- to(), dtype and device ---------------------------------------------------


def test_module_to_double_keeps_objects():
    module = Pair()
    params = list(module.parameters())
    module.to(gf.float64)
    assert list(module.parameters()) == params
    assert all(p.dtype == gf.float64 for p in params)


def test_module_to_casts_buffers():
    module = Pair().double()
    assert module.first.count.dtype == gf.float64
    assert module.first.scratch.dtype == gf.float64


def test_module_to_keeps_integer_buffer():
    module = nn.Module()
    module.register_buffer("steps", gf.tensor([3]))
    module.to(gf.float64)
    assert module.steps.dtype == gf.int64


def test_module_float_casts_grad():
    module = Affine().double()
    module(gf.ones(3, dtype=gf.float64)).sum().backward()
    module.float()
    assert module.scale.grad.dtype == gf.float32


def test_module_to_device(device):
    module = Pair().to(device)
    assert all(p.device == device for p in module.parameters())
    assert all(b.device == device for b in module.buffers())


def test_module_to_rejects_integer_dtype():
    with pytest.raises(TypeError, match="floating-point"):
        Pair().to(gf.int32)


def test_module_to_device_and_dtype(device):
    module = Pair().to(device, gf.float64)
    assert module.first.scale.dtype == gf.float64
    assert module.first.scale.device == device


# -- state_dict ---------------------------------------------------------------


def test_state_dict_keys():
    keys = list(Pair().state_dict())
    assert keys == ["first.scale", "first.shift", "first.count", "second.scale",
                    "second.shift", "second.count"]


def test_state_dict_detached():
    state = Affine().state_dict()
    assert not state["scale"].requires_grad
    assert not isinstance(state["scale"], nn.Parameter)


def test_state_dict_shares_memory():
    module = Affine()
    assert module.state_dict()["scale"].data is module.scale.data


def test_state_dict_keep_vars():
    module = Affine()
    assert module.state_dict(keep_vars=True)["scale"] is module.scale


def test_state_dict_round_trip(device):
    source = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(device)
    target = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(device)
    result = target.load_state_dict(source.state_dict())
    assert result.missing_keys == []
    assert result.unexpected_keys == []
    x = gf.randn(5, 3, device=device)
    np.testing.assert_array_equal(to_host(target(x)), to_host(source(x)))


def test_load_state_dict_keeps_objects():
    module = Affine()
    scale = module.scale
    module.load_state_dict({k: v.clone() * 2 for k, v in Affine().state_dict().items()})
    assert module.scale is scale
    np.testing.assert_array_equal(to_host(scale.detach()), [2.0, 2.0, 2.0])


def test_load_state_dict_converts_dtype():
    module = Affine()
    state = {k: v.double() + 1 for k, v in module.state_dict().items()}
    module.load_state_dict(state)
    assert module.scale.dtype == gf.float32
    np.testing.assert_array_equal(to_host(module.scale.detach()), [2.0, 2.0, 2.0])


def test_load_state_dict_converts_device(device):
    module = Affine().to(device)
    module.load_state_dict({k: v.cpu() + 1 for k, v in Affine().state_dict().items()})
    assert module.scale.device == device
    np.testing.assert_array_equal(to_host(module.scale.detach()), [2.0, 2.0, 2.0])


def test_load_state_dict_accepts_numpy():
    module = Affine()
    state = {k: to_host(v) + 1 for k, v in module.state_dict().items()}
    module.load_state_dict(state)
    np.testing.assert_array_equal(to_host(module.shift.detach()), [1.0, 1.0, 1.0])


def test_load_state_dict_missing_key():
    state = Affine().state_dict()
    del state["shift"]
    with pytest.raises(RuntimeError, match="missing key\\(s\\): 'shift'"):
        Affine().load_state_dict(state)


def test_load_state_dict_unexpected_key():
    state = Affine().state_dict()
    state["extra"] = gf.zeros(1)
    with pytest.raises(RuntimeError, match="unexpected key\\(s\\): 'extra'"):
        Affine().load_state_dict(state)


def test_load_state_dict_shape_mismatch():
    state = Affine().state_dict()
    state["scale"] = gf.zeros(4)
    with pytest.raises(RuntimeError, match=r"'scale': shape \(4,\).*shape \(3,\)"):
        Affine().load_state_dict(state)


def test_load_state_dict_lists_all_problems():
    state = Affine().state_dict()
    del state["shift"]
    state["extra"] = gf.zeros(1)
    state["scale"] = gf.zeros(4)
    with pytest.raises(RuntimeError) as info:
        Affine().load_state_dict(state)
    message = str(info.value)
    assert "'shift'" in message
    assert "'extra'" in message
    assert "'scale': shape (4,)" in message


def test_load_state_dict_changes_nothing_on_error():
    module = Affine()
    state = {k: v + 5 for k, v in module.state_dict().items()}
    state["count"] = gf.zeros(7)
    with pytest.raises(RuntimeError, match="nothing was changed"):
        module.load_state_dict(state)
    np.testing.assert_array_equal(to_host(module.scale.detach()), np.ones(3))


def test_load_state_dict_non_strict():
    state = Affine().state_dict()
    del state["shift"]
    state["extra"] = gf.zeros(1)
    result = Affine().load_state_dict(state, strict=False)
    assert result.missing_keys == ["shift"]
    assert result.unexpected_keys == ["extra"]


def test_load_state_dict_non_strict_shape_raises():
    state = Affine().state_dict()
    state["scale"] = gf.zeros(4)
    with pytest.raises(RuntimeError, match="does not match"):
        Affine().load_state_dict(state, strict=False)


def test_load_state_dict_rejects_non_mapping():
    with pytest.raises(TypeError, match="mapping"):
        Affine().load_state_dict([1, 2])


def test_load_state_dict_bumps_version():
    module = Affine()
    version = module.scale._version[0]
    module.load_state_dict(Affine().state_dict())
    assert module.scale._version[0] == version + 1


# -- Linear -------------------------------------------------------------------


def test_linear_matches_torch(device):
    torch = pytest.importorskip("torch")
    ours = nn.Linear(3, 4, device=device, dtype=gf.float64)
    theirs = torch.nn.Linear(3, 4, dtype=torch.float64)
    with torch.no_grad():
        theirs.weight.copy_(torch.tensor(to_host(ours.weight.detach())))
        theirs.bias.copy_(torch.tensor(to_host(ours.bias.detach())))
    x = np.random.default_rng(0).standard_normal((5, 3))
    x_ours = gf.tensor(x, device=device, requires_grad=True)
    x_theirs = torch.tensor(x, requires_grad=True)
    out, expected = ours(x_ours), theirs(x_theirs)
    np.testing.assert_allclose(to_host(out.detach()), expected.detach().numpy())
    (out * out).sum().backward()
    (expected * expected).sum().backward()
    np.testing.assert_allclose(to_host(x_ours.grad), x_theirs.grad.numpy())
    np.testing.assert_allclose(to_host(ours.weight.grad), theirs.weight.grad.numpy())
    np.testing.assert_allclose(to_host(ours.bias.grad), theirs.bias.grad.numpy())


def test_linear_gradcheck(device):
    layer = nn.Linear(3, 2, device=device, dtype=gf.float64)
    x = gf.randn(4, 3, dtype=gf.float64, device=device, requires_grad=True)
    assert gf.gradcheck(
        lambda a, w, b: gf.nn.functional.linear(a, w, b),
        (x, layer.weight, layer.bias),
    )


def test_linear_init_bounds(device):
    layer = nn.Linear(400, 300, device=device)
    bound = 1 / math.sqrt(400)
    weight, bias = to_host(layer.weight.detach()), to_host(layer.bias.detach())
    assert np.abs(weight).max() <= bound
    assert np.abs(bias).max() <= bound
    # U(-b, b) has standard deviation b / sqrt(3).
    assert abs(weight.std() - bound / math.sqrt(3)) < 0.02 * bound


def test_linear_no_bias(device):
    layer = nn.Linear(3, 2, bias=False, device=device)
    assert layer.bias is None
    assert [name for name, _ in layer.named_parameters()] == ["weight"]
    assert layer(gf.ones(1, 3, device=device)).shape == (1, 2)


def test_linear_dtype_and_device(device):
    layer = nn.Linear(3, 2, device=device, dtype=gf.float64)
    assert layer.weight.dtype == gf.float64
    assert layer.weight.device == device


def test_linear_reproducible_init():
    gf.manual_seed(7)
    first = to_host(nn.Linear(5, 5).weight.detach())
    gf.manual_seed(7)
    second = to_host(nn.Linear(5, 5).weight.detach())
    np.testing.assert_array_equal(first, second)


def test_linear_rejects_negative_size():
    with pytest.raises(ValueError, match="in_features"):
        nn.Linear(-1, 2)


# -- activation modules and Dropout -------------------------------------------


ACTIVATION_MODULES = [
    (nn.ReLU(), gf.nn.functional.relu),
    (nn.LeakyReLU(0.1), lambda x: gf.nn.functional.leaky_relu(x, 0.1)),
    (nn.GELU(approximate="tanh"), lambda x: gf.nn.functional.gelu(x, "tanh")),
    (nn.Tanh(), gf.tanh),
    (nn.Sigmoid(), gf.sigmoid),
    (nn.SiLU(), gf.nn.functional.silu),
    (nn.Softplus(beta=2.0), lambda x: gf.nn.functional.softplus(x, beta=2.0)),
    (nn.Softmax(dim=0), lambda x: gf.nn.functional.softmax(x, dim=0)),
    (nn.LogSoftmax(dim=1), lambda x: gf.nn.functional.log_softmax(x, dim=1)),
    (nn.Identity(7, key="ignored"), lambda x: x),
]


@pytest.mark.parametrize("module, function", ACTIVATION_MODULES,
                         ids=[type(m).__name__ for m, _ in ACTIVATION_MODULES])
def test_activation_module_matches_function(device, module, function):
    x = gf.randn(3, 4, device=device)
    np.testing.assert_array_equal(to_host(module(x)), to_host(function(x)))


def test_flatten_module(device):
    assert nn.Flatten()(gf.ones(2, 3, 4, device=device)).shape == (2, 12)


def test_gelu_rejects_mode():
    with pytest.raises(ValueError, match="approximate"):
        nn.GELU(approximate="fast")


def test_dropout_module_eval_identity(device):
    layer = nn.Dropout(0.5).eval()
    x = gf.randn(100, device=device)
    np.testing.assert_array_equal(to_host(layer(x)), to_host(x))


def test_dropout_module_train_zeroes(device):
    out = to_host(nn.Dropout(0.5)(gf.ones(1000, device=device)))
    assert 0.4 < (out == 0).mean() < 0.6


def test_dropout_module_rejects_p():
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        nn.Dropout(1.5)


# -- containers ---------------------------------------------------------------


def _three_layers():
    return nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))


def test_sequential_forward(device):
    model = _three_layers().to(device)
    x = gf.randn(4, 2, device=device)
    expected = model[2](model[1](model[0](x)))
    np.testing.assert_array_equal(to_host(model(x)), to_host(expected))


def test_sequential_index_and_len():
    model = _three_layers()
    assert len(model) == 3
    assert isinstance(model[-1], nn.Linear)
    assert [type(m).__name__ for m in model] == ["Linear", "ReLU", "Linear"]


def test_sequential_slice():
    model = _three_layers()
    head = model[:2]
    assert isinstance(head, nn.Sequential)
    assert len(head) == 2
    assert head[0] is model[0]


def test_sequential_append():
    model = _three_layers().append(nn.Sigmoid())
    assert len(model) == 4
    assert "3" in dict(model.named_children())


def test_sequential_delete_renumbers():
    model = _three_layers()
    del model[0]
    model.append(nn.Tanh())
    assert [name for name, _ in model.named_children()] == ["0", "1", "2"]


def test_sequential_setitem():
    model = _three_layers()
    model[1] = nn.Tanh()
    assert isinstance(model[1], nn.Tanh)
    assert [name for name, _ in model.named_children()] == ["0", "1", "2"]


def test_sequential_named_dict():
    model = nn.Sequential({"encoder": nn.Linear(2, 2), "act": nn.ReLU()})
    assert list(model.state_dict()) == ["encoder.weight", "encoder.bias"]


def test_sequential_index_out_of_range():
    with pytest.raises(IndexError, match="out of range"):
        _three_layers()[3]


def test_module_list_registers():
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])

    names = [name for name, _ in Stack().named_parameters()]
    assert names[:2] == ["layers.0.weight", "layers.0.bias"]
    assert len(names) == 6


def test_module_list_operations():
    layers = nn.ModuleList([nn.ReLU(), nn.Tanh()])
    layers.append(nn.Sigmoid())
    layers.insert(0, nn.Identity())
    assert [type(m).__name__ for m in layers] == ["Identity", "ReLU", "Tanh", "Sigmoid"]
    del layers[1]
    assert [name for name, _ in layers.named_children()] == ["0", "1", "2"]
    assert isinstance(layers[1:], nn.ModuleList)
    assert len(layers[1:]) == 2


def test_module_list_no_forward():
    with pytest.raises(NotImplementedError, match="ModuleList"):
        nn.ModuleList()(gf.ones(1))


def test_module_dict():
    layers = nn.ModuleDict({"a": nn.Linear(1, 1)})
    layers["b"] = nn.ReLU()
    assert list(layers.keys()) == ["a", "b"]
    assert "a" in layers
    assert list(layers.state_dict()) == ["a.weight", "a.bias"]


# -- init ---------------------------------------------------------------------


def _statistics(tensor):
    values = to_host(tensor.detach())
    return values.mean(), values.std()


INIT_CASES = [
    ("xavier_uniform", lambda t: nn.init.xavier_uniform_(t, gain=2.0),
     2.0 * math.sqrt(2.0 / (300 + 200))),
    ("xavier_normal", nn.init.xavier_normal_, math.sqrt(2.0 / (300 + 200))),
    ("kaiming_uniform", lambda t: nn.init.kaiming_uniform_(t, nonlinearity="relu"),
     math.sqrt(2.0) / math.sqrt(200)),
    ("kaiming_normal_fan_out",
     lambda t: nn.init.kaiming_normal_(t, mode="fan_out", nonlinearity="relu"),
     math.sqrt(2.0) / math.sqrt(300)),
    ("kaiming_leaky", lambda t: nn.init.kaiming_normal_(t, a=0.2),
     math.sqrt(2.0 / 1.04) / math.sqrt(200)),
    ("normal", lambda t: nn.init.normal_(t, mean=0.0, std=0.3), 0.3),
    ("uniform", lambda t: nn.init.uniform_(t, -0.5, 0.5), 1 / math.sqrt(12)),
]


@pytest.mark.parametrize("name, fill, std", INIT_CASES, ids=[c[0] for c in INIT_CASES])
def test_init_statistics(device, name, fill, std):
    weight = nn.Parameter(gf.empty(300, 200, device=device))
    assert fill(weight) is weight
    mean, measured = _statistics(weight)
    # 60,000 samples: the standard error of the std is about 0.3 % of it.
    assert abs(mean) < 0.02 * std
    assert abs(measured - std) < 0.02 * std


def test_init_conv_fans(device):
    weight = gf.empty(16, 8, 3, 3, device=device)
    nn.init.kaiming_normal_(weight, nonlinearity="relu")
    _, measured = _statistics(weight)
    expected = math.sqrt(2.0) / math.sqrt(8 * 9)
    assert abs(measured - expected) < 0.05 * expected


def test_init_uniform_range(device):
    values = to_host(nn.init.uniform_(gf.empty(1000, device=device), 2.0, 3.0))
    assert values.min() >= 2.0
    assert values.max() < 3.0


def test_init_constant_fills(device):
    weight = nn.Parameter(gf.empty(2, 3, device=device))
    nn.init.constant_(weight, 0.5)
    np.testing.assert_array_equal(to_host(weight.detach()), np.full((2, 3), 0.5))
    assert weight.requires_grad


def test_init_zeros_ones(device):
    np.testing.assert_array_equal(to_host(nn.init.zeros_(gf.empty(3, device=device))),
                                  np.zeros(3))
    np.testing.assert_array_equal(to_host(nn.init.ones_(gf.empty(3, device=device))),
                                  np.ones(3))


def test_init_reproducible(device):
    gf.manual_seed(11)
    first = to_host(nn.init.normal_(gf.empty(50, device=device)))
    gf.manual_seed(11)
    second = to_host(nn.init.normal_(gf.empty(50, device=device)))
    np.testing.assert_array_equal(first, second)


def test_init_float16(device):
    weight = nn.init.xavier_uniform_(gf.empty(20, 10, dtype=gf.float16, device=device))
    assert weight.dtype == gf.float16
    assert np.abs(to_host(weight)).max() <= math.sqrt(6 / 30) * 1.001


def test_init_rejects_1d():
    with pytest.raises(ValueError, match="at least 2 dimensions.*\\(5,\\)"):
        nn.init.xavier_uniform_(gf.empty(5))


def test_init_rejects_mode():
    with pytest.raises(ValueError, match="fan_in"):
        nn.init.kaiming_uniform_(gf.empty(2, 2), mode="fan_avg")


def test_init_empty_tensor_no_op():
    weight = gf.empty(0, 4)
    assert nn.init.kaiming_uniform_(weight) is weight


@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (4, 4), (6, 2, 2)],
                         ids=["wide", "tall", "square", "conv"])
def test_orthogonal_is_orthogonal(device, shape):
    weight = nn.Parameter(gf.empty(*shape, device=device))
    assert nn.init.orthogonal_(weight) is weight
    matrix = to_host(weight.detach()).reshape(shape[0], -1).astype(np.float64)
    small = min(matrix.shape)
    gram = matrix @ matrix.T if matrix.shape[0] == small else matrix.T @ matrix
    np.testing.assert_allclose(gram, np.eye(small), atol=1e-5)
    assert weight.requires_grad


def test_orthogonal_gain(device):
    weight = nn.init.orthogonal_(gf.empty(4, 4, dtype=gf.float64, device=device),
                                 gain=3.0)
    matrix = to_host(weight)
    np.testing.assert_allclose(matrix @ matrix.T, 9.0 * np.eye(4), atol=1e-12)


def test_orthogonal_reproducible(device):
    gf.manual_seed(5)
    first = to_host(nn.init.orthogonal_(gf.empty(3, 3, device=device)))
    gf.manual_seed(5)
    second = to_host(nn.init.orthogonal_(gf.empty(3, 3, device=device)))
    np.testing.assert_array_equal(first, second)


def test_orthogonal_rejects_1d():
    with pytest.raises(ValueError, match="at least 2 dimensions.*\\(5,\\)"):
        nn.init.orthogonal_(gf.empty(5))


def _truncated_normal_moments(mean, std, a, b):
    """Return the mean and variance of N(mean, std^2) truncated to [a, b]."""
    alpha, beta = (a - mean) / std, (b - mean) / std

    def pdf(z):
        return math.exp(-z * z / 2) / math.sqrt(2 * math.pi)

    def cdf(z):
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))

    mass = cdf(beta) - cdf(alpha)
    shift = (pdf(alpha) - pdf(beta)) / mass
    spread = (alpha * pdf(alpha) - beta * pdf(beta)) / mass
    return mean + std * shift, std**2 * (1 + spread - shift**2)


TRUNC_CASES = [
    ("default", 0.0, 1.0, -2.0, 2.0),
    ("asymmetric", 0.5, 2.0, -1.0, 3.0),
    ("one_tail", 0.0, 1.0, 1.0, 4.0),
    ("small_std", 0.0, 0.02, -0.04, 0.04),
]


@pytest.mark.parametrize("name, mean, std, a, b", TRUNC_CASES,
                         ids=[c[0] for c in TRUNC_CASES])
def test_trunc_normal_bounds_and_moments(device, name, mean, std, a, b):
    weight = nn.Parameter(gf.empty(100_000, device=device))
    assert nn.init.trunc_normal_(weight, mean, std, a, b) is weight
    values = to_host(weight.detach()).astype(np.float64)
    expected_mean, expected_var = _truncated_normal_moments(mean, std, a, b)
    assert values.min() >= a
    assert values.max() <= b
    # 100,000 samples: the standard errors of both moments are at most about
    # 0.45 % of the truncated std and variance, so each bound is 4 or more.
    assert abs(values.mean() - expected_mean) < 0.02 * math.sqrt(expected_var)
    assert abs(values.var() - expected_var) < 0.02 * expected_var


def test_trunc_normal_reproducible(device):
    gf.manual_seed(3)
    first = to_host(nn.init.trunc_normal_(gf.empty(50, device=device)))
    gf.manual_seed(3)
    second = to_host(nn.init.trunc_normal_(gf.empty(50, device=device)))
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("kwargs, message", [
    ({"std": 0.0}, "std must be positive, got 0.0"),
    ({"a": 1.0, "b": 1.0}, r"a \(1.0\) must be less than b \(1.0\)"),
], ids=["zero_std", "empty_interval"])
def test_trunc_normal_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        nn.init.trunc_normal_(gf.empty(4), **kwargs)


GAINS = [
    ("linear", None, 1.0), ("conv2d", None, 1.0), ("sigmoid", None, 1.0),
    ("tanh", None, 5.0 / 3.0), ("relu", None, math.sqrt(2.0)),
    ("leaky_relu", None, math.sqrt(2.0 / (1 + 0.01**2))),
    ("leaky_relu", 0.2, math.sqrt(2.0 / 1.04)), ("selu", None, 0.75),
]


@pytest.mark.parametrize("nonlinearity, param, expected", GAINS)
def test_calculate_gain(nonlinearity, param, expected):
    assert nn.init.calculate_gain(nonlinearity, param) == pytest.approx(expected)


def test_calculate_gain_matches_torch():
    torch = pytest.importorskip("torch")
    for nonlinearity, param, _ in GAINS:
        expected = torch.nn.init.calculate_gain(nonlinearity, param)
        assert nn.init.calculate_gain(nonlinearity, param) == pytest.approx(expected)


def test_calculate_gain_rejects_unknown():
    with pytest.raises(ValueError, match="unsupported nonlinearity 'swish'"):
        nn.init.calculate_gain("swish")


# -- parameter vectors ----------------------------------------------------------


def _two_layers(device):
    return nn.Sequential(nn.Linear(3, 2, device=device), nn.Linear(2, 1, device=device))


def test_parameters_to_vector_order(device):
    model = _two_layers(device)
    vector = nn.utils.parameters_to_vector(model.parameters())
    expected = np.concatenate([to_host(p.detach()).ravel() for p in model.parameters()])
    assert vector.shape == (11,)
    np.testing.assert_array_equal(to_host(vector.detach()), expected)


def test_parameters_to_vector_gradient(device):
    model = _two_layers(device)
    weights = gf.arange(11, device=device).float()
    (nn.utils.parameters_to_vector(model.parameters()) * weights).sum().backward()
    np.testing.assert_array_equal(to_host(model[0].weight.grad),
                                  np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(to_host(model[1].bias.grad), [10.0])


def test_parameters_to_vector_matches_torch():
    torch = pytest.importorskip("torch")
    arrays = [np.arange(6.0).reshape(2, 3), np.array(7.0), np.ones((2, 1, 2))]
    ours = nn.utils.parameters_to_vector([gf.tensor(a) for a in arrays])
    theirs = torch.nn.utils.parameters_to_vector([torch.tensor(a) for a in arrays])
    np.testing.assert_array_equal(to_host(ours), theirs.numpy())


def test_vector_to_parameters_round_trip(device):
    model = _two_layers(device)
    values = gf.arange(11, device=device).float()
    nn.utils.vector_to_parameters(values, model.parameters())
    np.testing.assert_array_equal(to_host(model[0].weight.detach()),
                                  np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(to_host(model[1].bias.detach()), [10.0])
    vector = nn.utils.parameters_to_vector(model.parameters())
    np.testing.assert_array_equal(to_host(vector.detach()), np.arange(11))


def test_vector_to_parameters_keeps_objects(device):
    model = _two_layers(device)
    weight = model[0].weight
    nn.utils.vector_to_parameters(gf.zeros(11, dtype=gf.float64, device=device),
                                  model.parameters())
    assert model[0].weight is weight
    assert weight.dtype == gf.float32
    assert weight.requires_grad


def test_vector_to_parameters_bumps_version(device):
    model = _two_layers(device)
    before = model[0].weight._version[0]
    nn.utils.vector_to_parameters(gf.zeros(11, device=device), model.parameters())
    assert model[0].weight._version[0] == before + 1


@pytest.mark.parametrize("shape", [(10,), (12,), (11, 1)], ids=["short", "long", "2d"])
def test_vector_to_parameters_rejects_size(device, shape):
    model = _two_layers(device)
    with pytest.raises(ValueError, match=r"1-D with 11 elements.*got shape"):
        nn.utils.vector_to_parameters(gf.zeros(*shape, device=device),
                                      model.parameters())


def test_vector_to_parameters_rejects_array():
    with pytest.raises(TypeError, match="vec must be a Tensor, got ndarray"):
        nn.utils.vector_to_parameters(np.zeros(3), [gf.zeros(3)])


def test_parameter_vector_rejects_empty():
    with pytest.raises(ValueError, match="parameters is empty"):
        nn.utils.parameters_to_vector([])


def test_parameter_vector_rejects_non_tensor():
    with pytest.raises(TypeError, match="parameter 1 is a list"):
        nn.utils.parameters_to_vector([gf.zeros(2), [1.0]])


def test_deepcopy_copies_parameters():
    import copy

    model = gf.nn.Linear(3, 2)
    copied = copy.deepcopy(model)
    assert isinstance(copied.weight, gf.nn.Parameter)
    assert copied.weight.requires_grad
    assert copied.weight.data is not model.weight.data
    assert np.array_equal(copied.weight.data, model.weight.data)


def test_deepcopy_rejects_non_leaf():
    import copy

    x = gf.tensor([1.0], requires_grad=True)
    with pytest.raises(gf.GraphError, match="leaf"):
        copy.deepcopy(x * 2)
