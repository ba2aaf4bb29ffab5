"""The OpenMP spin setting of the parallel CPU kernels, checked in fresh interpreters.

The setting applies only if gradflow comes before Numba's OpenMP threads
start, so every case runs in a new process.
"""

import textwrap

import pytest

from fresh_python import output_lines

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


def _run_any_layer(before="", after="", **env):
    """Return the script's threading layer and its warning lines."""
    script = _SCRIPT.format(before=textwrap.dedent(before), after=textwrap.dedent(after))
    lines = output_lines(script, **env)
    layer = next(line.split()[1] for line in lines if line.startswith("layer "))
    return layer, lines


def _run(before="", after="", **env):
    """Return the script's output lines, skipping unless Numba runs on OpenMP."""
    layer, lines = _run_any_layer(before, after, **env)
    if layer != "omp":
        pytest.skip(f"Numba runs on the {layer} threading layer here, not OpenMP")
    return lines


def _warnings(lines):
    return [line for line in lines if line.startswith("warning ")]


def test_threads_started_first_warns():
    lines = _run(before="numba.set_num_threads(1)")
    warnings = _warnings(lines)
    assert len(warnings) == 1
    assert warnings[0].startswith("warning PerformanceWarning " + WARNING)
    assert "GOMP_SPINCOUNT=0" in warnings[0]


def test_gradflow_first_sets_spincount_quietly():
    lines = _run(after="numba.set_num_threads(1)")
    assert "spincount 0" in lines
    assert not _warnings(lines)


def test_user_spincount_kept_without_warning():
    lines = _run(before="numba.set_num_threads(1)", GOMP_SPINCOUNT="1000")
    assert "spincount 1000" in lines
    assert not _warnings(lines)


def test_passive_wait_policy_no_warning():
    # With OMP_WAIT_POLICY=PASSIVE and no GOMP_SPINCOUNT, GNU OpenMP uses a
    # spin count of 0 (libgomp manual, GOMP_SPINCOUNT), so workers that
    # started before gradflow do not busy-wait.
    lines = _run(before="numba.set_num_threads(1)", OMP_WAIT_POLICY="PASSIVE")
    assert _warnings(lines) == []


def test_workqueue_layer_no_warning():
    # Numba's workqueue layer has no OpenMP workers, so nothing spins.
    layer, lines = _run_any_layer(before="numba.set_num_threads(1)",
                                  NUMBA_THREADING_LAYER="workqueue")
    assert layer == "workqueue"
    assert _warnings(lines) == []


def test_second_import_no_warning():
    # The first import set GOMP_SPINCOUNT=0 before the workers started, so
    # they already read it, and a fresh import of every gradflow module after
    # set_num_threads() must not warn.
    _, lines = _run_any_layer(before="""
        import sys
        import gradflow

        numba.set_num_threads(1)
        for name in [n for n in sys.modules if n.startswith("gradflow")]:
            del sys.modules[name]
    """)
    assert _warnings(lines) == []


def test_kernels_package_imported_first():
    # gradflow_kernels imported before gradflow, after the workers started:
    # both imports work, and the warning comes once, at the first CPU kernel.
    lines = _run(before="""
        import numpy as np

        numba.set_num_threads(1)
        with warnings.catch_warnings(record=True) as early:
            warnings.simplefilter("always")
            import gradflow_kernels
        print("at import", len(early))
    """, after="""
        ones = np.ones(1 << 17, np.float32)
        with warnings.catch_warnings(record=True) as late:
            warnings.simplefilter("always")
            gradflow_kernels.fused_activation_backward("relu", ones, ones)
            gradflow_kernels.fused_activation_backward("relu", ones, ones)
        caught.extend(late)
    """)
    assert "at import 0" in lines
    warnings = _warnings(lines)
    assert len(warnings) == 1
    assert warnings[0].startswith("warning PerformanceWarning " + WARNING)
