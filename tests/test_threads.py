"""The OpenMP spin setting of the parallel CPU kernels, checked in fresh interpreters.

The setting applies only if gradflow comes before Numba's OpenMP threads
start, so every case runs in a new process. The cases run with NumPy's
OpenBLAS (GRADFLOW_BLAS=numpy) unless they say otherwise: with MKL the
products run on the OpenMP workers, and gradflow leaves their wait alone.
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
    env.setdefault("GRADFLOW_BLAS", "numpy")
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


def test_mkl_leaves_the_wait_alone():
    # MKL runs its products on the same workers, so they should stay awake
    # between a product and a kernel: no spin setting and no warning, even
    # with the workers started before gradflow.
    lines = _run(before="numba.set_num_threads(1)", after="""
        import gradflow_kernels
        print("library", gradflow_kernels._blas.LIBRARY is not None)
    """, GRADFLOW_BLAS="auto")
    if "library False" in lines:
        pytest.skip("MKL is not installed")
    assert "spincount None" in lines
    assert not _warnings(lines)


_FORKED_CHILD = """
import multiprocessing
import numpy as np
import gradflow as gf
import gradflow_kernels

gf.manual_seed(0)
model = gf.nn.Sequential(gf.nn.Linear(256, 256), gf.nn.GELU(), gf.nn.Linear(256, 10))
opt = gf.optim.Adam(model.parameters(), lr=1e-3)
buffer = gf.nn.utils.GradientBuffer(model.parameters())
x = gf.randn(512, 256)
target = gf.randint(0, 10, size=(512,))

def step():
    opt.zero_grad()
    loss = gf.nn.functional.cross_entropy(model(x), target)
    loss.backward()
    gf.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()

def child(queue):
    explicit = "ran"
    try:
        ones = np.ones(1 << 15, np.float32)
        gradflow_kernels.activation_backward("gelu", ones, ones)
    except RuntimeError as error:
        explicit = str(error)
    fused = gf.optim.Adam(model.parameters(), fused=True)
    try:
        fused.step()
    except ValueError as error:
        print("fused Adam:", "forked" if "was forked" in str(error) else error, flush=True)
    try:
        gf.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    except RuntimeError as error:
        print("foreach clip:", "forked" if "was forked" in str(error) else error, flush=True)
    queue.put(([step() for _ in range(3)], explicit))

if {warm}:
    step()
    print("layer", __import__("numba").threading_layer())
context = multiprocessing.get_context("fork")
queue = context.Queue()
process = context.Process(target=child, args=(queue,))
process.start()
process.join(60)
print("exit", process.exitcode)
losses, explicit = queue.get(timeout=5)
print("explicit", explicit)
print("close", np.allclose(losses, [step() for _ in range(3)], rtol=1e-5))
"""


@pytest.mark.parametrize("blas", ["numpy", "auto"])
def test_forked_child_skips_parallel_kernels(blas):
    # Numba ends a child forked after its OpenMP workers started, at the
    # child's first parallel loop, and MKL's products would wait for the
    # parent's workers forever. So gradflow's ops fall back to NumPy there.
    lines = output_lines(_FORKED_CHILD.replace("{warm}", "True"), GRADFLOW_BLAS=blas)
    if "layer omp" not in lines:
        pytest.skip("Numba does not run on OpenMP here")
    assert "exit 0" in lines
    assert "close True" in lines
    explicit = next(line for line in lines if line.startswith("explicit "))
    assert "forked after the OpenMP worker threads" in explicit
    assert "fused Adam: forked" in lines
    assert "foreach clip: forked" in lines


@pytest.mark.parametrize("blas", ["numpy", "auto"])
def test_fork_after_import_keeps_kernels(blas):
    # Importing gradflow starts no OpenMP workers (MKL's check product runs
    # on one thread), so such a child still runs the kernels and MKL.
    lines = output_lines(_FORKED_CHILD.replace("{warm}", "False"), GRADFLOW_BLAS=blas)
    assert "exit 0" in lines
    assert "close True" in lines
    assert "explicit ran" in lines


@pytest.mark.parametrize("numba_first", [False, True])
def test_mkl_puts_openmp_before_tbb(numba_first):
    before = "import numba" if numba_first else ""
    lines = output_lines(f"""
        {before}
        import gradflow
        import gradflow_kernels
        from numba.core import config

        print(gradflow_kernels._blas.LIBRARY is not None, " ".join(config.THREADING_LAYER_PRIORITY))
    """)
    if lines[-1].startswith("False"):
        pytest.skip("MKL is not installed")
    assert lines[-1] == "True omp tbb workqueue"


def test_user_layer_priority_kept():
    lines = output_lines("""
        import gradflow
        from numba.core import config

        print(" ".join(config.THREADING_LAYER_PRIORITY))
    """, NUMBA_THREADING_LAYER_PRIORITY="workqueue tbb omp")
    assert lines[-1] == "workqueue tbb omp"
