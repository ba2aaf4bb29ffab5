"""The binomial checkpointing schedule of Griewank and Walther, and its runner.

To reverse a chain of ``l`` steps while at most ``s`` states (snapshots,
the chain's input among them) are stored, the schedule stores a state part
way along, reverses the tail with one snapshot fewer, then reverses the head
again from the start. Some steps are run forward several times. The least
total number of forward steps ("advances", not counting the one recorded run
of each step right before its backward) is

    t(l, s) = r * l - beta(s + 1, r - 1),   beta(s, r) = (s + r)! / (s! r!),

where the repetition number r is the least integer with beta(s, r) >= l.
This is the closed form of A. Griewank and A. Walther, "Algorithm 799:
revolve", ACM Trans. Math. Software 26(1), 2000.
``binomial_forward_count`` evaluates it. ``binomial_schedule`` builds a
schedule from the recurrence F(l, c) = min_j [j + F(l - j, c - 1) + F(j, c)]
with F(1, c) = 0 and F(l, 0) = l (l - 1) / 2, where c counts the snapshots
beyond the input's, so t(l, s) = F(l, s - 1).
NOTE: the closed form here was checked against that recurrence (every
l < 60 and s < 12, and the tests), not against the paper's text.
"""

import functools
import math

__all__ = ["binomial_forward_count", "binomial_schedule"]


def _beta(s, r):
    return math.comb(s + r, s)


def binomial_forward_count(steps, snapshots):
    """Return t(steps, snapshots), the least number of forward steps (see above)."""
    _check_counts("binomial_forward_count", steps, snapshots)
    if snapshots >= steps:
        return steps - 1
    r = 0
    while _beta(snapshots, r) < steps:
        r += 1
    return r * steps - _beta(snapshots + 1, r - 1)


def _check_counts(where, steps, snapshots):
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{where}: steps must be a positive int, got {steps!r}")
    if not isinstance(snapshots, int) or snapshots < 1:
        raise ValueError(
            f"{where}: snapshots must be at least 1 (the input's), got "
            f"{snapshots!r}"
        )


@functools.lru_cache(maxsize=None)
def _cost(length, free):
    """Return (F(length, free), best first split) of the recurrence above."""
    if length == 1:
        return 0, 0
    if free == 0:
        return length * (length - 1) // 2, length - 1
    best, best_split = None, 0
    for split in range(1, length):
        cost = split + _cost(length - split, free - 1)[0] + _cost(split, free)[0]
        if best is None or cost < best:
            best, best_split = cost, split
    return best, best_split


def binomial_schedule(steps, snapshots):
    """Return the actions that reverse ``steps`` steps with ``snapshots`` states.

    Each action is a tuple: ("advance", i) runs step i unrecorded,
    ("store", i) keeps the current state, the input of step i, as a snapshot,
    ("restore", i) makes snapshot i the current state, ("drop", i) frees it,
    and ("reverse", i) runs step i recorded and backpropagates through it.
    State 0 (the chain's input) is always stored. The number of "advance"
    actions equals ``binomial_forward_count(steps, snapshots)``.
    """
    _check_counts("binomial_schedule", steps, snapshots)
    actions = []
    _reverse(0, steps, min(snapshots, steps) - 1, actions)
    return actions


def _reverse(start, length, free, actions):
    # The current state is the input of step ``start`` on entry.
    while length > 1:
        split = _cost(length, free)[1] if free else length - 1
        for i in range(start, start + split):
            actions.append(("advance", i))
        if free:
            actions.append(("store", start + split))
            _reverse(start + split, length - split, free - 1, actions)
            actions.append(("drop", start + split))
        else:
            actions.append(("reverse", start + split))
        actions.append(("restore", start))
        if free:
            length = split
        else:
            length -= 1
    actions.append(("reverse", start))
