"""Shared fixtures: the device every device-aware test runs on, and fixed seeds."""

import os


def _real_gpu_usable():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # CuPy missing, no driver, or a broken CUDA install
        return False


# Without a GPU the CUDA kernels run under Numba's simulator. Numba reads
# this variable once, at its first import, so it is set before anything
# imports numba; an explicit setting from the environment wins.
if "NUMBA_ENABLE_CUDASIM" not in os.environ and not _real_gpu_usable():
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
# The tests launch kernels on tiny arrays on purpose; on a real GPU Numba
# would warn about low occupancy, and warnings are errors here.
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import gradflow as gf  # noqa: E402


def _device_params():
    reason = "no usable CUDA device (CuPy missing, no driver or no GPU)"
    return [
        pytest.param("cpu", id="cpu"),
        pytest.param(
            "cuda", id="cuda",
            marks=pytest.mark.skipif(not gf.cuda.is_available(), reason=reason),
        ),
    ]


@pytest.fixture(params=_device_params())
def device(request):
    """Each test that takes ``device`` runs on the CPU and, when usable, on CUDA."""
    return gf.device(request.param)


@pytest.fixture(autouse=True)
def _fixed_seeds():
    gf.manual_seed(0)
    np.random.seed(0)


def to_host(value):
    """Return a gradflow Tensor or array as a NumPy array."""
    if isinstance(value, gf.Tensor):
        value = value.data
    return value if isinstance(value, np.ndarray) else value.get()
