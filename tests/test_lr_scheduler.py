"""Tests of gradflow.optim.lr_scheduler against torch.optim.lr_scheduler."""

import math

import pytest

import gradflow as gf
from gradflow.optim import lr_scheduler

EPOCHS = 60
LRS = (0.1, 0.03)


def _optimizer(make_optimizer=gf.optim.SGD):
    groups = [
        {"params": [gf.tensor([1.0], requires_grad=True)], "lr": lr} for lr in LRS
    ]
    return make_optimizer(groups, lr=LRS[0])


def _torch_optimizer(torch):
    groups = [
        {"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in LRS
    ]
    return torch.optim.SGD(groups, lr=LRS[0])


def _schedule(optimizer, scheduler, epochs=EPOCHS):
    rates = [scheduler.get_last_lr()]
    for _ in range(epochs):
        optimizer.step()
        scheduler.step()
        rates.append(scheduler.get_last_lr())
    return rates


def _warmup_cosine(module, optimizer):
    warmup = module.LinearLR(optimizer, start_factor=0.1, total_iters=5)
    cosine = module.CosineAnnealingLR(optimizer, T_max=EPOCHS - 5, eta_min=1e-4)
    return module.SequentialLR(optimizer, [warmup, cosine], milestones=[5])


def _step_then_lambda(module, optimizer):
    step = module.StepLR(optimizer, step_size=4, gamma=0.5)
    scaled = module.LambdaLR(optimizer, lambda epoch: 0.9**epoch)
    return module.SequentialLR(optimizer, [step, scaled], milestones=[12])


CASES = {
    "step": lambda m, o: m.StepLR(o, step_size=7, gamma=0.3),
    "cosine": lambda m, o: m.CosineAnnealingLR(o, T_max=10),
    "cosine_eta_min": lambda m, o: m.CosineAnnealingLR(o, T_max=13, eta_min=0.002),
    "linear": lambda m, o: m.LinearLR(o, start_factor=0.25, total_iters=8),
    "linear_decay": lambda m, o: m.LinearLR(
        o, start_factor=1.0, end_factor=0.1, total_iters=20
    ),
    "lambda": lambda m, o: m.LambdaLR(o, lambda epoch: 1 / (1 + epoch)),
    "lambda_per_group": lambda m, o: m.LambdaLR(
        o, [lambda e: 0.95**e, lambda e: 1 + e % 3]
    ),
    "warmup_cosine": _warmup_cosine,
    "step_then_lambda": _step_then_lambda,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_schedule_matches_torch(case):
    torch = pytest.importorskip("torch")
    optimizer = _optimizer()
    rates = _schedule(optimizer, CASES[case](lr_scheduler, optimizer))
    torch_optimizer = _torch_optimizer(torch)
    expected = _schedule(
        torch_optimizer, CASES[case](torch.optim.lr_scheduler, torch_optimizer)
    )
    assert len(rates) == len(expected)
    for epoch, (got, want) in enumerate(zip(rates, expected)):
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15), f"epoch {epoch}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_schedule_writes_group_lr(case):
    optimizer = _optimizer()
    scheduler = CASES[case](lr_scheduler, optimizer)
    for _ in range(5):
        scheduler.step()
    groups = [group["lr"] for group in optimizer.param_groups]
    assert groups == scheduler.get_last_lr()


def test_step_lr_values():
    optimizer = _optimizer()
    scheduler = lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    rates = [lr[0] for lr in _schedule(optimizer, scheduler, epochs=5)]
    assert rates == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])


def test_cosine_reaches_eta_min():
    optimizer = _optimizer()
    scheduler = lr_scheduler.CosineAnnealingLR(optimizer, T_max=10, eta_min=0.01)
    rates = _schedule(optimizer, scheduler, epochs=10)
    assert rates[10][0] == pytest.approx(0.01)
    assert rates[5][0] == pytest.approx(0.01 + (0.1 - 0.01) / 2)


def test_cosine_matches_closed_form():
    optimizer = _optimizer()
    scheduler = lr_scheduler.CosineAnnealingLR(optimizer, T_max=7, eta_min=0.001)
    rates = _schedule(optimizer, scheduler, epochs=30)
    for t, lrs in enumerate(rates):
        want = 0.001 + (0.1 - 0.001) * (1 + math.cos(math.pi * t / 7)) / 2
        assert lrs[0] == pytest.approx(want, rel=1e-9), f"epoch {t}"


