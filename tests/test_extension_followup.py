"""Follow-up cases for the C extension (gradflow._C) and the OpenMP warning.

The test_extension*.py files compare the C path with the Python path.
This file adds reference cycles that could reach untracked fast-op
records: through Tensor subclasses that can hold attributes, through a
.grad of such a subclass, and through a Function class that left its
module. It also checks the MXCSR control bits after the C loops, and the
PerformanceWarning of kernels/_threads.py in settings where Numba's
OpenMP workers do not busy-wait. Lifetime and thread cases run in a fresh
interpreter, because record tracking is process-wide and one-way, and
OpenMP reads its settings once per process.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from gradflow import _fastpath

ROOT = pathlib.Path(__file__).resolve().parents[1]
needs_extension = pytest.mark.skipif(_fastpath.extension is None,
                                     reason="runs without gradflow._C")


def _run_script(body, pure_python=False, **env):
    environ = {k: v for k, v in os.environ.items()
               if k not in ("GRADFLOW_PURE_PYTHON", "GOMP_SPINCOUNT")}
    if pure_python:
        environ["GRADFLOW_PURE_PYTHON"] = "1"
    environ.update(env)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(body)], capture_output=True,
        text=True, timeout=60, cwd=ROOT, env=environ,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.splitlines()


def _freed_on_both_paths(body):
    """Return whether the script's last line reads "True" in pure Python and with the C path."""
    return (_run_script(body, pure_python=True)[-1] == "True",
            _run_script(body)[-1] == "True")


# -- reference cycles through untracked fast-op records ---------------------------

_SLOTTED_SUBCLASS_INPUT = """
import gc, weakref
import numpy as np
import gradflow as gf

class SlottedTensor(gf.Tensor):
    __slots__ = ("last_output",)

def build():
    x = SlottedTensor(np.ones(3, np.float32), requires_grad=True)
    y = x * 2.0
    x.last_output = y
    return weakref.ref(x)

ref = build()
gc.collect()
print(ref() is None)
"""


@needs_extension
def test_slotted_subclass_input_cycle():
    # A Tensor subclass with __slots__ has no __dict__, but an object slot
    # can still refer to a later tensor: x -> y -> record of x * 2.0 -> x.
    # The Python path frees the cycle, so a record that refers to such an
    # input must switch record tracking on (records.c).
    python_freed, c_freed = _freed_on_both_paths(_SLOTTED_SUBCLASS_INPUT)
    assert python_freed
    assert c_freed, "the leaf x was not freed on the C path"


_DICT_SUBCLASS_LEAF_CHAIN = """
import gc, weakref
import numpy as np
import gradflow as gf

class TaggedTensor(gf.Tensor):
    pass

def build():
    x = TaggedTensor(np.ones(3, np.float32), requires_grad=True)
    y = x * 2.0
    z = y * 3.0
    x.last_output = z
    return weakref.ref(x)

ref = build()
gc.collect()
print(ref() is None)
"""


@needs_extension
def test_dict_subclass_leaf_chain_cycle():
    # y is a plain Tensor, so the record of y * 3.0 is a fast-op record, on
    # the cycle x -> z -> record of y * 3.0 -> record of x * 2.0 -> x. The
    # Python path frees it, so the subclass input of the first op must have
    # switched record tracking on for every later record too.
    python_freed, c_freed = _freed_on_both_paths(_DICT_SUBCLASS_LEAF_CHAIN)
    assert python_freed
    assert c_freed, "the leaf x was not freed on the C path"


_GRAD_SUBCLASS = """
import gc, weakref
import numpy as np
import gradflow as gf

class TaggedTensor(gf.Tensor):
    pass

class SlottedTensor(gf.Tensor):
    __slots__ = ("other",)

def build(kind):
    x = gf.tensor(np.ones(3, np.float32), requires_grad=True)
    y = x * 2.0
    gradient = kind(np.zeros(3, np.float32))
    x.grad = gradient
    gradient.other = y
    return weakref.ref(x)

refs = [build(TaggedTensor), build(SlottedTensor)]
gc.collect()
print(all(ref() is None for ref in refs))
"""


