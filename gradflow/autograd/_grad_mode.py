"""Switches that turn the recording of operations on and off."""

import functools
import threading

from .._fastpath import extension

__all__ = ["no_grad", "enable_grad", "set_grad_enabled", "is_grad_enabled"]

_state = threading.local()


def is_grad_enabled():
    """Return True when new operations are recorded for backward."""
    return getattr(_state, "enabled", True)


def _set_enabled(mode):
    _state.enabled = mode


if extension is not None:
    # The C ops read the flag on every call, so it lives in the extension
    # (one per thread, as here).
    is_grad_enabled = extension.is_grad_enabled  # noqa: F811
    _set_enabled = extension.set_grad_enabled  # noqa: F811


class _GradMode:
    """Base of the grad-mode switches: a context manager and a decorator.

    The previous mode is restored on exit, also when the block raises, so
    switches nest the way ``with`` blocks do.
    """

    mode = True

    def __enter__(self):
        self._previous = is_grad_enabled()
        _set_enabled(self.mode)
        return self

    def __exit__(self, *exc_info):
        _set_enabled(self._previous)
        return False

    def __call__(self, fn):
        mode = self.mode

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            # Each call saves its own previous mode, so a decorated function
            # may recurse or run in several threads.
            previous = is_grad_enabled()
            _set_enabled(mode)
            try:
                return fn(*args, **kwargs)
            finally:
                _set_enabled(previous)

        return wrapper


class no_grad(_GradMode):
    """Run a block, or a decorated function, without recording operations.

    >>> with gf.no_grad():
    ...     y = w * 2   # y.requires_grad is False
    """

    mode = False


class enable_grad(_GradMode):
    """Record operations inside a block even where an outer no_grad is active."""

    mode = True


class set_grad_enabled(_GradMode):
    """Set recording on or off for a block; also usable as a plain call.

    ``gf.set_grad_enabled(False)`` on its own turns recording off until
    turned back on, as PyTorch's function of that name does.
    """

    def __init__(self, mode):
        if not isinstance(mode, bool):
            raise TypeError(f"set_grad_enabled expects a bool, got {mode!r}")
        self.mode = mode
        self._previous = is_grad_enabled()
        _set_enabled(mode)

    def __enter__(self):
        return self

    def __call__(self, fn):
        # Used as a decorator, the switch applies to each call only, so the
        # mode set by __init__ at decoration time is undone here.
        _set_enabled(self._previous)
        return super().__call__(fn)
