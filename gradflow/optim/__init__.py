"""Optimizers that update parameters from their gradients, and LR schedulers.

>>> opt = gf.optim.Adam(model.parameters(), lr=1e-3)
>>> sched = gf.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
"""

from . import lr_scheduler
from ._adam import Adam, AdamW
from ._optimizer import Optimizer
from ._sgd import SGD

__all__ = ["Adam", "AdamW", "Optimizer", "SGD", "lr_scheduler"]
