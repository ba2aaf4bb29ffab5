"""Lifetimes, re-entrant Python code and floating-point state on the C path.

test_extension.py and test_extension_edge_cases.py compare the C path
(gradflow._C) with the Python path for values, records, warnings and
errors. This file covers four more things. Reference cycles reach
fast-op records through saved_tensors_hooks, local Function classes and
.grad views. Python code rebinds a tensor's array while Function.apply
records it. NumPy reports underflows for tiny arguments. The MXCSR state
after the C loops must leave NumPy's own reporting intact. Lifetime and crash cases run in a fresh interpreter,
because record tracking is process-wide and one-way.
"""

import textwrap
import traceback
import warnings

import numpy as np
import pytest

import gradflow as gf
from fresh_python import output_lines, run_python
from gradflow import _fastpath

pytestmark = pytest.mark.skipif(_fastpath.extension is None,
                                reason="runs without gradflow._C")

PATHS = ("c", "python")


# -- reference cycles through fast-op records ---------------------------------------

# Each body defines build(), which makes a graph with a reference cycle and
# returns a weak reference to its leaf x. The script builds it on the C path
# first, before anything switches record tracking on, then on the Python
# path, and reports for each whether the collector freed x.
_LIFETIME_SCRIPT = """
import gc, weakref
import numpy as np
import gradflow as gf
from gradflow import _fastpath

{body}

gc.disable()
for path in ("c", "python"):
    _fastpath.set_enabled(path == "c")
    ref = build()
    cycle = ref() is not None
    gc.collect()
    print(path, "cycle" if cycle else "no cycle",
          "leaked" if ref() is not None else "collected", flush=True)
"""


def _lifetimes(body):
    """Return the script's report lines, one per path."""
    script = _LIFETIME_SCRIPT.format(body=textwrap.dedent(body))
    result = run_python(script)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split("\n")


CYCLES = {
    # Inside a saved_tensors_hooks block a record keeps a packed saved
    # input, which holds the unpack hook. Here that hook refers to a list
    # that later receives a tensor computed from the record's output:
    # x -> sin's record -> packed value -> unpack hook -> box -> z -> tanh's
    # record -> ... -> sin's record. The fast records made after it must be
    # under the collector as well.
    "packed_input": """
        def build():
            x = gf.tensor([1.0, 2.0], requires_grad=True)
            box = []

            def unpack(packed):
                return packed if box else packed

            with gf.autograd.graph.saved_tensors_hooks(lambda t: t, unpack):
                y = gf.sin(x)
            box.append(gf.tanh(y * 2.0))
            return weakref.ref(x)
    """,
    # A Function class defined in a function can close over later values
    # through its methods, and every record refers to its class. Here the
    # backward reads z, a tensor computed from the record's output:
    # x -> Scale's record -> Scale -> backward -> cell of z -> z -> tanh's
    # record -> Scale's record.
    "function_class": """
        def build():
            x = gf.tensor([1.0, 2.0], requires_grad=True)

            class Scale(gf.autograd.Function):
                @staticmethod
                def forward(ctx, a):
                    return a * 2.0

                @staticmethod
                def backward(ctx, grad):
                    return grad * 2.0 + 0.0 * z.data

            z = gf.tanh(Scale.apply(x))
            return weakref.ref(x)
    """,
    # A view taken under no_grad has no grad_fn, but it keeps its base, and
    # that base may carry a graph. Assigned as x.grad it closes the cycle
    # x -> x.grad -> the view's base y -> y's records -> x.
    "grad_view": """
        def build():
            x = gf.tensor([1.0, 2.0], requires_grad=True)
            y = gf.tanh(x * 2.0)
            with gf.no_grad():
                view = y[:]
            x.grad = view
            return weakref.ref(x)
    """,
}


@pytest.mark.parametrize("name", sorted(CYCLES))
def test_cycle_collected(name):
    # The Python path collects each cycle, and the C path must too.
    report = _lifetimes(CYCLES[name])
    assert "python cycle collected" in report
    assert "c cycle collected" in report


# -- Python code inside the C bookkeeping of Function.apply --------------------------

# In both scripts the forward first gives x a new array that only x holds.
# Python code that runs while apply records the op then replaces that array
# too, which frees it. The Python apply keeps its own reference to each
# array it still reads, and the C apply must not read a freed one (under
# PYTHONMALLOC=debug such a read crashes).
REBINDING_SCRIPTS = {
    # The output's shape property runs while apply reads the output
    # metadata, after it took the array of the first input for the record's
    # array module.
    "output_shape": """
        class Output(np.ndarray):
            calls = 0

            @property
            def shape(self):
                Output.calls += 1
                if Output.calls == 2:
                    holder["x"].data = np.zeros(3)
                return super().shape

        class Op(gf.autograd.Function):
            @staticmethod
            def forward(ctx, a):
                holder["x"].data = np.ones(3)
                Output.calls = 0
                return (a * 2.0).view(Output)

            @staticmethod
            def backward(ctx, grad):
                return grad
    """,
    # The input array's own shape property runs while apply reads the
    # input metadata.
    "input_shape": """
        class Input(np.ndarray):
            @property
            def shape(self):
                holder["x"].data = np.zeros(4)
                return super().shape

        class Op(gf.autograd.Function):
            @staticmethod
            def forward(ctx, a):
                holder["x"].data = np.ones(5).view(Input)
                return a * 2.0

            @staticmethod
            def backward(ctx, grad):
                return grad
    """,
}


