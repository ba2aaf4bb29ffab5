"""Tests of gradflow.optim: updates against torch.optim, groups, checks, state."""

import numpy as np
import pytest

import gradflow as gf
from conftest import to_host

SHAPES = [(3, 4), (5,), ()]
STEPS = 6

SGD_CASES = [
    {},
    {"momentum": 0.9},
    {"momentum": 0.9, "dampening": 0.3, "weight_decay": 0.01},
    {"momentum": 0.8, "nesterov": True, "weight_decay": 0.1},
    {"momentum": 0.5, "maximize": True},
]
ADAM_CASES = [
    {},
    {"betas": (0.8, 0.99), "eps": 1e-6},
    {"weight_decay": 0.1},
    {"amsgrad": True, "weight_decay": 0.05},
    {"maximize": True},
    {"betas": (0.0, 0.0)},
]


def _params(device):
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal(shape) for shape in SHAPES]
    params = [gf.tensor(a, device=device, requires_grad=True) for a in arrays]
    return arrays, params


def _gradients(step):
    rng = np.random.default_rng(100 + step)
    return [rng.standard_normal(shape) for shape in SHAPES]


def _run_against_torch(device, gf_class, torch_class, options, lr):
    torch = pytest.importorskip("torch")
    arrays, params = _params(device)
    torch_params = [torch.tensor(a, requires_grad=True) for a in arrays]
    opt = gf_class(params, lr=lr, **options)
    torch_opt = torch_class(torch_params, lr=lr, **options)
    for step in range(STEPS):
        for p, tp, g in zip(params, torch_params, _gradients(step)):
            p.grad = gf.tensor(g, device=device)
            tp.grad = torch.tensor(g)
        opt.step()
        torch_opt.step()
    return params, torch_params


