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
    imported gradflow), it issues a PerformanceWarning, once. With MKL
    loaded (``_blas``), the products run on the OpenMP workers themselves,
    and the workers keep OpenMP's default wait (see ``prefer_openmp_layer``).

    The warning class comes from gradflow, whose import imports this
    package, so a caller that may run before gradflow is imported passes
    ``warn_now=False``. The check still happens then, and the warning
    waits for the next call.
    """
    global _warning_due
    from . import _blas

    if _blas.LIBRARY is not None:
        # MKL runs the products on the same OpenMP workers, so they should
        # wait for the next product or kernel awake.
        _warning_due = False
        prefer_openmp_layer()
        return
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


# Whether this process was forked from one whose OpenMP workers had started.
# Numba ends such a child at its first parallel loop ("fork() called from a
# process already using GNU OpenMP"), and an MKL product there waits forever
# for workers that the child does not have. So both step aside there.
forked_from_openmp = False


def _note_fork():
    global forked_from_openmp
    blas = sys.modules.get(__package__ + "._blas")
    mkl_ran = blas is not None and blas.ran_product
    if forked_from_openmp or mkl_ran or _openmp_layer_started():
        forked_from_openmp = True
        if blas is not None:
            blas.forget()


os.register_at_fork(after_in_child=_note_fork)


_PRIORITY = "NUMBA_THREADING_LAYER_PRIORITY"


def prefer_openmp_layer():
    """Put Numba's OpenMP layer ahead of TBB, where the user has not chosen.

    Numba tries TBB first, and the mkl wheel installs TBB. Where Numba can
    load it, the kernels would run on TBB's threads and MKL's products on
    OpenMP's, two pools again. Numba reads the setting when it starts its
    first parallel loop, from its config module or, before Numba is
    imported, from the environment.
    """
    if _PRIORITY in os.environ or "NUMBA_THREADING_LAYER" in os.environ:
        return
    numba = sys.modules.get("numba")
    if numba is None:
        os.environ[_PRIORITY] = "omp tbb workqueue"
        return
    from numba.core import config

    if list(config.THREADING_LAYER_PRIORITY) == ["tbb", "omp", "workqueue"]:
        config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]


def _openmp_layer_started():
    """Return whether Numba's threading layer already runs on GNU OpenMP."""
    numba = sys.modules.get("numba")
    if numba is None:
        return False
    try:
        return numba.threading_layer() == "omp"
    except ValueError:  # no threading layer started yet
        return False