@pytest.mark.parametrize("name", sorted(REBINDING_SCRIPTS))
def test_apply_array_freed_while_recording(name):
    result = run_python(textwrap.dedent("""
        import numpy as np
        import gradflow as gf
        from gradflow import _fastpath

        holder = {}
    """) + textwrap.dedent(REBINDING_SCRIPTS[name]) + textwrap.dedent("""
        for path in ("python", "c"):
            _fastpath.set_enabled(path == "c")
            x = gf.tensor(np.ones(3), requires_grad=True)
            holder["x"] = x
            record = Op.apply(x).grad_fn
            print(path, record.array_module.__name__, record.input_meta, flush=True)
    """), PYTHONMALLOC="debug")
    lines = result.stdout.split("\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(lines) >= 2
    assert lines[1].replace("c ", "", 1) == lines[0].replace("python ", "", 1)


# -- floating-point exceptions that NumPy reports -------------------------------------

# float32 inputs for which NumPy's own sin, cos and exp raise an underflow,
# although the C path's pre-scan accepts them (small normal arguments of sin
# and cos, a subnormal argument of exp).
UNDERFLOW_CASES = {
    "sin_small": (gf.sin, 1e-20),
    "cos_small": (gf.cos, 1e-20),
    "exp_subnormal": (gf.exp, 1e-44),
}


def _underflow_outcome(name, under):
    fn, value = UNDERFLOW_CASES[name]
    x = gf.tensor(np.array([value, 0.5], dtype=np.float32), requires_grad=True)
    with warnings.catch_warnings(record=True) as caught, np.errstate(under=under):
        warnings.simplefilter("always")
        try:
            fn(x)
            raised = None
        except FloatingPointError as exc:
            raised = traceback.extract_tb(exc.__traceback__)[-1].filename
    return sorted({w.filename for w in caught}), raised


@pytest.mark.parametrize("name", sorted(UNDERFLOW_CASES))
def test_underflow_reported_from_gradflow(name):
    # NumPy attributes a floating-point warning to the Python frame on top,
    # and raises FloatingPointError there under np.errstate(..="raise"). On
    # the Python path that frame is gradflow's op code, so module filters
    # and the once-per-location rule see gradflow. The C path must report
    # the same file, which it does by leaving such inputs to Python.
    outcomes = {}
    for path in PATHS:
        with _fastpath.enabled(path == "c"):
            outcomes[path] = (_underflow_outcome(name, "warn")[0],
                              _underflow_outcome(name, "raise")[1])
    assert outcomes["c"][0] == outcomes["python"][0]
    assert outcomes["c"][1] == outcomes["python"][1]


# -- floating-point state after the C loops --------------------------------------

_MXCSR_CONTROL = """
import warnings
import numpy as np
import gradflow as gf
from gradflow import _fastpath

# Leave the SSE overflow flag set, as an ignored NumPy overflow does.
with np.errstate(all="ignore"):
    np.array([3e38], np.float32) * np.float32(10.0)

with _fastpath.enabled(True), np.errstate(all="raise"):
    x = gf.tensor(np.array([1.0, 2.0, 3.0], np.float32), requires_grad=True)
    y = gf.tanh(x * 2.0 + 1.0) / (x - 0.5)
    y.backward(gf.tensor(np.ones(3, np.float32)))
    z = x * 1e38
    with np.errstate(over="ignore"):
        z = z * 10.0

subnormal = np.array([1e-40], np.float32) * np.float32(1.0)
halved = np.array([2.0 ** -1022], np.float64) / 4.0
print("subnormal kept", subnormal[0] != 0, halved[0] != 0)
try:
    with np.errstate(all="raise"):
        np.array([1e300]) * 1e300
    print("overflow ignored")
except FloatingPointError as error:
    print("overflow raised", error)
with warnings.catch_warnings(record=True) as caught, np.errstate(all="warn"):
    warnings.simplefilter("always")
    np.array([1.0], np.float32) / np.float32(0.0)
print("warnings", [str(w.message) for w in caught])
"""


def test_fast_ops_keep_mxcsr_control():
    # The C loops clear only the four exception flags of MXCSR on x86-64
    # (kernels.c). Flags that earlier code left set must not make a fast op
    # raise. After the fast ops, NumPy must still produce subnormals (no
    # flush-to-zero) and report its own overflow and division by zero.
    lines = output_lines(_MXCSR_CONTROL)
    assert "subnormal kept True True" in lines
    assert any(line.startswith("overflow raised overflow encountered") for line in lines)
    assert "warnings ['divide by zero encountered in divide']" in lines
