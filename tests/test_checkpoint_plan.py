"""checkpoint_plan: the two-level and binomial schedules under a memory budget."""

import numpy as np
import pytest

import gradflow as gf
from gradflow.checkpoint import _revolve
from gradflow.checkpoint._plan import LayerProfile, plan_for_profiles


def _chain(depth, width=16):
    blocks = [gf.nn.Sequential(gf.nn.Linear(width, width), gf.nn.GELU())
              for _ in range(depth)]
    return gf.nn.Sequential(*blocks)


def _uniform_profiles(count, boundary=100, internal=100):
    return [LayerProfile(internal, True, False, boundary if i else 0, boundary, 1.0)
            for i in range(count)]


def _param_grads(model, run, x):
    model.zero_grad()
    run(x).sum().backward()
    return [p.grad.numpy().copy() for p in model.parameters()]


@pytest.mark.parametrize("steps", [1, 2, 5, 16, 40])
@pytest.mark.parametrize("snapshots", [1, 2, 3, 6])
def test_binomial_count_formula(steps, snapshots):
    actions = gf.checkpoint.binomial_schedule(steps, snapshots)
    advances = sum(1 for kind, _ in actions if kind == "advance")
    assert advances == gf.checkpoint.binomial_forward_count(steps, snapshots)
    assert advances == _revolve._cost(steps, min(snapshots, steps) - 1)[0]


def test_binomial_known_values():
    # t(l, 1) = l (l - 1) / 2 and t(16, 3) = 3 * 16 - C(6, 4) = 33.
    assert gf.checkpoint.binomial_forward_count(10, 1) == 45
    assert gf.checkpoint.binomial_forward_count(16, 3) == 33


def test_binomial_reverses_every_step_once():
    actions = gf.checkpoint.binomial_schedule(12, 3)
    order = [index for kind, index in actions if kind == "reverse"]
    assert order == list(range(11, -1, -1))


def test_peak_monotone_in_budget():
    profiles = _uniform_profiles(16)
    peaks = []
    for budget in range(3400, 150, -150):
        try:
            peaks.append(plan_for_profiles(profiles, budget).predicted_peak_bytes)
        except ValueError:
            break
    assert len(peaks) > 10
    assert all(a >= b for a, b in zip(peaks, peaks[1:]))


def test_peak_within_budget():
    profiles = _uniform_profiles(16)
    for budget in (3200, 1500, 900, 500, 300):
        assert plan_for_profiles(profiles, budget).predicted_peak_bytes <= budget


def test_infeasible_budget_names_minimum():
    profiles = _uniform_profiles(8)
    with pytest.raises(ValueError, match="smallest feasible budget") as info:
        plan_for_profiles(profiles, 150)
    smallest = int(str(info.value).split("input is ")[1].split(" bytes")[0])
    assert plan_for_profiles(profiles, smallest).predicted_peak_bytes <= smallest


def test_large_budget_stores_everything():
    plan = plan_for_profiles(_uniform_profiles(8), 10**6)
    assert plan.segments == [(0, 8, False)]
    assert plan.recomputed_layers == 0


def test_small_budget_uses_binomial():
    plan = plan_for_profiles(_uniform_profiles(16), 400)
    assert plan.kind == "binomial"


@pytest.mark.parametrize("fraction", [1.0, 0.4, 0.2, 0.1])
def test_plan_gradients_bitwise(fraction):
    model = _chain(12)
    x = gf.randn(8, 16)
    expected = _param_grads(model, model, x)
    full = plan_for_profiles(
        gf.checkpoint._plan.profile_layers(list(model.children()), x), 10**9
    ).predicted_peak_bytes
    plan = gf.checkpoint_plan(model, x, int(full * fraction))
    actual = _param_grads(model, lambda t: plan.run(model, t), x)
    for e, a in zip(expected, actual):
        assert np.array_equal(e, a)


@pytest.mark.parametrize("fraction", [1.0, 0.4, 0.15])
def test_measured_peak_matches_prediction(fraction):
    model = _chain(12)
    x = gf.randn(8, 16)
    full = 12 * 2 * 8 * 16 * 4
    plan = gf.checkpoint_plan(model, x, int(full * fraction))
    result = plan.measure(model, x)
    assert result["measured_peak_bytes"] <= plan.budget_bytes
    assert result["measured_peak_bytes"] == result["predicted_peak_bytes"]


def test_binomial_forward_count_measured():
    model = _chain(10)
    x = gf.randn(4, 16)
    plan = gf.checkpoint_plan(model, x, 4 * 16 * 4 * 3)
    assert plan.kind == "binomial"
    plan.run(model, x).sum().backward()
    expected = gf.checkpoint.binomial_forward_count(10, plan.snapshots)
    assert plan.counter["advances"] == expected