def _assert_close(param, torch_param):
    # Float64 on both sides; the updates differ only in rounding order.
    expected = torch_param.detach().numpy()
    np.testing.assert_allclose(to_host(param), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("options", SGD_CASES)
def test_sgd_matches_torch(device, options):
    torch = pytest.importorskip("torch")
    params, expected = _run_against_torch(
        device, gf.optim.SGD, torch.optim.SGD, options, lr=0.05
    )
    for p, tp in zip(params, expected):
        _assert_close(p, tp)


@pytest.mark.parametrize("options", ADAM_CASES)
def test_adam_matches_torch(device, options):
    torch = pytest.importorskip("torch")
    params, expected = _run_against_torch(
        device, gf.optim.Adam, torch.optim.Adam, options, lr=0.01
    )
    for p, tp in zip(params, expected):
        _assert_close(p, tp)


@pytest.mark.parametrize("options", ADAM_CASES + [{"weight_decay": 0.0}])
def test_adamw_matches_torch(device, options):
    torch = pytest.importorskip("torch")
    params, expected = _run_against_torch(
        device, gf.optim.AdamW, torch.optim.AdamW, options, lr=0.01
    )
    for p, tp in zip(params, expected):
        _assert_close(p, tp)


def test_sgd_descends_quadratic(device):
    x = gf.tensor([3.0, -2.0], dtype=gf.float64, device=device, requires_grad=True)
    opt = gf.optim.SGD([x], lr=0.1, momentum=0.5)
    for _ in range(100):
        opt.zero_grad()
        (x * x).sum().backward()
        opt.step()
    assert np.abs(to_host(x)).max() < 1e-6


def test_adam_float32_stays_float32(device):
    x = gf.tensor([1.0, 2.0], device=device, requires_grad=True)
    opt = gf.optim.Adam([x])
    x.grad = gf.ones_like(x)
    opt.step()
    assert x.dtype == gf.float32
    assert opt.state[x]["exp_avg"].dtype == gf.float32


def test_state_on_parameter_device(device):
    x = gf.tensor([1.0, 2.0], device=device, requires_grad=True)
    opt = gf.optim.Adam([x], amsgrad=True)
    x.grad = gf.ones_like(x)
    opt.step()
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert opt.state[x][key].device == x.device


def test_step_skips_parameter_without_grad():
    a = gf.tensor([1.0], requires_grad=True)
    b = gf.tensor([1.0], requires_grad=True)
    opt = gf.optim.SGD([a, b], lr=1.0, momentum=0.9)
    a.grad = gf.tensor([1.0])
    opt.step()
    assert b.item() == 1.0
    assert b not in opt.state
    assert a.item() == 0.0


def test_step_bumps_version():
    x = gf.tensor([1.0], requires_grad=True)
    opt = gf.optim.SGD([x], lr=0.1)
    x.grad = gf.tensor([1.0])
    before = x._version[0]
    opt.step()
    assert x._version[0] == before + 1


def test_step_updates_in_place():
    x = gf.tensor([1.0, 2.0], requires_grad=True)
    array = x.data
    opt = gf.optim.Adam([x])
    x.grad = gf.tensor([1.0, 1.0])
    opt.step()
    assert x.data is array


def test_step_invalidates_saved_tensor():
    x = gf.tensor([1.0, 2.0], requires_grad=True)
    loss = (x * x).sum()
    opt = gf.optim.SGD([x], lr=0.1)
    x.grad = gf.tensor([1.0, 1.0])
    opt.step()
    with pytest.raises(gf.InplaceModificationError):
        loss.backward()


def test_step_records_nothing():
    x = gf.tensor([1.0], requires_grad=True)
    opt = gf.optim.SGD([x], lr=0.1)
    x.grad = gf.tensor([2.0])
    opt.step()
    assert x.grad_fn is None
    assert x.requires_grad


def test_step_closure_returns_loss():
    x = gf.tensor([2.0], requires_grad=True)
    opt = gf.optim.SGD([x], lr=0.25)

    def closure():
        opt.zero_grad()
        loss = (x * x).sum()
        loss.backward()
        return loss

    with gf.no_grad():
        loss = opt.step(closure)
    assert loss.item() == 4.0
    assert x.item() == 1.0


def test_zero_grad_sets_none():
    x = gf.tensor([1.0], requires_grad=True)
    opt = gf.optim.SGD([x])
    x.grad = gf.tensor([3.0])
    opt.zero_grad()
    assert x.grad is None


def test_zero_grad_fills_zeros():
    x = gf.tensor([1.0, 2.0], requires_grad=True)
    opt = gf.optim.SGD([x])
    x.grad = gf.tensor([3.0, 4.0])
    grad = x.grad
    opt.zero_grad(set_to_none=False)
    assert x.grad is grad
    assert to_host(x.grad).tolist() == [0.0, 0.0]


def test_zero_grad_detaches_graph_grad():
    x = gf.tensor([1.0, 2.0], dtype=gf.float64, requires_grad=True)
    (x * x * x).sum().backward(create_graph=True)
    assert x.grad.grad_fn is not None
    opt = gf.optim.SGD([x])
    opt.zero_grad(set_to_none=False)
    assert x.grad.grad_fn is None
    assert to_host(x.grad).tolist() == [0.0, 0.0]


def test_param_groups_options():
    a = gf.tensor([1.0], requires_grad=True)
    b = gf.tensor([1.0], requires_grad=True)
    opt = gf.optim.SGD([{"params": [a]}, {"params": b, "lr": 0.5}], lr=0.1)
    a.grad = gf.tensor([1.0])
    b.grad = gf.tensor([1.0])
    opt.step()
    assert opt.param_groups[0]["lr"] == 0.1
    assert opt.param_groups[1]["lr"] == 0.5
    assert a.item() == pytest.approx(0.9)
    assert b.item() == pytest.approx(0.5)


def test_add_param_group_defaults():
    a = gf.tensor([1.0], requires_grad=True)
    b = gf.tensor([1.0], requires_grad=True)
    opt = gf.optim.Adam([a], lr=0.01, betas=(0.5, 0.6))
    opt.add_param_group({"params": [b], "lr": 0.1})
    group = opt.param_groups[1]
    assert group["lr"] == 0.1
    assert group["betas"] == (0.5, 0.6)
    assert group["params"][0] is b


def test_accepts_generator():
    params = [gf.tensor([1.0], requires_grad=True) for _ in range(3)]
    opt = gf.optim.SGD(p for p in params)
    assert len(opt.param_groups[0]["params"]) == 3


def test_repr_lists_options():
    opt = gf.optim.SGD([gf.tensor([1.0], requires_grad=True)], lr=0.25)
    assert "lr: 0.25" in repr(opt)


# -- input checks ---------------------------------------------------------------

def _param():
    return gf.tensor([1.0, 2.0], requires_grad=True)


@pytest.mark.parametrize("make", [gf.optim.SGD, gf.optim.Adam, gf.optim.AdamW])
def test_rejects_empty_list(make):
    with pytest.raises(ValueError, match="empty parameter list"):
        make([])


@pytest.mark.parametrize("option", ["lr", "momentum", "weight_decay", "dampening"])
def test_sgd_rejects_negative(option):
    with pytest.raises(ValueError, match=f"invalid {option}"):
        gf.optim.SGD([_param()], **{option: -0.1})


@pytest.mark.parametrize("option", ["lr", "eps", "weight_decay"])
def test_adam_rejects_negative(option):
    with pytest.raises(ValueError, match=f"invalid {option}"):
        gf.optim.Adam([_param()], **{option: -1e-3})


@pytest.mark.parametrize("betas", [(1.0, 0.9), (0.9, 1.0), (-0.1, 0.9), (0.9, 1.5)])
def test_adam_rejects_betas(betas):
    with pytest.raises(ValueError, match="betas"):
        gf.optim.AdamW([_param()], betas=betas)


def test_adam_rejects_short_betas():
    with pytest.raises(TypeError, match="pair"):
        gf.optim.Adam([_param()], betas=(0.9,))


def test_group_rejects_negative_lr():
    opt = gf.optim.SGD([_param()], lr=0.1)
    with pytest.raises(ValueError, match="invalid lr"):
        opt.add_param_group({"params": [_param()], "lr": -1.0})


def test_sgd_rejects_lr_string():
    with pytest.raises(TypeError, match="lr must be a number"):
        gf.optim.SGD([_param()], lr="0.1")


@pytest.mark.parametrize("options", [{}, {"momentum": 0.9, "dampening": 0.1}])
def test_nesterov_needs_momentum(options):
    with pytest.raises(ValueError, match="nesterov"):
        gf.optim.SGD([_param()], nesterov=True, **options)


def test_rejects_duplicate_in_group():
    p = _param()
    with pytest.raises(ValueError, match="more than once"):
        gf.optim.SGD([p, p])


def test_rejects_duplicate_across_groups():
    p = _param()
    opt = gf.optim.SGD([p])
    with pytest.raises(ValueError, match="more than once"):
        opt.add_param_group({"params": [p]})
    assert len(opt.param_groups) == 1


def test_rejects_integer_param():
    with pytest.raises(TypeError, match="floating-point"):
        gf.optim.Adam([gf.tensor([1, 2])])


def test_rejects_non_leaf():
    x = _param()
    with pytest.raises(ValueError, match="leaf"):
        gf.optim.SGD([x * 2])


def test_rejects_set():
    with pytest.raises(TypeError, match="not a set"):
        gf.optim.SGD({_param()})


def test_rejects_non_tensor():
    with pytest.raises(TypeError, match="only optimize Tensors"):
        gf.optim.SGD([np.ones(3)])


def test_rejects_group_without_params():
    opt = gf.optim.SGD([_param()])
    with pytest.raises(TypeError, match="'params'"):
        opt.add_param_group({"lr": 0.1})


# -- state_dict -----------------------------------------------------------------

def _trained_adam(steps, amsgrad=False):
    _, params = _params("cpu")
    opt = gf.optim.Adam(
        [{"params": params[:2]}, {"params": params[2:], "lr": 0.02}],
        lr=0.01, amsgrad=amsgrad,
    )
    for step in range(steps):
        for p, g in zip(params, _gradients(step)):
            p.grad = gf.tensor(g)
        opt.step()
    return params, opt


def test_state_dict_keys_by_index():
    _, opt = _trained_adam(2)
    state = opt.state_dict()
    assert sorted(state["state"]) == [0, 1, 2]
    assert state["param_groups"][0]["params"] == [0, 1]
    assert state["param_groups"][1]["params"] == [2]
    assert state["state"][2]["step"] == 2


def test_state_dict_resumes_exactly():
    params, _ = _trained_adam(STEPS, amsgrad=True)
    ref_params, ref = _trained_adam(3, amsgrad=True)
    copy_params = [gf.tensor(p.data, requires_grad=True) for p in ref_params]
    resumed = gf.optim.Adam(
        [{"params": copy_params[:2]}, {"params": copy_params[2:]}], lr=0.5,
    )
    resumed.load_state_dict(ref.state_dict())
    for step in range(3, STEPS):
        for p, g in zip(copy_params, _gradients(step)):
            p.grad = gf.tensor(g)
        resumed.step()
    assert resumed.param_groups[1]["lr"] == 0.02
    for p, q in zip(params, copy_params):
        np.testing.assert_array_equal(to_host(p), to_host(q))


def test_load_state_dict_copies_tensors():
    params, opt = _trained_adam(1)
    state = opt.state_dict()
    opt.load_state_dict(state)
    assert opt.state[params[0]]["exp_avg"] is not state["state"][0]["exp_avg"]


def test_load_state_dict_casts_dtype():
    params, opt = _trained_adam(1)
    state = opt.state_dict()
    floats = [gf.tensor(p.data, dtype=gf.float32, requires_grad=True) for p in params]
    target = gf.optim.Adam([{"params": floats[:2]}, {"params": floats[2:]}])
    target.load_state_dict(state)
    assert target.state[floats[0]]["exp_avg"].dtype == gf.float32


def test_load_state_dict_onto_device(device):
    params, opt = _trained_adam(1)
    moved = [gf.tensor(p.data, device=device, requires_grad=True) for p in params]
    target = gf.optim.Adam([{"params": moved[:2]}, {"params": moved[2:]}])
    target.load_state_dict(opt.state_dict())
    assert target.state[moved[1]]["exp_avg_sq"].device == moved[1].device


def test_load_rejects_group_count():
    _, opt = _trained_adam(1)
    other = gf.optim.Adam([_param()])
    with pytest.raises(ValueError, match="2 parameter group"):
        other.load_state_dict(opt.state_dict())


def test_load_rejects_group_size_unchanged():
    _, opt = _trained_adam(1)
    a, b = _param(), _param()
    other = gf.optim.Adam([{"params": [a]}, {"params": [b]}], lr=0.3)
    with pytest.raises(ValueError, match="group 0 has 2"):
        other.load_state_dict(opt.state_dict())
    assert other.param_groups[0]["lr"] == 0.3
    assert other.state == {}


def test_load_rejects_shape_mismatch():
    _, opt = _trained_adam(1)
    wrong = [gf.tensor(np.zeros(s), requires_grad=True) for s in [(4, 3), (5,), ()]]
    other = gf.optim.Adam([{"params": wrong[:2]}, {"params": wrong[2:]}])
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(opt.state_dict())
    assert other.state == {}


def test_load_rejects_bad_index():
    _, opt = _trained_adam(1)
    state = opt.state_dict()
    state["state"][7] = state["state"].pop(0)
    with pytest.raises(ValueError, match="not a parameter index"):
        opt.load_state_dict(state)


def test_load_rejects_non_state_dict():
    opt = gf.optim.SGD([_param()])
    with pytest.raises(ValueError, match="'state' and 'param_groups'"):
        opt.load_state_dict({"lr": 0.1})


def test_sgd_state_dict_round_trip():
    x = gf.tensor([1.0, 2.0], dtype=gf.float64, requires_grad=True)
    opt = gf.optim.SGD([x], lr=0.1, momentum=0.9)
    x.grad = gf.tensor([1.0, -1.0], dtype=gf.float64)
    opt.step()
    y = gf.tensor(x.data, requires_grad=True)
    other = gf.optim.SGD([y], lr=0.1, momentum=0.9)
    other.load_state_dict(opt.state_dict())
    for target, optimizer in ((x, opt), (y, other)):
        target.grad = gf.tensor([0.5, 0.5], dtype=gf.float64)
        optimizer.step()
    np.testing.assert_array_equal(to_host(x), to_host(y))


def test_resumes_through_save_load(tmp_path):
    params, _ = _trained_adam(STEPS, amsgrad=True)
    ref_params, ref = _trained_adam(3, amsgrad=True)
    gf.save({"optimizer": ref.state_dict()}, tmp_path / "opt.safetensors")
    copies = [gf.tensor(p.data, requires_grad=True) for p in ref_params]
    resumed = gf.optim.Adam(
        [{"params": copies[:2]}, {"params": copies[2:]}], amsgrad=True
    )
    resumed.load_state_dict(gf.load(tmp_path / "opt.safetensors")["optimizer"])
    for step in range(3, STEPS):
        for p, g in zip(copies, _gradients(step)):
            p.grad = gf.tensor(g)
        resumed.step()
    for p, q in zip(params, copies):
        np.testing.assert_array_equal(to_host(p), to_host(q))
