"""gradflow: a tape-based reverse-mode autograd on NumPy (CPU) and CuPy (CUDA).

>>> import gradflow as gf
>>> x = gf.tensor([1.0, 2.0, 3.0], requires_grad=True)
>>> (x * x).sum().backward()
>>> x.grad
tensor([2., 4., 6.])
"""

import numpy as _np

from . import _tensor_methods  # noqa: F401  (installs Tensor's operators)
from . import autograd, cuda, data, nn, optim
from ._device import Device, device
from ._factories import (
    arange, empty, eye, full, full_like, linspace, ones, ones_like, rand,
    rand_like, randint, randn, randn_like, randperm, zeros, zeros_like,
)
from ._ops import *  # noqa: F401,F403
from ._ops import __all__ as _ops_all
from ._random import get_rng_state, manual_seed, seed, set_rng_state
from ._serialization import load, save
from ._tensor import Tensor, as_tensor, from_dlpack, from_numpy, tensor
from .autograd import (
    enable_grad, grad, gradcheck, is_grad_enabled, no_grad, set_grad_enabled,
)
from .errors import (
    AnomalyError, GraphError, GraphFreedError, InplaceModificationError,
    PerformanceWarning,
)
from . import anomaly
from .anomaly import detect_anomaly, is_anomaly_enabled, set_detect_anomaly
# gradflow.checkpoint is a callable module: gf.checkpoint(fn, *args).
from . import checkpoint, memory
from .checkpoint import checkpoint_plan, checkpoint_sequential
from . import _fastpath

_fastpath.bind()

float16 = half = _np.dtype(_np.float16)
float32 = float = _np.dtype(_np.float32)
float64 = double = _np.dtype(_np.float64)
int8 = _np.dtype(_np.int8)
int16 = _np.dtype(_np.int16)
int32 = int = _np.dtype(_np.int32)
int64 = long = _np.dtype(_np.int64)
uint8 = _np.dtype(_np.uint8)
bool_ = bool = _np.dtype(_np.bool_)

__version__ = "0.1.0"

__all__ = [
    "Device", "GraphError", "GraphFreedError", "InplaceModificationError",
    "PerformanceWarning", "Tensor", "arange", "as_tensor", "autograd", "cuda",
    "data", "load", "nn", "optim", "save",
    "AnomalyError", "anomaly", "detect_anomaly", "is_anomaly_enabled",
    "set_detect_anomaly",
    "checkpoint", "checkpoint_plan", "checkpoint_sequential", "memory",
    "device", "empty", "enable_grad", "eye", "from_dlpack", "from_numpy", "full",
    "full_like", "get_rng_state", "grad", "gradcheck", "is_grad_enabled",
    "linspace", "manual_seed", "no_grad", "ones", "ones_like", "rand",
    "rand_like", "randint", "randn", "randn_like", "randperm", "seed",
    "set_grad_enabled", "set_rng_state", "tensor", "zeros", "zeros_like",
    "float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8",
    "bool_",
] + list(_ops_all)