def test_plan_rejects_other_model():
    model = _chain(4)
    plan = gf.checkpoint_plan(model, gf.randn(2, 16), 10**6)
    with pytest.raises(ValueError, match="layers"):
        plan.run(_chain(5), gf.randn(2, 16))


def test_plan_rejects_function():
    with pytest.raises(TypeError, match="Sequential or a list of layers"):
        gf.checkpoint_plan(lambda u: u, gf.randn(2, 3), 100)


def _norm_dropout_chain():
    gf.manual_seed(0)
    nn = gf.nn
    layers = []
    for _ in range(4):
        layers += [nn.Linear(32, 32), nn.BatchNorm1d(32), nn.Dropout(0.3)]
    return nn.Sequential(*layers)


def _train_step(model, x, run):
    x.grad = None
    gf.manual_seed(1)
    run(x).sum().backward()
    grads = [p.grad.numpy().copy() for p in model.parameters()]
    return grads + [x.grad.numpy().copy()]


def test_binomial_dropout_batchnorm_bitwise():
    x = gf.randn(16, 32, requires_grad=True)
    plan = gf.checkpoint_plan(_norm_dropout_chain(), x, budget_bytes=4224)
    assert plan.kind == "binomial"
    plain = _norm_dropout_chain()
    expected = _train_step(plain, x, plain)
    model = _norm_dropout_chain()
    actual = _train_step(model, x, lambda t: plan.run(model, t))
    assert plan.counter["advances"] > len(plan.profiles)
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        assert np.array_equal(e, a)


def test_binomial_batchnorm_updated_once():
    x = gf.randn(16, 32, requires_grad=True)
    plan = gf.checkpoint_plan(_norm_dropout_chain(), x, budget_bytes=4224)
    plain = _norm_dropout_chain()
    _train_step(plain, x, plain)
    model = _norm_dropout_chain()
    _train_step(model, x, lambda t: plan.run(model, t))
    for index in (1, 4, 7, 10):
        norm, expected = model[index], plain[index]
        assert int(norm.num_batches_tracked.data) == 1
        assert np.array_equal(norm.running_mean.numpy(),
                              expected.running_mean.numpy())
        assert np.array_equal(norm.running_var.numpy(),
                              expected.running_var.numpy())


def test_binomial_rng_state_after_step():
    x = gf.randn(16, 32, requires_grad=True)
    plan = gf.checkpoint_plan(_norm_dropout_chain(), x, budget_bytes=4224)
    plain = _norm_dropout_chain()
    _train_step(plain, x, plain)
    expected = gf.get_rng_state()
    model = _norm_dropout_chain()
    _train_step(model, x, lambda t: plan.run(model, t))
    assert gf.get_rng_state() == expected


class _KeepsMask(gf.autograd.Function):
    """ReLU that keeps its mask in a plain ctx attribute, not in ctx.saved."""

    @staticmethod
    def forward(ctx, x):
        ctx.mask = (x > 0).astype(x.dtype)
        return x * ctx.mask

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.mask


def _keeps_mask(x):
    return _KeepsMask.apply(x)


def _peak_models():
    nn = gf.nn
    gf.manual_seed(0)
    yield ([nn.Linear(64, 512), nn.GELU(), nn.Dropout(0.2)],
           gf.randn(32, 64, requires_grad=True))
    yield ([nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.AvgPool2d(2)],
           gf.randn(4, 3, 16, 16, requires_grad=True))
    yield ([nn.Linear(16, 64), _keeps_mask, nn.Linear(64, 64), _keeps_mask,
            nn.Linear(64, 16), _keeps_mask],
           gf.randn(8, 16, requires_grad=True))


@pytest.mark.parametrize("case", range(3), ids=["dropout", "pool", "attribute"])
def test_measured_peak_within_budget(case):
    layers, x = list(_peak_models())[case]
    profiles = gf.checkpoint._plan.profile_layers(layers, x)
    full = plan_for_profiles(profiles, 10**9).predicted_peak_bytes
    checked = 0
    for budget in range(full // 16, full + 1, full // 16):
        try:
            plan = plan_for_profiles(profiles, budget)
        except ValueError:
            continue
        result = plan.measure(layers, x)
        checked += 1
        assert result["measured_peak_bytes"] <= budget
        assert result["measured_peak_bytes"] == result["predicted_peak_bytes"]
    assert checked >= 4


def test_profile_counts_attribute_bytes():
    x = gf.randn(8, 16, requires_grad=True)
    layers = [gf.nn.Dropout(0.5), _keeps_mask]
    profiles = gf.checkpoint._plan.profile_layers(layers, x)
    # Dropout saves its mask in ctx.saved, so backward frees it.
    assert profiles[0].internal_bytes == 8 * 16 * 4
    assert profiles[0].attribute_bytes == 0
    assert profiles[1].attribute_bytes == 8 * 16 * 4
