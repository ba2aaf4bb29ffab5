"""Losses of gradflow.nn.functional and their modules, against PyTorch."""

import numpy as np
import pytest
from conftest import float64_leaf, match_torch, to_host

import gradflow as gf
import gradflow.nn.functional as F


def _const(array, device):
    return gf.tensor(array, device=device)


RNG = np.random.default_rng(0)
LOGITS_2D = RNG.standard_normal((6, 4))
TARGET_2D = np.array([0, 3, 1, 1, 2, 3])
TARGET_IGNORED = np.array([0, -100, 1, 1, -100, 3])
LOGITS_4D = RNG.standard_normal((2, 3, 2, 2))
TARGET_4D = RNG.integers(0, 3, (2, 2, 2))
CLASS_WEIGHT = np.array([0.5, 2.0, 1.0, 0.25])
PROBABILITIES = RNG.dirichlet(np.ones(4), 6)
REDUCTIONS = ["none", "mean", "sum"]


# -- cross_entropy ------------------------------------------------------------


CE_CASES = [
    ("plain", {}, TARGET_2D),
    ("ignore_index", {}, TARGET_IGNORED),
    ("ignore_custom", {"ignore_index": 2}, TARGET_2D),
    ("label_smoothing", {"label_smoothing": 0.2}, TARGET_2D),
    ("smoothing_ignore", {"label_smoothing": 0.3}, TARGET_IGNORED),
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name, kwargs, target", CE_CASES, ids=[c[0] for c in CE_CASES])
def test_cross_entropy_matches_torch(device, reduction, name, kwargs, target):
    torch = pytest.importorskip("torch")
    kwargs = dict(kwargs, reduction=reduction)
    match_torch(
        lambda x, t: F.cross_entropy(x, t, **kwargs),
        lambda x, t: torch.nn.functional.cross_entropy(x, t, **kwargs),
        [LOGITS_2D], [target], device,
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("target", [TARGET_2D, TARGET_IGNORED], ids=["all", "ignored"])
def test_cross_entropy_weight_matches_torch(device, reduction, smoothing, target):
    torch = pytest.importorskip("torch")
    kwargs = {"reduction": reduction, "label_smoothing": smoothing}
    match_torch(
        lambda x, t, w: F.cross_entropy(x, t, weight=w, **kwargs),
        lambda x, t, w: torch.nn.functional.cross_entropy(x, t, weight=w, **kwargs),
        [LOGITS_2D], [target, CLASS_WEIGHT], device,
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_spatial_matches_torch(device, reduction, smoothing):
    torch = pytest.importorskip("torch")
    target = TARGET_4D.copy()
    target[0, 0, 1] = -100
    weight = np.array([1.0, 0.5, 3.0])
    kwargs = {"reduction": reduction, "label_smoothing": smoothing}
    match_torch(
        lambda x, t, w: F.cross_entropy(x, t, weight=w, **kwargs),
        lambda x, t, w: torch.nn.functional.cross_entropy(x, t, weight=w, **kwargs),
        [LOGITS_4D], [target, weight], device,
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.25])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_probabilities_matches_torch(device, reduction, smoothing,
                                                   weighted):
    torch = pytest.importorskip("torch")
    kwargs = {"reduction": reduction, "label_smoothing": smoothing}
    constants = [CLASS_WEIGHT] if weighted else []

    def ours(x, p, *weight):
        return F.cross_entropy(x, p, *weight, **kwargs)

    def theirs(x, p, *weight):
        return torch.nn.functional.cross_entropy(x, p, *weight, **kwargs)

    match_torch(ours, theirs, [LOGITS_2D, PROBABILITIES], constants, device)


def test_cross_entropy_probabilities_spatial(device):
    torch = pytest.importorskip("torch")
    probabilities = np.moveaxis(RNG.dirichlet(np.ones(3), (2, 2, 2)), -1, 1)
    match_torch(F.cross_entropy, torch.nn.functional.cross_entropy,
                [LOGITS_4D, probabilities], [], device)


def test_cross_entropy_unbatched(device):
    torch = pytest.importorskip("torch")
    match_torch(F.cross_entropy, torch.nn.functional.cross_entropy,
                [LOGITS_2D[0]], [np.array(2)], device)


def test_cross_entropy_gradcheck(device):
    x = float64_leaf(LOGITS_2D, device)
    w = float64_leaf(CLASS_WEIGHT, device)
    target = _const(TARGET_IGNORED, device)
    assert gf.gradcheck(
        lambda a, b: F.cross_entropy(a, target, weight=b, label_smoothing=0.1), (x, w)
    )


def test_cross_entropy_probabilities_gradcheck(device):
    x = float64_leaf(LOGITS_2D, device)
    p = float64_leaf(PROBABILITIES, device)
    assert gf.gradcheck(lambda a, b: F.cross_entropy(a, b, label_smoothing=0.1), (x, p))


def test_cross_entropy_extreme_logits(device):
    x = gf.tensor([[1000.0, -1000.0], [-1000.0, 1000.0]], device=device,
                  requires_grad=True)
    loss = F.cross_entropy(x, _const([1, 1], device))
    loss.backward()
    np.testing.assert_allclose(to_host(loss), 1000.0)
    assert np.isfinite(to_host(x.grad)).all()


def test_cross_entropy_all_ignored_is_nan(device):
    loss = F.cross_entropy(gf.zeros(2, 3, device=device), _const([-100, -100], device))
    assert np.isnan(to_host(loss))


ALL_IGNORED_CASES = [
    ("cross_entropy", F.cross_entropy, {}),
    ("cross_entropy_weight", F.cross_entropy, {"weight": CLASS_WEIGHT}),
    ("cross_entropy_smoothing", F.cross_entropy, {"label_smoothing": 0.2}),
    ("nll_loss", F.nll_loss, {}),
    ("nll_loss_weight", F.nll_loss, {"weight": CLASS_WEIGHT}),
]


@pytest.mark.parametrize("name, loss_fn, kwargs", ALL_IGNORED_CASES,
                         ids=[c[0] for c in ALL_IGNORED_CASES])
def test_all_ignored_gradient_is_zero(device, name, loss_fn, kwargs):
    # A fully padded batch has a NaN mean loss, but must not spoil the gradient.
    kwargs = {k: _const(v, device) if isinstance(v, np.ndarray) else v
              for k, v in kwargs.items()}
    x = gf.tensor(LOGITS_2D, device=device, requires_grad=True)
    loss = loss_fn(x, _const(np.full(6, -100), device), **kwargs)
    loss.backward()
    assert np.isnan(to_host(loss))
    np.testing.assert_array_equal(to_host(x.grad), np.zeros((6, 4)))


def test_all_ignored_weight_gradient_is_zero(device):
    x = gf.tensor(LOGITS_2D, device=device)
    weight = gf.tensor(CLASS_WEIGHT, device=device, requires_grad=True)
    F.cross_entropy(x, _const(np.full(6, -100), device), weight=weight).backward()
    np.testing.assert_array_equal(to_host(weight.grad), np.zeros(4))


def test_cross_entropy_module(device):
    weight = _const(CLASS_WEIGHT, device)
    module = gf.nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1, reduction="sum")
    x, target = _const(LOGITS_2D, device), _const(TARGET_2D, device)
    expected = F.cross_entropy(x, target, weight=weight, label_smoothing=0.1,
                               reduction="sum")
    np.testing.assert_allclose(to_host(module(x, target)), to_host(expected))


# -- nll_loss -----------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("target", [TARGET_2D, TARGET_IGNORED], ids=["all", "ignored"])
def test_nll_loss_matches_torch(device, reduction, weighted, target):
    torch = pytest.importorskip("torch")
    log_probs = LOGITS_2D - np.log(np.exp(LOGITS_2D).sum(1, keepdims=True))
    if weighted:
        match_torch(
            lambda x, t, w: F.nll_loss(x, t, weight=w, reduction=reduction),
            lambda x, t, w: torch.nn.functional.nll_loss(x, t, weight=w,
                                                         reduction=reduction),
            [log_probs], [target, CLASS_WEIGHT], device,
        )
    else:
        match_torch(
            lambda x, t: F.nll_loss(x, t, reduction=reduction),
            lambda x, t: torch.nn.functional.nll_loss(x, t, reduction=reduction),
            [log_probs], [target], device,
        )


def test_nll_loss_spatial_matches_torch(device):
    torch = pytest.importorskip("torch")
    match_torch(F.nll_loss, torch.nn.functional.nll_loss, [LOGITS_4D], [TARGET_4D],
                device)


def test_nll_loss_unbatched(device):
    torch = pytest.importorskip("torch")
    match_torch(F.nll_loss, torch.nn.functional.nll_loss, [LOGITS_2D[0]],
                [np.array(3)], device)


def test_nll_loss_module(device):
    x, target = _const(LOGITS_2D, device), _const(TARGET_IGNORED, device)
    np.testing.assert_allclose(to_host(gf.nn.NLLLoss()(x, target)),
                               to_host(F.nll_loss(x, target)))


# -- class-index validation ---------------------------------------------------


@pytest.mark.parametrize("loss", [F.cross_entropy, F.nll_loss], ids=["ce", "nll"])
def test_class_loss_rejects_large_index(device, loss):
    with pytest.raises(IndexError, match="class index 4 is out of range.*0 to 3"):
        loss(gf.zeros(2, 4, device=device), _const([1, 4], device))


@pytest.mark.parametrize("loss", [F.cross_entropy, F.nll_loss], ids=["ce", "nll"])
def test_class_loss_rejects_negative_index(device, loss):
    with pytest.raises(IndexError, match="class index -3 is out of range"):
        loss(gf.zeros(2, 4, device=device), _const([-3, 0], device))


@pytest.mark.parametrize("loss", [F.cross_entropy, F.nll_loss], ids=["ce", "nll"])
def test_class_loss_rejects_target_shape(device, loss):
    with pytest.raises(ValueError, match=r"target shape \(3,\).*\(2, 4\)"):
        loss(gf.zeros(2, 4, device=device), _const([0, 1, 2], device))


def test_nll_loss_rejects_float_target(device):
    with pytest.raises(TypeError, match="integer class indices"):
        F.nll_loss(gf.zeros(2, 4, device=device), gf.zeros(2, device=device))


def test_cross_entropy_rejects_probability_shape(device):
    with pytest.raises(ValueError, match="class probabilities"):
        F.cross_entropy(gf.zeros(2, 4, device=device), gf.zeros(2, device=device))


def test_cross_entropy_rejects_integer_probabilities(device):
    target = _const(np.zeros((2, 4), dtype=np.int64), device)
    with pytest.raises(ValueError, match="target shape"):
        F.cross_entropy(gf.zeros(2, 4, device=device), target)


def test_cross_entropy_rejects_integer_input(device):
    with pytest.raises(TypeError, match="floating-point"):
        F.cross_entropy(_const([[1, 2]], device), _const([0], device))


@pytest.mark.parametrize("loss", [F.cross_entropy, F.nll_loss], ids=["ce", "nll"])
def test_class_loss_rejects_weight_shape(device, loss):
    with pytest.raises(ValueError, match=r"weight must have shape \(4,\)"):
        loss(gf.zeros(2, 4, device=device), _const([0, 1], device),
             weight=gf.ones(3, device=device))


@pytest.mark.parametrize("smoothing", [-0.1, 1.1])
def test_cross_entropy_rejects_smoothing(device, smoothing):
    with pytest.raises(ValueError, match="label_smoothing"):
        F.cross_entropy(gf.zeros(2, 4, device=device), _const([0, 1], device),
                        label_smoothing=smoothing)


LOSS_CALLS = [
    ("mse", lambda d, r: F.mse_loss(gf.zeros(2, device=d), gf.zeros(2, device=d),
                                    reduction=r)),
    ("bce", lambda d, r: F.binary_cross_entropy(
        gf.full((2,), 0.5, device=d), gf.zeros(2, device=d), reduction=r)),
    ("bce_logits", lambda d, r: F.binary_cross_entropy_with_logits(
        gf.zeros(2, device=d), gf.zeros(2, device=d), reduction=r)),
    ("nll", lambda d, r: F.nll_loss(gf.zeros(2, 3, device=d), _const([0, 1], d),
                                    reduction=r)),
    ("ce", lambda d, r: F.cross_entropy(gf.zeros(2, 3, device=d), _const([0, 1], d),
                                        reduction=r)),
]


@pytest.mark.parametrize("name, call", LOSS_CALLS, ids=[c[0] for c in LOSS_CALLS])
def test_loss_rejects_reduction(device, name, call):
    with pytest.raises(ValueError, match="reduction must be 'none', 'mean' or 'sum'"):
        call(device, "average")


@pytest.mark.parametrize("module", [
    gf.nn.MSELoss, gf.nn.BCELoss, gf.nn.BCEWithLogitsLoss, gf.nn.NLLLoss,
    gf.nn.CrossEntropyLoss,
])
def test_loss_module_rejects_reduction(module):
    with pytest.raises(ValueError, match="reduction"):
        module(reduction="average")


# -- mse_loss -----------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_loss_matches_torch(device, reduction):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    match_torch(
        lambda x, t: F.mse_loss(x, t, reduction=reduction),
        lambda x, t: torch.nn.functional.mse_loss(x, t, reduction=reduction),
        [rng.standard_normal((3, 4)), rng.standard_normal((3, 4))], [], device,
    )


