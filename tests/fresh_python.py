"""Run a script in a fresh interpreter, for tests of process-wide state.

Record tracking in gradflow._C is process-wide and one-way, OpenMP reads
its settings once per process, and a crash must not take the test run with
it, so such tests run their cases here.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Settings of the test process that would change what a script measures.
_CLEARED = ("GRADFLOW_PURE_PYTHON", "GOMP_SPINCOUNT", "GRADFLOW_BLAS")


def run_python(body, pure_python=False, **env):
    """Run ``body`` (dedented) with ``python -c`` and return the completed process.

    The script starts from the repository root, without the variables in
    ``_CLEARED``; ``pure_python`` sets GRADFLOW_PURE_PYTHON=1, and ``env``
    adds variables of its own.
    """
    environ = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    if pure_python:
        environ["GRADFLOW_PURE_PYTHON"] = "1"
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(body)], capture_output=True,
        text=True, timeout=120, cwd=ROOT, env=environ,
    )


def output_lines(body, pure_python=False, **env):
    """Return the stdout lines of ``run_python``, after checking that it exited with 0."""
    result = run_python(body, pure_python, **env)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.splitlines()