@needs_extension
def test_grad_subclass_attribute_cycle():
    # x.grad is a Tensor subclass instance that later refers to y = x * 2.0,
    # through a __dict__ attribute or an object slot: x -> grad -> y ->
    # record -> x. The Python path frees the cycle, so the .grad setter
    # (gradflow/_tensor.py) must switch tracking on for a gradient of a
    # subclass that can hold attributes.
    python_freed, c_freed = _freed_on_both_paths(_GRAD_SUBCLASS)
    assert python_freed
    assert c_freed, "the leaf x was not freed on the C path"


_FUNCTION_CLASS_LEFT_MODULE = """
import gc, sys, types, weakref
import numpy as np
import gradflow as gf

module = types.ModuleType("followup_functions")
sys.modules[module.__name__] = module
exec('''
import gradflow as gf

class Scale(gf.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2.0

    @staticmethod
    def backward(ctx, grad):
        return grad * 2.0
''', module.__dict__)

# The first record finds Scale at module level, which records.c caches.
module.Scale.apply(gf.tensor(np.ones(3, np.float32), requires_grad=True))
Scale = module.Scale
del module.Scale

def build():
    x = gf.tensor(np.ones(3, np.float32), requires_grad=True)
    y = Scale.apply(x)
    z = y * 3.0
    Scale.last_output = z
    return weakref.ref(x)

ref = build()
del Scale
gc.collect()
print(ref() is None)
"""


@needs_extension
def test_function_class_left_module_cycle():
    # Scale is applied once at module level and then removed from its
    # module, as a reload or a redefinition in a notebook does. A later
    # record of Scale and a class attribute make the cycle Scale -> z ->
    # record of y * 3.0 -> record of Scale -> Scale, which the Python path
    # frees. Only gradflow's own classes count as inert (records.c), so the
    # C path must free it too.
    python_freed, c_freed = _freed_on_both_paths(_FUNCTION_CLASS_LEFT_MODULE)
    assert python_freed
    assert c_freed, "the leaf x was not freed on the C path"


# -- floating-point state after the C loops -------------------------------------

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


@needs_extension
def test_fast_ops_keep_mxcsr_control():
    # The C loops clear only the four exception flags of MXCSR on x86-64
    # (kernels.c). Flags that earlier code left set must not make a fast op
    # raise. After the fast ops, NumPy must still produce subnormals (no
    # flush-to-zero) and report its own overflow and division by zero.
    lines = _run_script(_MXCSR_CONTROL)
    assert "subnormal kept True True" in lines
    assert any(line.startswith("overflow raised overflow encountered") for line in lines)
    assert "warnings ['divide by zero encountered in divide']" in lines


# -- the OpenMP spin warning (kernels/_threads.py) ------------------------------

_THREADS_FIRST = """
import warnings
import numba

numba.set_num_threads(1)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import gradflow
{after}
print("layer", numba.threading_layer())
for w in caught:
    print("warning", w.category.__name__)
"""


def _threads_run(after="", **env):
    lines = _run_script(_THREADS_FIRST.format(after=textwrap.dedent(after)), **env)
    layer = next(line.split()[1] for line in lines if line.startswith("layer "))
    return layer, [line for line in lines if line.startswith("warning ")]


def test_passive_wait_policy_no_spin_warning():
    # With OMP_WAIT_POLICY=PASSIVE, GNU OpenMP's spin count defaults to 0
    # (GCC libgomp manual, section GOMP_SPINCOUNT), so workers that started
    # before gradflow do not busy-wait, and _threads.py must not warn.
    layer, caught = _threads_run(OMP_WAIT_POLICY="PASSIVE")
    if layer != "omp":
        pytest.skip(f"Numba runs on the {layer} threading layer here, not OpenMP")
    assert caught == []


def test_workqueue_layer_no_spin_warning():
    # Numba's workqueue layer has no OpenMP workers, so nothing spins.
    layer, caught = _threads_run(NUMBA_THREADING_LAYER="workqueue")
    assert layer == "workqueue"
    assert caught == []


def test_second_import_no_spin_warning():
    # The first import set GOMP_SPINCOUNT=0 before the workers started, so a
    # fresh import of every gradflow module after set_num_threads() must not
    # warn: the workers already read the setting.
    script = """
    import sys, warnings
    import gradflow
    import numba

    numba.set_num_threads(1)
    for name in [n for n in sys.modules if n.startswith("gradflow")]:
        del sys.modules[name]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import gradflow
    print("layer", numba.threading_layer())
    for w in caught:
        print("warning", w.category.__name__)
    """
    lines = _run_script(script)
    assert [line for line in lines if line.startswith("warning ")] == []
