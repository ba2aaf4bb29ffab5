"""Anomaly detection: find the first op that turns finite values into NaN or Inf.

While detection is on, the outputs of every op's forward and the gradients
returned by every op's backward are checked, in one of two modes:

* ``"eager"`` checks each op as it runs and raises ``AnomalyError`` at the
  first non-finite value. The error names the op, the phase (forward or
  backward), the shapes and dtypes of the op's inputs, and the line of user
  code that created the op. On CUDA every check reads a result back to the
  host, so every op synchronizes the device.
* ``"flag"`` keeps one "non-finite value seen" flag per device, updated on
  the device without synchronizing, and reads it once at the end of the
  block. It cannot name the op, so ``check_step`` reruns a flagged step in
  eager mode to find it.

A value that is already non-finite in an op's input (data, a parameter, a
gradient passed to ``backward``) is reported as coming from that input, and
is not blamed on the op.

>>> x = gf.tensor([0.0, 1.0], requires_grad=True)
>>> with gf.detect_anomaly():
...     y = gf.log(x)      # raises AnomalyError naming 'Log' and this line
"""

import contextlib
import importlib.util
import linecache
import math
import os
import sys

import numpy as np

from . import _device, _random
from ._tensor import Tensor
from .autograd import _engine, _function
from .errors import AnomalyError

__all__ = ["check_step", "detect_anomaly", "is_anomaly_enabled", "set_detect_anomaly"]

_MODES = ("eager", "flag")

# None while detection is off, else one of _MODES.
# NOTE: the switch is process-wide, so detection turned on in one thread also
# checks the ops of every other thread.
_mode = None

# Flag mode's flags: device key -> 0-d bool array, True once a value was bad.
_flags = {}

# NumPy's error settings from before detection was turned on. Detection
# silences NumPy's divide/overflow/invalid warnings while it is on, because
# it reports the same events with the op's name, and a warning turned into
# an error (pytest -W error) would otherwise fire before the report.
_saved_numpy_errors = None


def _package_dirs():
    dirs = [os.path.dirname(os.path.abspath(__file__)) + os.sep]
    spec = importlib.util.find_spec("gradflow_kernels")
    if spec is not None and spec.origin:
        dirs.append(os.path.dirname(os.path.abspath(spec.origin)) + os.sep)
    return tuple(dirs)


# Frames in these folders belong to gradflow, so the user's line is the
# first frame outside them.
_PACKAGE_DIRS = _package_dirs()


# -- switches -------------------------------------------------------------


def is_anomaly_enabled():
    """Return True while anomaly detection is on, in either mode."""
    return _mode is not None


def set_detect_anomaly(enabled, mode="eager"):
    """Turn anomaly detection on or off for all later ops.

    ``mode`` is ``"eager"`` (raise at the first bad op) or ``"flag"`` (only
    record that a bad value was seen; see ``check_step``).
    """
    global _mode
    if not isinstance(enabled, bool):
        raise TypeError(
            f"set_detect_anomaly: enabled must be True or False, got {enabled!r}"
        )
    if mode not in _MODES:
        raise ValueError(
            f"set_detect_anomaly: mode must be 'eager' or 'flag', got {mode!r}"
        )
    _switch_numpy_errors(enabled)
    _mode = mode if enabled else None
    _function.anomaly_hook = _check_forward if enabled else None
    _engine.anomaly_hook = _check_backward if enabled else None


def _switch_numpy_errors(enabled):
    global _saved_numpy_errors
    if enabled and _saved_numpy_errors is None:
        _saved_numpy_errors = np.seterr(
            divide="ignore", over="ignore", invalid="ignore"
        )
    elif not enabled and _saved_numpy_errors is not None:
        np.seterr(**_saved_numpy_errors)
        _saved_numpy_errors = None