def test_linear_warmup_values():
    optimizer = _optimizer()
    scheduler = lr_scheduler.LinearLR(optimizer, start_factor=0.5, total_iters=2)
    rates = [lr[0] for lr in _schedule(optimizer, scheduler, epochs=3)]
    assert rates == pytest.approx([0.05, 0.075, 0.1, 0.1])


def test_sets_initial_lr():
    optimizer = _optimizer()
    lr_scheduler.StepLR(optimizer, step_size=1)
    assert [g["initial_lr"] for g in optimizer.param_groups] == list(LRS)


def test_resume_needs_initial_lr():
    with pytest.raises(KeyError, match="initial_lr"):
        lr_scheduler.StepLR(_optimizer(), step_size=1, last_epoch=3)


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_dict_resumes(case):
    optimizer = _optimizer()
    scheduler = CASES[case](lr_scheduler, optimizer)
    full = _schedule(optimizer, scheduler, epochs=30)

    optimizer = _optimizer()
    scheduler = CASES[case](lr_scheduler, optimizer)
    _schedule(optimizer, scheduler, epochs=12)
    saved_optimizer, saved = optimizer.state_dict(), scheduler.state_dict()

    optimizer = _optimizer()
    resumed = CASES[case](lr_scheduler, optimizer)
    optimizer.load_state_dict(saved_optimizer)
    resumed.load_state_dict(saved)
    tail = _schedule(optimizer, resumed, epochs=18)
    assert tail == full[12:]


def test_state_dict_round_trips_through_save(tmp_path):
    optimizer = _optimizer()
    scheduler = _warmup_cosine(lr_scheduler, optimizer)
    _schedule(optimizer, scheduler, epochs=7)
    path = tmp_path / "sched.safetensors"
    gf.save({"scheduler": scheduler.state_dict()}, path)
    assert gf.load(path)["scheduler"] == scheduler.state_dict()


def test_state_dict_leaves_out_functions():
    optimizer = _optimizer()
    scheduler = lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    assert "lr_lambdas" not in scheduler.state_dict()


def test_load_state_dict_rejects_foreign():
    scheduler = lr_scheduler.StepLR(_optimizer(), step_size=2)
    with pytest.raises(ValueError, match="last_epoch"):
        scheduler.load_state_dict({"gamma": 0.5})


@pytest.mark.parametrize("value", [0, -3, 2.5])
def test_step_lr_rejects_step_size(value):
    with pytest.raises(ValueError, match="step_size"):
        lr_scheduler.StepLR(_optimizer(), step_size=value)


def test_cosine_rejects_t_max():
    with pytest.raises(ValueError, match="T_max"):
        lr_scheduler.CosineAnnealingLR(_optimizer(), T_max=0)


@pytest.mark.parametrize("options", [
    {"start_factor": 0.0}, {"start_factor": 1.5}, {"end_factor": -0.1},
    {"total_iters": 0},
])
def test_linear_rejects_options(options):
    with pytest.raises(ValueError, match=next(iter(options))):
        lr_scheduler.LinearLR(_optimizer(), **options)


def test_lambda_rejects_count():
    with pytest.raises(ValueError, match="one per group"):
        lr_scheduler.LambdaLR(_optimizer(), [lambda e: 1.0])


def test_lambda_rejects_non_callable():
    with pytest.raises(TypeError, match="callable"):
        lr_scheduler.LambdaLR(_optimizer(), 0.5)


def test_sequential_rejects_milestones():
    optimizer = _optimizer()
    first = lr_scheduler.StepLR(optimizer, step_size=2)
    second = lr_scheduler.StepLR(optimizer, step_size=3)
    with pytest.raises(ValueError, match="milestone"):
        lr_scheduler.SequentialLR(optimizer, [first, second], milestones=[])


def test_sequential_rejects_other_optimizer():
    optimizer = _optimizer()
    first = lr_scheduler.StepLR(optimizer, step_size=2)
    other = lr_scheduler.StepLR(_optimizer(), step_size=3)
    with pytest.raises(ValueError, match="another optimizer"):
        lr_scheduler.SequentialLR(optimizer, [first, other], milestones=[4])


def test_rejects_non_optimizer():
    with pytest.raises(TypeError, match="optimizer"):
        lr_scheduler.StepLR(object(), step_size=2)


def test_works_with_adam():
    optimizer = _optimizer(gf.optim.Adam)
    scheduler = lr_scheduler.CosineAnnealingLR(optimizer, T_max=4)
    for _ in range(4):
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)
