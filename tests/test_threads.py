"""The OpenMP spin setting of the parallel CPU kernels, checked in fresh interpreters.

The setting applies only if gradflow comes before Numba's OpenMP threads
start, so every case runs in a new process.
"""

import os
import subprocess
import sys
import textwrap

import pytest

WARNING = "Numba's OpenMP threads started before gradflow was imported"

_SCRIPT = """
import warnings
import numba

{before}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import gradflow
{after}
print("layer", numba.threading_layer())
print("spincount", __import__("os").environ.get("GOMP_SPINCOUNT"))
for w in caught:
    print("warning", w.category.__name__, str(w.message))
"""


def _run(before="", after="", **env):
    environ = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    environ.update(env)
    script = _SCRIPT.format(before=textwrap.dedent(before), after=textwrap.dedent(after))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                            text=True, timeout=120, env=environ)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    layer = next(line.split()[1] for line in lines if line.startswith("layer "))
    if layer != "omp":
        pytest.skip(f"Numba runs on the {layer} threading layer here, not OpenMP")
    return lines


def test_threads_started_first_warns():
    lines = _run(before="numba.set_num_threads(1)")
    warnings = [line for line in lines if line.startswith("warning ")]
    assert len(warnings) == 1
    assert warnings[0].startswith("warning PerformanceWarning " + WARNING)
    assert "GOMP_SPINCOUNT=0" in warnings[0]


def test_gradflow_first_sets_spincount_quietly():
    lines = _run(after="numba.set_num_threads(1)")
    assert "spincount 0" in lines
    assert not [line for line in lines if line.startswith("warning ")]


def test_user_spincount_kept_without_warning():
    lines = _run(before="numba.set_num_threads(1)", GOMP_SPINCOUNT="1000")
    assert "spincount 1000" in lines
    assert not [line for line in lines if line.startswith("warning ")]