def test_mse_loss_gradcheck(device):
    rng = np.random.default_rng(2)
    x = float64_leaf(rng.standard_normal(5), device)
    t = float64_leaf(rng.standard_normal(5), device)
    assert gf.gradcheck(F.mse_loss, (x, t))


def test_mse_loss_rejects_shape(device):
    with pytest.raises(ValueError, match=r"target shape \(3, 1\).*\(3,\)"):
        F.mse_loss(gf.zeros(3, device=device), gf.zeros(3, 1, device=device))


def test_mse_loss_rejects_integer_target(device):
    with pytest.raises(TypeError, match="target must be a floating-point"):
        F.mse_loss(gf.zeros(2, device=device), _const([0, 1], device))


def test_mse_module(device):
    x, t = gf.randn(4, device=device), gf.randn(4, device=device)
    np.testing.assert_allclose(to_host(gf.nn.MSELoss(reduction="sum")(x, t)),
                               to_host(F.mse_loss(x, t, reduction="sum")))


# -- binary cross-entropy -----------------------------------------------------


PROBS = np.array([[0.1, 0.9, 0.5], [0.3, 0.02, 0.7]])
BINARY_TARGET = np.array([[0.0, 1.0, 0.3], [1.0, 0.0, 0.6]])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_matches_torch(device, reduction):
    torch = pytest.importorskip("torch")
    match_torch(
        lambda x, t: F.binary_cross_entropy(x, t, reduction=reduction),
        lambda x, t: torch.nn.functional.binary_cross_entropy(
            x, t, reduction=reduction),
        [PROBS, BINARY_TARGET], [], device,
    )


