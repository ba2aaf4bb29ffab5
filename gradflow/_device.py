"""Devices and the array module behind each one.

NumPy backs the CPU and CuPy backs CUDA devices. CuPy is imported only when
something asks about CUDA, and "CuPy is importable" is kept apart from "a
CUDA device is usable": a machine with CuPy but no driver or no GPU still
runs everything on the CPU and gets an error only when it asks for ``cuda``.
"""

import contextlib
import functools
import logging
import threading

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["Device", "device", "cupy_module", "cuda_is_available", "device_count"]


@functools.lru_cache(maxsize=1)
def cupy_module():
    """Return the ``cupy`` module, or None when it cannot be imported."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA library
        logger.debug("CuPy is not importable: %s", exc)
        return None
    return cupy


@functools.lru_cache(maxsize=1)
def _cuda_probe():
    """Return (device count, reason) after trying one allocation on GPU 0."""
    cupy = cupy_module()
    if cupy is None:
        return 0, "CuPy is not installed (pip install 'gradflow[cuda12]' or [cuda13])"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
        if count == 0:
            return 0, "CuPy found no CUDA device"
        with cupy.cuda.Device(0):
            cupy.zeros(1, dtype=cupy.float32).sum().item()
    except Exception as exc:  # driver missing, no GPU, broken runtime
        return 0, f"CuPy is installed but CUDA is not usable: {exc}"
    return count, ""


def cuda_is_available():
    """Return True when CuPy is importable and can allocate on a GPU."""
    return _cuda_probe()[0] > 0


def device_count():
    """Return the number of usable CUDA devices (0 without CuPy or a GPU)."""
    return _cuda_probe()[0]


class Device:
    """A place where tensors live: ``cpu`` or ``cuda:N``.

    ``Device.xp`` is the array module for that place (numpy or cupy).
    """

    __slots__ = ("type", "index")

    def __init__(self, type, index=None):
        self.type = type
        self.index = index

    @property
    def xp(self):
        if self.type == "cpu":
            return np
        return _require_cupy(self)

    def __eq__(self, other):
        if isinstance(other, str):
            other = device(other)
        if not isinstance(other, Device):
            return NotImplemented
        return self.type == other.type and self.index == other.index

    def __hash__(self):
        return hash((self.type, self.index))

    def __repr__(self):
        return f"device(type='{self.type}', index={self.index})"

    def __str__(self):
        return self.type if self.index is None else f"{self.type}:{self.index}"

    def __enter__(self):
        # Lets ``with gf.device("cuda:1"):`` select CuPy's current device.
        # The CuPy device goes on a per-thread stack, not on this object,
        # which other threads and nested blocks share.
        if self.type == "cuda":
            cupy_device = _require_cupy(self).cuda.Device(self.index)
            cupy_device.__enter__()
            _entered_cuda_devices().append(cupy_device)
        return self

    def __exit__(self, *exc_info):
        if self.type == "cuda":
            _entered_cuda_devices().pop().__exit__(*exc_info)
        return False


CPU = Device("cpu")

_thread_state = threading.local()


def _entered_cuda_devices():
    """Return this thread's stack of CuPy devices entered by ``with gf.device``."""
    stack = getattr(_thread_state, "cuda_devices", None)
    if stack is None:
        stack = _thread_state.cuda_devices = []
    return stack


def _require_cupy(dev):
    count, reason = _cuda_probe()
    if count == 0:
        raise RuntimeError(
            f"device '{dev}' was requested but CUDA is not usable: {reason}. "
            "Use device='cpu', or device='auto' to fall back to the CPU."
        )
    if dev.index is not None and dev.index >= count:
        raise RuntimeError(
            f"device '{dev}' was requested but only {count} CUDA device(s) "
            f"exist (valid indices 0..{count - 1})."
        )
    return cupy_module()


@functools.lru_cache(maxsize=64)
def _parse(spec):
    if spec == "cpu":
        return CPU
    if spec == "auto":
        return Device("cuda", 0) if cuda_is_available() else CPU
    kind, _, index = spec.partition(":")
    if kind == "cuda" and (not index or index.isdigit()):
        return Device("cuda", int(index) if index else 0)
    raise ValueError(
        f"invalid device string {spec!r}: expected 'cpu', 'cuda', 'cuda:N' "
        "or 'auto'"
    )


def device(spec="cpu"):
    """Parse ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` into a Device.

    ``"auto"`` is the first GPU when CuPy can allocate on one, else the CPU.
    A Device passes through unchanged.

    >>> gf.device("cpu")
    device(type='cpu', index=None)
    """
    if isinstance(spec, Device):
        return spec
    if not isinstance(spec, str):
        raise TypeError(
            f"device must be a string or gradflow.Device, got {type(spec).__name__}"
        )
    return _parse(spec.strip().lower())


def device_of_array(array):
    """Return the Device that holds ``array`` (a NumPy or CuPy array)."""
    if isinstance(array, np.ndarray):
        return CPU
    return Device("cuda", array.device.id)


def on_device_of(array):
    """Return a context manager that makes ``array``'s device current."""
    if isinstance(array, np.ndarray):
        return contextlib.nullcontext()
    return array.device


def array_module(array):
    """Return numpy or cupy, whichever owns ``array``."""
    if isinstance(array, np.ndarray):
        return np
    return cupy_module()
