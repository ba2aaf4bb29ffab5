"""Anomaly detection: find the first op that makes a NaN or a new Inf.

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

NaN is reported at the first op whose output or gradient contains it. A NaN
that is already in an op's input (data, a parameter, a gradient passed to
``backward``) is reported as coming from that input, and is not blamed on
the op. Inf is reported only where an op makes it from finite inputs
(forward) or finite incoming gradients (backward). An Inf that an input
already carries is a legitimate value, such as the -inf of an attention
mask, so its passage through later ops is not reported.

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
    """Check every op in the block for a new NaN or Inf in outputs and gradients.

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
        _flag_op(outputs, [_array(arg) for arg in args])
        return
    ctx.anomaly_source = _user_source()
    ctx.anomaly_inputs = [_describe(arg) for arg in args if isinstance(arg, Tensor)]
    inputs = [_array(arg) for arg in args]
    for index, value in enumerate(outputs):
        kind = _new_anomaly(value, inputs)
        if kind is not None:
            _report_forward(ctx, args, index, value, kind)


def _check_backward(node, grad_outputs, grad_inputs):
    """Called by the engine with each record's gradients while detection is on."""
    incoming = [_array(grad) for grad in grad_outputs]
    if _mode == "flag":
        _flag_op([_array(g) for g in grad_inputs if g is not None], incoming)
        return
    for index, grad in enumerate(grad_inputs):
        if grad is None:
            continue
        kind = _new_anomaly(_array(grad), incoming)
        if kind is not None:
            _report_backward(node, incoming, index, _array(grad), kind)


def _new_anomaly(value, inputs):
    """Return "NaN" or "Inf" when ``value`` must be reported, else None.

    NaN is reported wherever it appears. Inf is reported only when every
    input is finite, because an infinite input (such as the -inf of an
    attention mask) legitimately carries through to the output.
    """
    if _is_finite(value):
        return None
    if _has_nan(value):
        return "NaN"
    return "Inf" if all(_is_finite(x) for x in inputs) else None


def _flag_op(outputs, inputs):
    """Apply ``_new_anomaly``'s rule to one op on the device, updating the flags."""
    inputs_finite = None
    for value in outputs:
        array = _float_array(value)
        if array is None:
            continue
        xp = _xp(array)
        not_finite = ~xp.isfinite(array).all()
        if xp is np and not not_finite:
            # A NumPy result is on the host already, so this branch costs no
            # synchronization and skips checking the inputs.
            continue
        if inputs_finite is None:
            inputs_finite = _all_finite_on_device(inputs)
        _raise_flag(array, xp.isnan(array).any() | (not_finite & inputs_finite))


# -- reports --------------------------------------------------------------


def _report_forward(ctx, args, index, value, kind):
    name = ctx.name
    for position, arg in enumerate(args):
        data = arg.data if isinstance(arg, Tensor) else arg
        if kind == "NaN" and _is_numeric(data) and _has_nan(data):
            raise AnomalyError(
                f"input {position} of '{name}' (forward) already contains "
                f"NaN {_shape_note(data)}, so '{name}' did not create it. It "
                "came from data, a parameter or an op run while detection was "
                "off, so check where that input was made. The op was called at "
                f"{_format_source(ctx.anomaly_source)}.",
                op=name, phase="forward", source=ctx.anomaly_source,
                from_input=True,
            )
    phase = "forward"
    if _in_backward():
        phase = "backward"
        name_note = f"'{name}' (an op of a backward recorded with create_graph=True)"
    else:
        name_note = f"'{name}' (forward)"
    inputs = [_array(arg) for arg in args]
    raise AnomalyError(
        f"{name_note} produced {kind} in output {index} "
        f"{_shape_note(value)} from {_inputs_note(inputs, 'inputs')} "
        f"[{', '.join(ctx.anomaly_inputs)}]. The op was called at "
        f"{_format_source(ctx.anomaly_source)}. Guard its inputs (clamp, add "
        "an epsilon, use a stable formula) or find why they reach this range.",
        op=name, phase=phase, source=ctx.anomaly_source,
    )


def _report_backward(node, incoming, index, grad, kind):
    name = node.name
    source = getattr(node, "anomaly_source", None)
    for position, grad_output in enumerate(incoming):
        if kind == "NaN" and _has_nan(grad_output):
            raise AnomalyError(
                f"the gradient of output {position} arriving at '{name}' "
                f"(backward) already contains NaN, so '{name}' did not create "
                "it. It was passed to backward(), returned by a hook, or "
                "produced by an op recorded while detection was off. The op was "
                f"called at {_format_source(source)}.",
                op=name, phase="backward", source=source, from_input=True,
            )
    inputs = getattr(node, "anomaly_inputs", None)
    if inputs is None:
        inputs = [_describe_meta(meta) for meta in node.input_meta]
    raise AnomalyError(
        f"'{name}' (backward) produced {kind} in the gradient of input {index} "
        f"{_shape_note(grad)} from {_inputs_note(incoming, 'output gradients')}. "
        f"Its forward inputs were [{', '.join(inputs)}]. The "
        f"op was called at {_format_source(source)}. Guard the op's inputs so "
        "its derivative stays finite there (e.g. sqrt and log near 0).",
        op=name, phase="backward", source=source,
    )


def _inputs_note(values, noun):
    if all(_is_finite(value) for value in values):
        return f"finite {noun}"
    return f"{noun} that contain Inf but no NaN"


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


def _has_nan(value):
    if not hasattr(value, "dtype"):
        return isinstance(value, float) and math.isnan(value)
    if value.dtype.kind not in "fc":
        return False
    return bool(_xp(value).isnan(value).any())


def _float_array(value):
    """Return ``value`` as a float or complex array, or None for other values."""
    if not hasattr(value, "dtype"):
        if not isinstance(value, float):
            return None
        value = np.asarray(value)
    return value if value.dtype.kind in "fc" else None


def _all_finite_on_device(values):
    """Return whether every value is finite, as a device bool where one is on CUDA."""
    finite = True
    for value in values:
        array = _float_array(value)
        if array is None:
            continue
        xp = _xp(array)
        result = xp.isfinite(array).all()
        finite = finite & (bool(result) if xp is np else result)
    return finite


def _raise_flag(array, bad):
    key = "cpu" if _xp(array) is np else array.device.id
    flag = _flags.get(key)
    _flags[key] = bad if flag is None else flag | bad


def _read_flags():
    # One host read per device that ran an op: the step's only synchronization.
    return any(bool(flag) for flag in _flags.values())


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