def test_bce_weight_matches_torch(device):
    torch = pytest.importorskip("torch")
    weight = np.array([1.0, 2.0, 0.5])
    match_torch(
        lambda x, t: F.binary_cross_entropy(
            x, t, weight=gf.tensor(weight, device=device)),
        lambda x, t: torch.nn.functional.binary_cross_entropy(
            x, t, weight=torch.tensor(weight)),
        [PROBS, BINARY_TARGET], [], device,
    )


def test_bce_endpoints_match_torch(device):
    torch = pytest.importorskip("torch")
    x_values = np.array([0.0, 1.0, 0.0, 1.0])
    target = np.array([1.0, 0.0, 0.0, 1.0])
    x = float64_leaf(x_values, device)
    loss = F.binary_cross_entropy(x, _const(target, device), reduction="sum")
    loss.backward()
    x_torch = torch.tensor(x_values, requires_grad=True)
    expected = torch.nn.functional.binary_cross_entropy(
        x_torch, torch.tensor(target), reduction="sum")
    expected.backward()
    np.testing.assert_allclose(to_host(loss), expected.item())
    np.testing.assert_allclose(to_host(x.grad), x_torch.grad.numpy())


def test_bce_gradcheck(device):
    # Targets stay inside (0, 1), so the finite-difference steps do too.
    x, t = float64_leaf(PROBS, device), float64_leaf(0.1 + 0.8 * BINARY_TARGET, device)
    assert gf.gradcheck(F.binary_cross_entropy, (x, t))


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_bce_rejects_input_range(device, value):
    with pytest.raises(ValueError, match="every input value must be in \\[0, 1\\]"):
        F.binary_cross_entropy(gf.tensor([0.5, value], device=device),
                               gf.zeros(2, device=device))


