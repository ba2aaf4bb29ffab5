"""A checkpointing schedule for a chain of layers, chosen to fit a memory budget.

``checkpoint_plan`` profiles each layer once on the sample input: the bytes
its records keep for backward (from ``gf.memory.Ledger``), whether it keeps
its input and output, and its unrecorded forward time. Then it picks the
schedule with the least recomputation whose predicted peak of activation
bytes fits the budget:

* a two-level schedule from a dynamic program over (layer, bytes held): each
  layer is either stored (its records stay on the tape) or belongs to a
  checkpointed segment that is recomputed once in backward;
* below what any two-level schedule reaches (about 2 sqrt(n) layers' worth),
  the binomial schedule, in which a step may be recomputed several times.

The memory model: at any time the tape keeps the stored layers' arrays and
each checkpointed segment's input. While a segment is recomputed in
backward, it adds its own arrays, and the segments after it are already
freed except for the arrays their records keep in plain ``ctx`` attributes
(``LayerProfile.attribute_bytes``), which live until the whole graph is
dropped. Gradient buffers and temporaries outside the tape are not counted.
"""

import math
import time

import numpy as np

from .. import memory
from .._tensor import Tensor
from ..autograd import _grad_mode
from ._chain_reversal import run_binomial
from ._region import checkpoint
from ._revolve import binomial_forward_count
from ._sequential import chain, list_layers

__all__ = ["CheckpointPlan", "LayerProfile", "checkpoint_plan"]

# The dynamic program counts bytes in units. More units are more exact and
# slower, since its cost grows linearly with them.
_MAX_UNITS = 2048


class LayerProfile:
    """The cost of one layer: bytes kept for backward, and forward seconds.

    ``attribute_bytes`` is the part of ``internal_bytes`` that the layer's
    records keep in plain ``ctx`` attributes, so backward does not free it.
    """

    __slots__ = ("internal_bytes", "keeps_input", "keeps_output", "input_bytes",
                 "output_bytes", "seconds", "attribute_bytes")

    def __init__(self, internal_bytes, keeps_input, keeps_output, input_bytes,
                 output_bytes, seconds, attribute_bytes=0):
        self.internal_bytes = internal_bytes
        self.keeps_input = keeps_input
        self.keeps_output = keeps_output
        self.input_bytes = input_bytes
        self.output_bytes = output_bytes
        self.seconds = seconds
        self.attribute_bytes = attribute_bytes

    def stored_bytes(self):
        """Return the bytes this layer alone keeps on the tape."""
        return (self.internal_bytes + self.keeps_input * self.input_bytes
                + self.keeps_output * self.output_bytes)


class CheckpointPlan:
    """A schedule for a chain of layers, with its predicted cost.

    ``segments`` lists (start, stop, checkpointed) layer ranges for the
    two-level kind, and ``snapshots`` is the snapshot count of the binomial
    kind.
    ``run(model, x)`` applies the model under the schedule.
    """

    def __init__(self, kind, budget_bytes, profiles, predicted_peak_bytes,
                 predicted_recompute_seconds, segments=None, snapshots=None):
        self.kind = kind
        self.budget_bytes = budget_bytes
        self.profiles = profiles
        self.predicted_peak_bytes = predicted_peak_bytes
        self.predicted_recompute_seconds = predicted_recompute_seconds
        self.segments = segments
        self.snapshots = snapshots
        self.counter = {"advances": 0}

    @property
    def recomputed_layers(self):
        """The number of layer forwards the schedule runs beyond a plain step."""
        if self.kind == "binomial":
            return binomial_forward_count(len(self.profiles), self.snapshots)
        return sum(stop - start for start, stop, ckpt in self.segments if ckpt)

    def run(self, model, x):
        """Return ``model(x)`` computed under this schedule."""
        layers = _layers_of(model)
        if len(layers) != len(self.profiles):
            raise ValueError(
                f"CheckpointPlan.run: the plan was made for {len(self.profiles)} "
                f"layers but the model has {len(layers)}. Make a new plan."
            )
        if self.kind == "binomial":
            return run_binomial(layers, x, self.snapshots, self.counter)
        for start, stop, checkpointed in self.segments:
            run = chain(layers[start:stop])
            x = checkpoint(run, x) if checkpointed else run(x)
        return x

    def measure(self, model, x, loss=None):
        """Run one training step under the plan, returning predicted and measured costs.

        The returned dict has ``predicted_peak_bytes``, ``measured_peak_bytes``
        (the ledger's peak of activation bytes), ``predicted_recompute_seconds``
        and ``step_seconds`` (forward plus backward, timed in the same call).
        """
        loss = loss or (lambda y: y.sum())
        with memory.Ledger() as ledger:
            start = time.perf_counter()
            loss(self.run(model, x)).backward()
            seconds = time.perf_counter() - start
        return {
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "measured_peak_bytes": ledger.peak_activation_bytes,
            "predicted_recompute_seconds": self.predicted_recompute_seconds,
            "step_seconds": seconds,
        }

    def __repr__(self):
        detail = (f"snapshots={self.snapshots}" if self.kind == "binomial" else
                  f"segments={self.segments}")
        return (f"CheckpointPlan({self.kind}, {detail}, predicted peak "
                f"{self.predicted_peak_bytes} bytes, recompute "
                f"{self.predicted_recompute_seconds:.4f} s)")


