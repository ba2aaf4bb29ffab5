"""Learning-rate schedulers that set ``group["lr"]`` of an optimizer each step.

The schedules follow ``torch.optim.lr_scheduler`` of PyTorch 2.13. Each
``step()`` computes the next rate from the current ``group["lr"]`` (the
recursive form), so schedulers compose with other changes to the rate.
A scheduler that ``SequentialLR`` restarts at a milestone computes its
rate from the base rates instead (the closed form).

>>> opt = gf.optim.SGD(params, lr=0.1)
>>> warmup = LinearLR(opt, start_factor=0.1, total_iters=5)
>>> cosine = CosineAnnealingLR(opt, T_max=95)
>>> sched = SequentialLR(opt, [warmup, cosine], milestones=[5])
>>> for epoch in range(100):
...     train_one_epoch(opt)
...     sched.step()
"""

import math
from bisect import bisect_right

__all__ = [
    "LRScheduler", "StepLR", "CosineAnnealingLR", "LinearLR", "LambdaLR",
    "SequentialLR",
]


class LRScheduler:
    """Base of the schedulers: tracks the epoch and writes ``group["lr"]``.

    ``last_epoch`` is the index of the last epoch seen. The value -1 starts
    a fresh schedule and stores each group's rate as ``group["initial_lr"]``,
    the base rate. Creating a scheduler already takes its first step, so
    ``group["lr"]`` is the rate of epoch 0 afterwards. Call ``step()``
    once per epoch, after ``optimizer.step()``.

    Subclasses define ``get_lr()`` (the recursive form) and may define
    ``_closed_form_lr()``.
    """

    def __init__(self, optimizer, last_epoch=-1):
        if not hasattr(optimizer, "param_groups"):
            raise TypeError(
                f"{type(self).__name__} expects a gradflow optimizer, got "
                f"{type(optimizer).__name__}."
            )
        self.optimizer = optimizer
        groups = optimizer.param_groups
        if last_epoch == -1:
            for group in groups:
                group.setdefault("initial_lr", group["lr"])
        else:
            _require_initial_lr(groups, type(self).__name__, last_epoch)
        self.base_lrs = [group["initial_lr"] for group in groups]
        self.last_epoch = last_epoch
        self._initial_step()

    def _initial_step(self):
        self._step_count = 0
        self._is_initial = True
        try:
            self.step()
        finally:
            self._is_initial = False

    def step(self):
        """Advance one epoch and write the new rates into the optimizer."""
        self._step_count += 1
        self._update_lr()

    def _update_lr(self, epoch=None):
        if epoch is None:
            self.last_epoch += 1
            values = self.get_lr()
        else:
            self.last_epoch = epoch
            closed_form = getattr(self, "_closed_form_lr", None)
            values = closed_form() if closed_form is not None else self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, values, strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_lr(self):
        """Return the rate of each group for epoch ``last_epoch``."""
        raise NotImplementedError

    def get_last_lr(self):
        """Return the rates this scheduler set last, one per parameter group."""
        return list(self._last_lr)

    def _current_lrs(self):
        return [group["lr"] for group in self.optimizer.param_groups]

    _excluded = ("optimizer", "_is_initial")

    def state_dict(self):
        """Return the scheduler's counters and options (not the optimizer)."""
        return {
            key: list(value) if isinstance(value, list) else value
            for key, value in vars(self).items()
            if key not in self._excluded
        }

    def load_state_dict(self, state_dict):
        """Restore counters and options saved by ``state_dict``."""
        for key in ("last_epoch", "base_lrs", "_step_count", "_last_lr"):
            if key not in state_dict:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: the state has no "
                    f"'{key}'. Pass a dict returned by state_dict()."
                )
        for key, value in state_dict.items():
            if key not in self._excluded:
                setattr(self, key, list(value) if isinstance(value, list) else value)


def _require_initial_lr(groups, name, last_epoch):
    for i, group in enumerate(groups):
        if "initial_lr" not in group:
            raise KeyError(
                f"{name}(last_epoch={last_epoch}) resumes a schedule, but "
                f"param_groups[{i}] has no 'initial_lr'. Load the optimizer's "
                "state_dict first, or start with last_epoch=-1."
            )


def _check_positive_int(name, option, value):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}: {option} must be a positive int, got {value!r}.")