def test_bce_rejects_target_range(device):
    with pytest.raises(ValueError, match="every target value must be in \\[0, 1\\]"):
        F.binary_cross_entropy(gf.full((2,), 0.5, device=device),
                               gf.tensor([0.0, 2.0], device=device))


def test_bce_rejects_shape(device):
    with pytest.raises(ValueError, match="does not match input shape"):
        F.binary_cross_entropy(gf.full((2,), 0.5, device=device),
                               gf.zeros(2, 1, device=device))


def test_bce_module(device):
    x, t = _const(PROBS, device), _const(BINARY_TARGET, device)
    np.testing.assert_allclose(to_host(gf.nn.BCELoss()(x, t)),
                               to_host(F.binary_cross_entropy(x, t)))


LOGITS = np.array([[-3.0, 0.5, 40.0], [2.0, -60.0, 0.0]])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_logits_matches_torch(device, reduction):
    torch = pytest.importorskip("torch")
    match_torch(
        lambda x, t: F.binary_cross_entropy_with_logits(x, t, reduction=reduction),
        lambda x, t: torch.nn.functional.binary_cross_entropy_with_logits(
            x, t, reduction=reduction),
        [LOGITS, BINARY_TARGET], [], device,
    )


def test_bce_logits_weights_match_torch(device):
    torch = pytest.importorskip("torch")
    weight = np.array([[1.0, 0.5, 2.0]])
    pos_weight = np.array([3.0, 0.5, 1.5])
    match_torch(
        lambda x, t, w, p: F.binary_cross_entropy_with_logits(x, t, w, pos_weight=p),
        lambda x, t, w, p: torch.nn.functional.binary_cross_entropy_with_logits(
            x, t, w, pos_weight=p),
        [LOGITS, BINARY_TARGET], [weight, pos_weight], device,
    )