def checkpoint_plan(model, sample_input, budget_bytes, repeats=3):
    """Choose a checkpointing schedule for ``model`` whose peak fits ``budget_bytes``.

    ``model`` is a ``gf.nn.Sequential`` or a list of layers, each taking and
    returning one Tensor. ``sample_input`` must have the shape and device of
    real inputs, because the layers are profiled on it (``repeats`` timed
    runs per layer, the fastest kept). The budget counts activation bytes
    that the tape keeps, as ``gf.memory.Ledger`` does. Raises ValueError
    naming the smallest feasible budget when no schedule fits.

    >>> plan = gf.checkpoint_plan(model, x, budget_bytes=64 * 2**20)
    >>> y = plan.run(model, x)
    """
    layers = _layers_of(model)
    profiles = profile_layers(layers, sample_input, repeats)
    return plan_for_profiles(profiles, budget_bytes)


def plan_for_profiles(profiles, budget_bytes):
    """Return the fastest ``CheckpointPlan`` for ``profiles`` within the budget."""
    if not isinstance(budget_bytes, (int, np.integer)) or budget_bytes < 0:
        raise ValueError(
            f"checkpoint_plan: budget_bytes must be a non-negative int, got "
            f"{budget_bytes!r}"
        )
    units = _Units(profiles, budget_bytes)
    candidates = []
    two_level = _best_two_level(profiles, units, budget_bytes)
    if two_level is not None:
        candidates.append(two_level)
    binomial = _best_binomial(profiles, budget_bytes)
    if binomial is not None:
        candidates.append(binomial)
    if not candidates:
        smallest = min(_smallest_two_level(profiles), _binomial_peak(profiles, 1))
        raise ValueError(
            f"checkpoint_plan: no schedule keeps the peak within {budget_bytes} "
            f"bytes. The smallest feasible budget for this model and input is "
            f"{smallest} bytes. Raise the budget or use a smaller input."
        )
    return min(candidates, key=lambda p: (p.predicted_recompute_seconds,
                                          p.predicted_peak_bytes))


# -- profiling ----------------------------------------------------------


def profile_layers(layers, sample_input, repeats=3):
    """Return a ``LayerProfile`` per layer, measured on ``sample_input``."""
    if not isinstance(sample_input, Tensor):
        raise TypeError(
            f"checkpoint_plan: sample_input must be a Tensor, got "
            f"{type(sample_input).__name__}"
        )
    profiles = []
    state = sample_input
    input_counts = sample_input.grad_fn is not None
    with _grad_mode.enable_grad():
        for layer in layers:
            profile, out = _profile_layer(layer, state, input_counts, repeats)
            profiles.append(profile)
            state, input_counts = out, True
    return profiles


def _profile_layer(layer, state, input_counts, repeats):
    with memory.Ledger() as ledger:
        out = layer(state)
    keeps_input = ledger.holds(state.data)
    keeps_output = ledger.holds(out.data)
    input_bytes = state.data.nbytes if input_counts else 0
    output_bytes = out.data.nbytes
    internal = max(ledger.activation_bytes - keeps_input * input_bytes
                   - keeps_output * output_bytes, 0)
    attributes = min(ledger.attribute_bytes, internal)
    seconds = _time_unrecorded(layer, state, repeats)
    profile = LayerProfile(internal, keeps_input, keeps_output, input_bytes,
                           output_bytes, seconds, attributes)
    return profile, out


def _time_unrecorded(layer, state, repeats):
    best = math.inf
    with _grad_mode.no_grad():
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            layer(state)
            best = min(best, time.perf_counter() - start)
    return best