@contextlib.contextmanager
def detect_anomaly(mode="eager"):
    """Check every op in the block for NaN or Inf outputs and gradients.

    In ``"eager"`` mode the first bad op raises ``AnomalyError``. In
    ``"flag"`` mode the block runs without per-op synchronization, and
    ``AnomalyError`` is raised on leaving it if any op produced a non-finite
    value. The previous setting is restored on exit. Also usable as a
    decorator.
    """
    with _detection(mode):
        yield
        if mode == "flag" and _read_flags():
            raise AnomalyError(
                "detect_anomaly(mode='flag'): an op in this block produced a "
                "NaN or Inf. Run the block under detect_anomaly() (eager mode) "
                "or through gf.anomaly.check_step to name the op.",
            )


def check_step(step_fn, *args, **kwargs):
    """Run ``step_fn(*args, **kwargs)`` with a per-device flag, naming any bad op.

    The first run uses flag mode: the flag is read once, after the step, so
    on CUDA no op synchronizes. When it is set, the random generators are
    restored to their state before the step and the step runs again in eager
    mode, which raises ``AnomalyError`` at the first bad op. Returns the
    result of the first run when no value was bad.

    The rerun must repeat the first run's ops, so ``step_fn`` should compute
    the loss and call ``backward`` but leave the parameter update to the
    caller. ``.grad`` of the leaves receives a second contribution in the
    rerun, which is harmless because that run ends in an error.
    """
    rng_states = _random.all_rng_states()
    with _detection("flag"):
        result = step_fn(*args, **kwargs)
        flagged = _read_flags()
    if not flagged:
        return result
    _random.set_all_rng_states(rng_states)
    with _detection("eager"):
        step_fn(*args, **kwargs)
    raise AnomalyError(
        "check_step: the step produced a NaN or Inf, but its rerun with "
        "per-op checks produced none, so the step does not repeat itself. "
        "It probably changes its own inputs (an optimizer step inside "
        "step_fn) or draws random numbers from outside gradflow. Move those "
        "out of step_fn, or run it under detect_anomaly().",
    )


@contextlib.contextmanager
def _detection(mode):
    # Like detect_anomaly, but leaves the flags for the caller to read.
    global _flags
    previous_mode, previous_flags = _mode, _flags
    _flags = {}
    set_detect_anomaly(True, mode)
    try:
        yield
    finally:
        _flags = previous_flags
        set_detect_anomaly(previous_mode is not None, previous_mode or "eager")


# -- the hooks that ops and the engine call ---------------------------------


def _check_forward(ctx, args, out):
    """Called by Function.apply with each op's outputs while detection is on."""
    outputs = out if isinstance(out, tuple) else (out,)
    if _mode == "flag":
        for value in outputs:
            _update_flag(value)
        return
    ctx.anomaly_source = _user_source()
    ctx.anomaly_inputs = [_describe(arg) for arg in args if isinstance(arg, Tensor)]
    for index, value in enumerate(outputs):
        if not _is_finite(value):
            _report_forward(ctx, args, index, value)


def _check_backward(node, grad_outputs, grad_inputs):
    """Called by the engine with each record's gradients while detection is on."""
    if _mode == "flag":
        for grad in grad_inputs:
            if grad is not None:
                _update_flag(_array(grad))
        return
    for index, grad in enumerate(grad_inputs):
        if grad is not None and not _is_finite(_array(grad)):
            _report_backward(node, grad_outputs, index, _array(grad))


# -- reports --------------------------------------------------------------


def _report_forward(ctx, args, index, value):
    name = ctx.name
    for position, arg in enumerate(args):
        data = arg.data if isinstance(arg, Tensor) else arg
        if _is_numeric(data) and not _is_finite(data):
            raise AnomalyError(
                f"input {position} of '{name}' (forward) already contains "
                f"{_bad_kind(data)} {_shape_note(data)}, so '{name}' did not "
                "create it. It came from data, a parameter or an op run while "
                "detection was off, so check where that input was made. The "
                f"op was called at {_format_source(ctx.anomaly_source)}.",
                op=name, phase="forward", source=ctx.anomaly_source,
                from_input=True,
            )
    phase = "forward"
    if _in_backward():
        phase = "backward"
        name_note = f"'{name}' (an op of a backward recorded with create_graph=True)"
    else:
        name_note = f"'{name}' (forward)"
    raise AnomalyError(
        f"{name_note} produced {_bad_kind(value)} in output {index} "
        f"{_shape_note(value)} from finite inputs "
        f"[{', '.join(ctx.anomaly_inputs)}]. The op was called at "
        f"{_format_source(ctx.anomaly_source)}. Guard its inputs (clamp, add "
        "an epsilon, use a stable formula) or find why they reach this range.",
        op=name, phase=phase, source=ctx.anomaly_source,
    )