def test_bce_logits_gradcheck(device):
    x, t = float64_leaf(LOGITS / 10, device), float64_leaf(BINARY_TARGET, device)
    w = float64_leaf(np.array([[1.0, 0.5, 2.0]]), device)
    p = float64_leaf(np.array([3.0, 0.5, 1.5]), device)
    assert gf.gradcheck(
        lambda a, b, c, d: F.binary_cross_entropy_with_logits(a, b, c, pos_weight=d),
        (x, t, w, p),
    )


def test_bce_logits_extreme_finite(device):
    x = gf.tensor([1000.0, -1000.0], device=device, requires_grad=True)
    loss = F.binary_cross_entropy_with_logits(x, gf.tensor([0.0, 1.0], device=device))
    loss.backward()
    np.testing.assert_allclose(to_host(loss), 1000.0)
    assert np.isfinite(to_host(x.grad)).all()


def test_bce_logits_rejects_pos_weight_shape(device):
    with pytest.raises(ValueError, match=r"pos_weight of shape \(2,\)"):
        F.binary_cross_entropy_with_logits(
            gf.zeros(2, 3, device=device), gf.zeros(2, 3, device=device),
            pos_weight=gf.ones(2, device=device))


def test_bce_logits_module(device):
    x, t = _const(LOGITS, device), _const(BINARY_TARGET, device)
    pos_weight = gf.tensor([3.0, 0.5, 1.5], dtype=gf.float64, device=device)
    module = gf.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    expected = F.binary_cross_entropy_with_logits(x, t, pos_weight=pos_weight)
    np.testing.assert_allclose(to_host(module(x, t)), to_host(expected))


# -- second order ---------------------------------------------------------------


def _input_gradient(loss_fn):
    """Return x -> d loss / dx, recorded so that it can be differentiated again."""
    def gradient(x):
        return gf.grad(loss_fn(x), x, create_graph=True)[0]

    return gradient


def test_cross_entropy_second_order(device):
    x = float64_leaf(LOGITS_2D, device)
    target = _const(TARGET_IGNORED, device)
    weight = _const(CLASS_WEIGHT, device)
    loss = _input_gradient(
        lambda a: F.cross_entropy(a, target, weight=weight, label_smoothing=0.1)
    )
    assert gf.gradcheck(loss, (x,))


def test_bce_second_order(device):
    x = float64_leaf(PROBS, device)
    target = _const(0.1 + 0.8 * BINARY_TARGET, device)
    assert gf.gradcheck(_input_gradient(lambda a: F.binary_cross_entropy(a, target)),
                        (x,))


def test_bce_logits_second_order(device):
    x = float64_leaf(LOGITS / 10, device)
    target = _const(BINARY_TARGET, device)
    pos_weight = _const(np.array([3.0, 0.5, 1.5]), device)
    loss = _input_gradient(
        lambda a: F.binary_cross_entropy_with_logits(a, target, pos_weight=pos_weight)
    )
    assert gf.gradcheck(loss, (x,))