# -- the two-level schedule ----------------------------------------------


class _Units:
    """Bytes to DP units: their common divisor, or a coarser rounded unit."""

    def __init__(self, profiles, budget_bytes):
        sizes = [p.internal_bytes for p in profiles] + [
            p.input_bytes for p in profiles] + [p.output_bytes for p in profiles]
        unit = 0
        for size in sizes:
            unit = math.gcd(unit, int(size))
        unit = max(unit, 1)
        if budget_bytes // unit > _MAX_UNITS:
            unit = -(-budget_bytes // _MAX_UNITS)
        self.unit = unit
        self.budget = budget_bytes // unit

    def of(self, nbytes):
        # Rounded up, so that a schedule that fits in units fits in bytes.
        return -(-int(nbytes) // self.unit)


def _best_two_level(profiles, units, budget_bytes):
    solution = _two_level_dp(profiles, units)
    if solution is None:
        return None
    segments, seconds = solution
    peak = _two_level_peak(profiles, segments)
    if peak > budget_bytes:
        return None
    return CheckpointPlan("two-level", budget_bytes, profiles, peak, seconds,
                          segments=segments)


def _two_level_dp(profiles, units):
    """Return (segments, recompute seconds) of the fastest fitting schedule."""
    n = len(profiles)
    budget = units.budget
    inf = math.inf
    cost = [[np.full(budget + 1, inf) for _ in range(2)] for _ in range(n + 1)]
    back = [[np.full((budget + 1, 3), -1, dtype=np.int64) for _ in range(2)]
            for _ in range(n + 1)]
    cost[0][0][0] = 0.0
    seconds = np.concatenate([[0.0], np.cumsum([p.seconds for p in profiles])])
    # NOTE: which later layers are stored is not known yet here, so a
    # segment's recomputation is charged the attribute bytes of every later
    # layer. This bound may reject a schedule that fits, never the reverse.
    later = [units.of(sum(p.attribute_bytes for p in profiles[j:]))
             for j in range(n + 1)]
    for i in range(n):
        for held in (0, 1):
            current = cost[i][held]
            if not np.isfinite(current).any():
                continue
            _store_step(profiles, units, i, held, current, cost, back)
            _segment_steps(profiles, units, i, held, current, seconds, later,
                           cost, back)
    return _trace_back(cost, back, n)


def _relax(cost, back, j, held, candidate, shift, source):
    """Lower cost[j][held][m + shift] to candidate[m] where that is smaller."""
    target = cost[j][held]
    if shift > len(target) - 1:
        return
    window = target[shift:]
    moved = candidate[: len(window)]
    better = moved < window
    if better.any():
        window[better] = moved[better]
        rows = np.nonzero(better)[0]
        entries = back[j][held]
        entries[rows + shift, 0] = source[0]
        entries[rows + shift, 1] = source[1]
        entries[rows + shift, 2] = rows


def _store_step(profiles, units, i, held, current, cost, back):
    p = profiles[i]
    add = units.of(p.internal_bytes) + units.of(p.keeps_output * p.output_bytes)
    if p.keeps_input and not held:
        add += units.of(p.input_bytes)
    # A source is (previous layer, previous held flag); a segment's source
    # stores -(start + 1), so the sign tells a stored layer from a segment.
    _relax(cost, back, i + 1, int(p.keeps_output), current, add, (i, held))


def _segment_steps(profiles, units, i, held, current, seconds, later, cost,
                   back):
    add = 0 if held else units.of(profiles[i].input_bytes)
    transient = 0
    for j in range(i + 1, len(profiles) + 1):
        transient += _recomputed_bytes(profiles, units, i, j)
        if units.budget - add - transient < 0:
            break
        # The limit is not monotone in j, since later[j] shrinks as j grows.
        limit = units.budget - add - transient - later[j]
        if limit < 0:
            continue
        candidate = current.copy()
        candidate[limit + 1:] = math.inf
        candidate = candidate + (seconds[j] - seconds[i])
        _relax(cost, back, j, 0, candidate, add, (-(i + 1), held))


def _recomputed_bytes(profiles, units, start, stop):
    # The bytes layer stop-1 adds while its segment [start, stop) is recomputed.
    p = profiles[stop - 1]
    extra = units.of(p.internal_bytes) + units.of(p.keeps_output * p.output_bytes)
    if stop - 1 > start and p.keeps_input and not profiles[stop - 2].keeps_output:
        extra += units.of(p.input_bytes)
    return extra


def _trace_back(cost, back, n):
    best = None
    for held in (0, 1):
        row = cost[n][held]
        finite = np.nonzero(np.isfinite(row))[0]
        for m in finite:
            key = (row[m], m)
            if best is None or key < best[0]:
                best = (key, held, int(m))
    if best is None:
        return None
    (seconds, _), held, m = best
    segments = []
    j = n
    while j > 0:
        source, prev_held, prev_m = back[j][held][m]
        if source >= 0:
            segments.append((int(source), j, False))
            j = int(source)
        else:
            start = int(-source - 1)
            segments.append((start, j, True))
            j = start
        held, m = int(prev_held), int(prev_m)
    return _merge_stored(segments[::-1]), float(seconds)


def _merge_stored(segments):
    merged = []
    for start, stop, checkpointed in segments:
        if merged and not checkpointed and not merged[-1][2]:
            merged[-1] = (merged[-1][0], stop, False)
        else:
            merged.append((start, stop, checkpointed))
    return merged


def _two_level_peak(profiles, segments):
    """Return the peak of activation bytes the memory model predicts, in bytes."""
    held_bytes = 0
    held_boundary = False
    peak = 0
    for start, stop, checkpointed in segments:
        if checkpointed:
            if not held_boundary:
                held_bytes += profiles[start].input_bytes
            transient = _segment_bytes(profiles, start, stop)
            kept_later = _attribute_bytes_after(profiles, segments, stop)
            peak = max(peak, held_bytes + transient + kept_later)
            held_boundary = False
        else:
            for i in range(start, stop):
                p = profiles[i]
                held_bytes += p.internal_bytes + p.keeps_output * p.output_bytes
                if p.keeps_input and not held_boundary:
                    held_bytes += p.input_bytes
                held_boundary = bool(p.keeps_output)
        peak = max(peak, held_bytes)
    return peak


def _attribute_bytes_after(profiles, segments, stop):
    # Stored layers after ``stop`` still keep their attribute arrays while
    # an earlier segment is recomputed.
    total = 0
    for start, end, checkpointed in segments:
        if not checkpointed and start >= stop:
            total += sum(p.attribute_bytes for p in profiles[start:end])
    return total


def _segment_bytes(profiles, start, stop):
    total = 0
    for k in range(start, stop):
        p = profiles[k]
        total += p.internal_bytes + p.keeps_output * p.output_bytes
        if k > start and p.keeps_input and not profiles[k - 1].keeps_output:
            total += p.input_bytes
    return total


def _smallest_two_level(profiles):
    """Return the least budget in bytes at which a two-level schedule exists."""
    low, high = 0, sum(p.stored_bytes() + p.input_bytes for p in profiles) + 1
    while low < high:
        middle = (low + high) // 2
        if _best_two_level(profiles, _Units(profiles, middle), middle) is None:
            low = middle + 1
        else:
            high = middle
    return low


# -- the binomial schedule -----------------------------------------------


def _binomial_peak(profiles, snapshots):
    """Return the predicted peak in bytes with ``snapshots`` stored states."""
    boundary = max(p.output_bytes for p in profiles)
    step = max(p.stored_bytes() for p in profiles)
    return profiles[0].input_bytes + (snapshots - 1) * boundary + step


def _best_binomial(profiles, budget_bytes):
    n = len(profiles)
    if _binomial_peak(profiles, 1) > budget_bytes:
        return None
    snapshots = 1
    while snapshots < n and _binomial_peak(profiles, snapshots + 1) <= budget_bytes:
        snapshots += 1
    mean_seconds = sum(p.seconds for p in profiles) / n
    seconds = binomial_forward_count(n, snapshots) * mean_seconds
    return CheckpointPlan("binomial", budget_bytes, profiles,
                          _binomial_peak(profiles, snapshots), seconds,
                          snapshots=snapshots)


def _layers_of(model):
    is_module = hasattr(model, "children") and callable(model.children)
    if not is_module and not isinstance(model, (list, tuple)):
        raise TypeError(
            "checkpoint_plan: model must be a gf.nn.Sequential or a list of "
            f"layers, got {type(model).__name__}. Wrap a single function or "
            "layer in a list, as [layer]."
        )
    layers = list_layers(model)
    for i, layer in enumerate(layers):
        if not callable(layer):
            raise TypeError(
                f"checkpoint_plan: item {i} of the model is a "
                f"{type(layer).__name__}, not a callable layer."
            )
    if not layers:
        raise ValueError("checkpoint_plan: the model contains no layer.")
    return layers
