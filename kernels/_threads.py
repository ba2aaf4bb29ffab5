"""Thread settings that the parallel CPU kernels need before their first launch."""

import os
import sys
import warnings

# Whether the user chose how OpenMP workers wait before gradflow was
# imported: a spin count of their own, or the passive wait policy, under
# which GNU OpenMP does not spin at all.
_USER_WAIT_SETTING = ("GOMP_SPINCOUNT" in os.environ
                      or os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE")
# Whether the warning below is due but not issued yet; None until checked.
_warning_due = None


def limit_openmp_spinning(warn_now=True):
    """Make Numba's OpenMP worker threads sleep as soon as a kernel ends.

    By default GNU OpenMP workers busy-wait for the next parallel region.
    Between two kernels, gradflow runs OpenBLAS matrix products, whose own
    threads then compete with the spinning workers for the same cores; on a
    2-core machine an MLP's backward pass measured about 2.5x slower that
    way (benchmarks/RESULTS.md). A value the user has set is kept, and the
    setting takes effect only if the OpenMP runtime has not started yet.
    When it has (the program launched Numba's OpenMP threads before it
    imported gradflow), it issues a PerformanceWarning, once.

    The warning class comes from gradflow, whose import imports this
    package, so a caller that may run before gradflow is imported passes
    ``warn_now=False``. The check still happens then, and the warning
    waits for the next call.
    """
    global _warning_due
    os.environ.setdefault("GOMP_SPINCOUNT", "0")
    if _warning_due is None:
        _warning_due = not _USER_WAIT_SETTING and _openmp_layer_started()
    if _warning_due and warn_now:
        _warning_due = False
        from gradflow.errors import PerformanceWarning

        warnings.warn(
            "Numba's OpenMP threads started before gradflow was imported, so "
            "they busy-wait between gradflow's parallel CPU kernels and slow "
            "the NumPy matrix products in between (a 2-core MLP step measured "
            "about 4x slower). Import gradflow before the first "
            "numba.set_num_threads() call or parallel Numba function, or set "
            "GOMP_SPINCOUNT=0 in the environment before Python starts.",
            PerformanceWarning,
            stacklevel=2,
        )


def _openmp_layer_started():
    """Return whether Numba's threading layer already runs on GNU OpenMP."""
    numba = sys.modules.get("numba")
    if numba is None:
        return False
    try:
        return numba.threading_layer() == "omp"
    except ValueError:  # no threading layer started yet
        return False
