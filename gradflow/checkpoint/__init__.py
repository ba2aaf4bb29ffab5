"""Gradient checkpointing: trade recomputation in backward for memory.

``gradflow.checkpoint`` is this module and is also callable:
``gf.checkpoint(fn, *args)`` is ``gf.checkpoint.checkpoint(fn, *args)``.

* ``checkpoint``: one region, recomputed once in backward.
* ``checkpoint_sequential``: a chain of layers in equal segments.
* ``Policy``: keep the outputs of chosen ops (matrix products by default).
* ``checkpoint_plan``: a schedule chosen to fit a memory budget.
* ``is_recomputing``: True while a region's forward runs again in backward.
"""

import sys
import types

from ._plan import CheckpointPlan, checkpoint_plan
from ._policy import Policy
from ._region import checkpoint, is_recomputing, recompute_count
from ._revolve import binomial_forward_count, binomial_schedule
from ._sequential import checkpoint_sequential, segment_bounds

__all__ = [
    "CheckpointPlan", "Policy", "binomial_forward_count", "binomial_schedule",
    "checkpoint", "checkpoint_plan", "checkpoint_sequential", "is_recomputing",
    "recompute_count", "segment_bounds",
]


class _CallableModule(types.ModuleType):
    def __call__(self, fn, *args, **kwargs):
        return checkpoint(fn, *args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
