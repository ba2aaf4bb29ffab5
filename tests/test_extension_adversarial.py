"""Adversarial cases for the C extension (gradflow._C) that the earlier files leave out.

tests/test_extension.py, test_extension_edge_cases.py and
test_extension_robustness.py compare the C path with the Python path for
values, records, warnings, cycles through hooks and ctx attributes, and
Python code run by Function.apply. This file adds Python code that the
cyclic garbage collector runs in the middle of the C bookkeeping, objects
that the record-tracking check of records.c takes for immutable, and the
lifetime of Function classes that records.c caches. Every case runs in a
fresh interpreter, because record tracking is process-wide and one-way.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from gradflow import _fastpath

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(_fastpath.extension is None,
                                reason="runs without gradflow._C")


def _run_script(body, pure_python=False):
    env = dict(os.environ)
    env.pop("GRADFLOW_PURE_PYTHON", None)
    if pure_python:
        env["GRADFLOW_PURE_PYTHON"] = "1"
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(body)], capture_output=True,
        text=True, timeout=60, cwd=ROOT, env=env,
    )


def _last_line(result):
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


# -- Python code that the collector runs inside gf_untrack_record -----------------

# Each child process arms a garbage cycle whose __del__ switches record
# tracking on, sets the collector's threshold to `n` and records fast ops, so
# that for some `n` the collection runs during one particular allocation of
# the C bookkeeping. The parent reports the thresholds whose child died.
_COLLECTION_SWEEP = """
import gc, os, sys
import numpy as np
import gradflow as gf
from gradflow import _fastpath

class TrackOnDelete:
    def __del__(self):
        _fastpath.track_records()

x = gf.tensor(np.ones(3, np.float32), requires_grad=True)
outputs = []
crashed = []
for n in range(1, 41):
    pid = os.fork()
    if pid == 0:
        gc.collect()
        cycle = TrackOnDelete()
        cycle.self = cycle
        del cycle
        gc.set_threshold(n)
        for _ in range(3):
            outputs.append(x * 2.0)
        gc.set_threshold(700)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) or os.WEXITSTATUS(status) != 0:
        crashed.append(n)
print(crashed)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_collection_inside_untrack_record():
    # A __del__ that the collector runs while an op records itself may
    # switch record tracking on. On the Python path the op finishes
    # normally. On the C path the collection can run inside an allocation
    # of gf_untrack_record (records.c), after which `registry` is gone and
    # tracking is on; the op must finish there too.
    result = _run_script(_COLLECTION_SWEEP)
    assert _last_line(result) == "[]", "thresholds whose child crashed"


# -- cycles through objects that could pass for immutable -------------------------

_TENSOR_SUBCLASS_CYCLE = """
import gc, weakref
import numpy as np
import gradflow as gf

class TaggedTensor(gf.Tensor):
    pass

def build():
    x = TaggedTensor(np.ones(3, np.float32), requires_grad=True)
    y = x * 2.0
    x.last_output = y
    return weakref.ref(x)

ref = build()
gc.collect()
print(ref() is None)
"""


def test_tensor_subclass_attribute_cycle():
    # A Tensor subclass without __slots__ has a __dict__, so a leaf can refer
    # to a tensor computed from it: x -> y -> record -> x. The Python path
    # frees the cycle. An untracked fast-op record of x * 2.0 would keep it
    # alive, so fast ops take the Python path for such an input.
    result = _run_script(_TENSOR_SUBCLASS_CYCLE)
    assert _last_line(result) == "True", "the leaf x was not freed"


_TUPLE_SUBCLASS_CYCLE = """
import gc, weakref
import numpy as np
import gradflow as gf

class Settings(tuple):
    pass

class Scale(gf.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.settings = Settings((2.0,))
        return x * 2.0

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.settings[0]

def build():
    x = gf.tensor(np.ones(3, np.float32), requires_grad=True)
    y = Scale.apply(x)
    z = y * 3.0
    y.grad_fn.settings.result = z
    return weakref.ref(y.grad_fn)

ref = build()
gc.collect()
print(ref() is None)
"""


def test_tuple_subclass_ctx_attribute_cycle():
    # An instance of a tuple subclass without __slots__ gets a __dict__ on
    # its first attribute, so it can later refer to a tensor computed after
    # the record: ctx -> settings -> z -> record of y * 3.0 -> ctx. The
    # Python path frees the cycle. may_refer_to_graph (records.c) must count
    # such a tuple as mutable, or the untracked record of y * 3.0 keeps the
    # cycle alive.
    result = _run_script(_TUPLE_SUBCLASS_CYCLE)
    assert _last_line(result) == "True", "the record of Scale was not freed"


# -- lifetime of Function classes ---------------------------------------------------

_UNLOADED_FUNCTION_CLASS = """
import gc, sys, types, weakref
import numpy as np
import gradflow as gf

module = types.ModuleType("adversarial_functions")
sys.modules[module.__name__] = module
exec('''
import gradflow as gf

class Double(gf.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2
''', module.__dict__)

x = gf.tensor(np.ones(3, np.float32), requires_grad=True)
y = module.Double.apply(x)
ref = weakref.ref(module.Double)
del y, module
del sys.modules["adversarial_functions"]
gc.collect()
print(ref() is None)
"""


def test_unloaded_function_class_freed():
    # Once its module is gone, the collector frees a Function class defined
    # at module level (GRADFLOW_PURE_PYTHON=1 shows it). The C path caches
    # such classes in class_is_module_level (records.c); the cache must not
    # keep them alive, or a class of a reloaded module or one redefined in
    # a notebook is never freed.
    assert _last_line(_run_script(_UNLOADED_FUNCTION_CLASS, pure_python=True)) == "True"
    result = _run_script(_UNLOADED_FUNCTION_CLASS)
    assert _last_line(result) == "True", "the Function class was not freed"