def _report_backward(node, grad_outputs, index, grad):
    name = node.name
    source = getattr(node, "anomaly_source", None)
    for position, incoming in enumerate(grad_outputs):
        incoming = _array(incoming)
        if not _is_finite(incoming):
            raise AnomalyError(
                f"the gradient of output {position} arriving at '{name}' "
                f"(backward) already contains {_bad_kind(incoming)}, so "
                f"'{name}' did not create it. It was passed to backward(), "
                "returned by a hook, or produced by an op recorded while "
                "detection was off. The op was called at "
                f"{_format_source(source)}.",
                op=name, phase="backward", source=source, from_input=True,
            )
    inputs = getattr(node, "anomaly_inputs", None)
    if inputs is None:
        inputs = [_describe_meta(meta) for meta in node.input_meta]
    raise AnomalyError(
        f"'{name}' (backward) produced {_bad_kind(grad)} in the gradient of "
        f"input {index} {_shape_note(grad)} from finite output gradients. Its "
        f"forward inputs were [{', '.join(inputs)}]. The op was called at "
        f"{_format_source(source)}. Guard the op's inputs so its derivative "
        "stays finite there (e.g. sqrt and log near 0).",
        op=name, phase="backward", source=source,
    )


# -- helpers --------------------------------------------------------------


def _user_source():
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIRS):
        frame = frame.f_back
    if frame is None:
        return None
    return frame.f_code.co_filename, frame.f_lineno


def _format_source(source):
    if source is None:
        return (
            "an unknown line (the op was created while detection was off; "
            "run the forward pass under detection too)"
        )
    filename, lineno = source
    code = linecache.getline(filename, lineno).strip()
    return f'{filename}:{lineno} ("{code}")' if code else f"{filename}:{lineno}"


def _in_backward():
    code = _engine.run_backward.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def _array(value):
    return value.data if isinstance(value, Tensor) else value


def _is_numeric(value):
    if isinstance(value, float):
        return True
    return isinstance(value, (np.ndarray, np.generic)) or hasattr(
        value, "__cuda_array_interface__"
    )


def _xp(array):
    if isinstance(array, (np.ndarray, np.generic)):
        return np
    return _device.array_module(array)


def _is_finite(value):
    if not hasattr(value, "dtype"):
        # A Python number that a forward returned or received.
        return not isinstance(value, float) or math.isfinite(value)
    if value.dtype.kind not in "fc":
        return True
    return bool(_xp(value).isfinite(value).all())


def _update_flag(array):
    if not hasattr(array, "dtype"):
        array = np.asarray(array)
    if array.dtype.kind not in "fc":
        return
    bad = ~_xp(array).isfinite(array).all()
    key = "cpu" if _xp(array) is np else array.device.id
    flag = _flags.get(key)
    _flags[key] = bad if flag is None else flag | bad


def _read_flags():
    # One host read per device that ran an op: the step's only synchronization.
    return any(bool(flag) for flag in _flags.values())


def _bad_kind(value):
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else "Inf"
    return "NaN" if bool(_xp(value).isnan(value).any()) else "Inf"


def _shape_note(value):
    if isinstance(value, float):
        return f"(the number {value})"
    return f"(shape {tuple(value.shape)}, dtype {value.dtype})"


def _describe(t):
    return f"shape {tuple(t.shape)} {t.dtype}"


def _describe_meta(meta):
    if meta is None:
        return "no grad"
    shape, dtype = meta
    return f"shape {tuple(shape)} {dtype}"