class StepLR(LRScheduler):
    """Multiply the rate by ``gamma`` every ``step_size`` epochs.

    The rate at epoch ``t`` is ``base_lr * gamma ** (t // step_size)``.
    """

    def __init__(self, optimizer, step_size, gamma=0.1, last_epoch=-1):
        _check_positive_int("StepLR", "step_size", step_size)
        self.step_size = step_size
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return self._current_lrs()
        return [lr * self.gamma for lr in self._current_lrs()]

    def _closed_form_lr(self):
        factor = self.gamma ** (self.last_epoch // self.step_size)
        return [base_lr * factor for base_lr in self.base_lrs]


class CosineAnnealingLR(LRScheduler):
    """Anneal the rate from the base rate to ``eta_min`` along a half cosine.

    The rate at epoch ``t`` is
    ``eta_min + (base_lr - eta_min) * (1 + cos(pi * t / T_max)) / 2``,
    which reaches ``eta_min`` at ``t = T_max`` and climbs back after it
    (the cosine's period is ``2 * T_max``). ``step()`` reaches that value
    through the recursive update, as PyTorch does.
    """

    def __init__(self, optimizer, T_max, eta_min=0.0, last_epoch=-1):
        _check_positive_int("CosineAnnealingLR", "T_max", T_max)
        self.T_max = T_max
        self.eta_min = eta_min
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        t, period, eta_min = self.last_epoch, self.T_max, self.eta_min
        if self._is_initial:
            return self._current_lrs()
        if self._step_count == 1 and t > 0:
            return self._closed_form_lr()
        if (t - 1 - period) % (2 * period) == 0:
            # At the trough the recursive ratio below divides by zero, so the
            # rate steps up by the closed form's increment instead.
            rise = (1 - math.cos(math.pi / period)) / 2
            return [
                lr + (base_lr - eta_min) * rise
                for lr, base_lr in zip(self._current_lrs(), self.base_lrs)
            ]
        ratio = (1 + math.cos(math.pi * t / period)) / (
            1 + math.cos(math.pi * (t - 1) / period)
        )
        return [ratio * (lr - eta_min) + eta_min for lr in self._current_lrs()]

    def _closed_form_lr(self):
        cosine = (1 + math.cos(math.pi * self.last_epoch / self.T_max)) / 2
        return [
            self.eta_min + (base_lr - self.eta_min) * cosine
            for base_lr in self.base_lrs
        ]


class LinearLR(LRScheduler):
    """Scale the rate linearly from ``start_factor`` to ``end_factor`` times base.

    The factor moves in ``total_iters`` equal steps and then stays at
    ``end_factor``. With ``end_factor=1`` this is the usual linear warm-up.
    """

    def __init__(self, optimizer, start_factor=1.0 / 3, end_factor=1.0,
                 total_iters=5, last_epoch=-1):
        if not 0 < start_factor <= 1:
            raise ValueError(
                f"LinearLR: start_factor must be in (0, 1], got {start_factor!r}."
            )
        if not 0 <= end_factor <= 1:
            raise ValueError(
                f"LinearLR: end_factor must be in [0, 1], got {end_factor!r}."
            )
        _check_positive_int("LinearLR", "total_iters", total_iters)
        self.start_factor = start_factor
        self.end_factor = end_factor
        self.total_iters = total_iters
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        start, end, t = self.start_factor, self.end_factor, self.last_epoch
        if t == 0:
            return [lr * start for lr in self._current_lrs()]
        if self._is_initial or t > self.total_iters:
            return self._current_lrs()
        # Ratio of the factor at epoch t to the factor at epoch t - 1.
        ratio = 1 + (end - start) / (
            self.total_iters * start + (t - 1) * (end - start)
        )
        return [lr * ratio for lr in self._current_lrs()]

    def _closed_form_lr(self):
        done = min(self.total_iters, self.last_epoch) / self.total_iters
        factor = self.start_factor + (self.end_factor - self.start_factor) * done
        return [base_lr * factor for base_lr in self.base_lrs]


class LambdaLR(LRScheduler):
    """Set the rate to ``base_lr * lr_lambda(epoch)``.

    ``lr_lambda`` is one function for every group or a list with one per
    group. ``state_dict`` does not store the functions, so pass the same
    ones when recreating the scheduler.
    """

    _excluded = LRScheduler._excluded + ("lr_lambdas",)

    def __init__(self, optimizer, lr_lambda, last_epoch=-1):
        groups = getattr(optimizer, "param_groups", [])
        if isinstance(lr_lambda, (list, tuple)):
            if len(lr_lambda) != len(groups):
                raise ValueError(
                    f"LambdaLR: got {len(lr_lambda)} lr_lambda functions for "
                    f"{len(groups)} parameter group(s). Pass one per group."
                )
            self.lr_lambdas = list(lr_lambda)
        else:
            self.lr_lambdas = [lr_lambda] * len(groups)
        for fn in self.lr_lambdas:
            if not callable(fn):
                raise TypeError(f"LambdaLR: lr_lambda must be callable, got {fn!r}.")
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        return [
            base_lr * fn(self.last_epoch)
            for fn, base_lr in zip(self.lr_lambdas, self.base_lrs)
        ]


class SequentialLR(LRScheduler):
    """Run schedulers one after another, switching at the ``milestones`` epochs.

    ``schedulers[i]`` sets the rate from epoch ``milestones[i - 1]`` on. At
    its milestone it restarts at its own epoch 0, computed from the base
    rates. All schedulers must drive ``optimizer``.
    """

    _excluded = LRScheduler._excluded + ("_schedulers",)

    def __init__(self, optimizer, schedulers, milestones, last_epoch=-1):
        schedulers, milestones = list(schedulers), list(milestones)
        _check_sequence(optimizer, schedulers, milestones)
        self.optimizer = optimizer
        self._schedulers = schedulers
        self._milestones = milestones
        self.last_epoch = last_epoch + 1
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"]
        # Each scheduler stepped once when it was created. Take those steps
        # back, then start only the scheduler that owns epoch 0.
        for scheduler in schedulers:
            _undo_initial_step(scheduler)
        first = schedulers[bisect_right(milestones, 0)]
        first._initial_step()
        self._last_lr = first.get_last_lr()

    def step(self):
        self.last_epoch += 1
        index = bisect_right(self._milestones, self.last_epoch)
        scheduler = self._schedulers[index]
        if index > 0 and self._milestones[index - 1] == self.last_epoch:
            scheduler._update_lr(0)
        else:
            scheduler.step()
        self._last_lr = scheduler.get_last_lr()

    def state_dict(self):
        state = super().state_dict()
        state["_schedulers"] = [s.state_dict() for s in self._schedulers]
        return state

    def load_state_dict(self, state_dict):
        """Restore this scheduler and each of its schedulers."""
        saved = state_dict.get("_schedulers")
        if saved is None or len(saved) != len(self._schedulers):
            raise ValueError(
                "SequentialLR.load_state_dict: the state must list one state "
                f"per scheduler ({len(self._schedulers)} here)."
            )
        for key in ("last_epoch", "_milestones", "_last_lr"):
            if key not in state_dict:
                raise ValueError(
                    f"SequentialLR.load_state_dict: the state has no '{key}'. "
                    "pass a dict returned by state_dict()."
                )
        for scheduler, state in zip(self._schedulers, saved):
            scheduler.load_state_dict(state)
        for key, value in state_dict.items():
            if key not in self._excluded:
                setattr(self, key, list(value) if isinstance(value, list) else value)


def _check_sequence(optimizer, schedulers, milestones):
    if not schedulers:
        raise ValueError("SequentialLR needs at least one scheduler, got none.")
    for i, scheduler in enumerate(schedulers):
        if getattr(scheduler, "optimizer", None) is not optimizer:
            raise ValueError(
                f"SequentialLR: schedulers[{i}] ({type(scheduler).__name__}) "
                "drives another optimizer, but all must drive the one given."
            )
    if len(milestones) != len(schedulers) - 1:
        raise ValueError(
            f"SequentialLR: {len(schedulers)} scheduler(s) need "
            f"{len(schedulers) - 1} milestone(s), got {len(milestones)}."
        )
    if any(b <= a for a, b in zip(milestones, milestones[1:])):
        raise ValueError(
            f"SequentialLR: milestones must increase, got {milestones}."
        )


def _undo_initial_step(scheduler):
    if isinstance(scheduler, SequentialLR):
        for inner in scheduler._schedulers:
            _undo_initial_step(inner)
    else:
        scheduler.last_epoch -= 1
