"""A collection that runs in the middle of the C bookkeeping (gradflow._C).

On Python 3.11 the cyclic collector can run inside any allocation of a
container object, and the __del__ methods it calls may switch record
tracking on. Each case runs in a fresh interpreter, because record
tracking is process-wide and one-way.
"""

import os

import pytest

from fresh_python import output_lines
from gradflow import _fastpath

pytestmark = pytest.mark.skipif(_fastpath.extension is None,
                                reason="runs without gradflow._C")


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
    # normally. On the C path the collection can run between the steps
    # that record the op in C, after which tracking is on, and the op must
    # finish there too.
    lines = output_lines(_COLLECTION_SWEEP)
    assert lines[-1] == "[]", "thresholds whose child crashed"
