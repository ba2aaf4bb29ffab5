"""CUDA queries: whether a GPU is usable, how many, and synchronization."""

from ._device import cuda_is_available, device_count, cupy_module

__all__ = ["is_available", "device_count", "synchronize", "is_cupy_importable"]


def is_available():
    """Return True when CuPy is importable and can allocate on a GPU."""
    return cuda_is_available()


def is_cupy_importable():
    """Return True when ``import cupy`` works, whether or not a GPU is usable."""
    return cupy_module() is not None


def synchronize(device=None):
    """Wait until all work queued on the CUDA device has finished."""
    from ._device import device as parse

    dev = parse(device or "cuda")
    with dev:
        dev.xp.cuda.get_current_stream().synchronize()



