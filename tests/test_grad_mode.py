"""no_grad, enable_grad and set_grad_enabled: context managers, decorators, calls."""

import threading

import pytest

import gradflow as gf


@pytest.fixture
def x(device):
    return gf.tensor([1.0, 2.0], device=device, requires_grad=True)


@pytest.fixture(autouse=True)
def _grad_mode_restored():
    yield
    enabled = gf.is_grad_enabled()
    gf.set_grad_enabled(True)
    assert enabled, "a test left grad recording off"


def test_recording_on_by_default(x):
    assert gf.is_grad_enabled()
    assert (x * 2).requires_grad


def test_no_grad_block(x):
    with gf.no_grad():
        y = x * 2
        assert not gf.is_grad_enabled()
    assert not y.requires_grad
    assert y.grad_fn is None
    assert gf.is_grad_enabled()


def test_no_grad_decorator(x):
    @gf.no_grad()
    def double(t):
        return t * 2

    assert not double(x).requires_grad
    assert gf.is_grad_enabled()


def test_no_grad_decorator_keeps_name():
    @gf.no_grad()
    def step():
        """Take one step."""

    assert step.__name__ == "step"
    assert step.__doc__ == "Take one step."


def test_enable_grad_inside_no_grad(x):
    with gf.no_grad():
        with gf.enable_grad():
            y = x * 2
        z = x * 2
        assert not gf.is_grad_enabled()
    assert y.requires_grad
    assert not z.requires_grad


def test_enable_grad_decorator(x):
    @gf.enable_grad()
    def double(t):
        return t * 2

    with gf.no_grad():
        y = double(x)
        assert not gf.is_grad_enabled()
    assert y.requires_grad


def test_nested_no_grad_restores_outer():
    with gf.no_grad():
        with gf.no_grad():
            pass
        assert not gf.is_grad_enabled()
    assert gf.is_grad_enabled()


def test_no_grad_restored_after_exception():
    with pytest.raises(KeyError):
        with gf.no_grad():
            raise KeyError("inside")
    assert gf.is_grad_enabled()


def test_enable_grad_restored_after_exception():
    with gf.no_grad():
        with pytest.raises(KeyError):
            with gf.enable_grad():
                raise KeyError("inside")
        assert not gf.is_grad_enabled()


def test_decorator_restored_after_exception():
    @gf.no_grad()
    def fail():
        raise KeyError("inside")

    with pytest.raises(KeyError):
        fail()
    assert gf.is_grad_enabled()


@pytest.mark.parametrize("mode", [True, False])
def test_set_grad_enabled_block(mode, x):
    with gf.set_grad_enabled(mode):
        assert gf.is_grad_enabled() is mode
        y = x * 2
    assert y.requires_grad is mode
    assert gf.is_grad_enabled()


def test_set_grad_enabled_block_inside_no_grad():
    with gf.no_grad():
        with gf.set_grad_enabled(True):
            assert gf.is_grad_enabled()
        assert not gf.is_grad_enabled()


def test_set_grad_enabled_restored_after_exception():
    with pytest.raises(KeyError):
        with gf.set_grad_enabled(False):
            raise KeyError("inside")
    assert gf.is_grad_enabled()


def test_set_grad_enabled_as_call(x):
    gf.set_grad_enabled(False)
    try:
        assert not gf.is_grad_enabled()
        assert not (x * 2).requires_grad
    finally:
        gf.set_grad_enabled(True)
    assert (x * 2).requires_grad


def test_set_grad_enabled_decorator(x):
    @gf.set_grad_enabled(False)
    def double(t):
        return t * 2

    assert gf.is_grad_enabled()
    assert not double(x).requires_grad
    assert gf.is_grad_enabled()


def test_set_grad_enabled_rejects_non_bool():
    with pytest.raises(TypeError, match="expects a bool"):
        gf.set_grad_enabled(1)


def test_recursive_decorated_function(x):
    @gf.no_grad()
    def depth(n):
        return 0 if n == 0 else 1 + depth(n - 1)

    assert depth(3) == 3
    assert gf.is_grad_enabled()


def test_grad_mode_is_per_thread():
    seen = []
    with gf.no_grad():
        worker = threading.Thread(target=lambda: seen.append(gf.is_grad_enabled()))
        worker.start()
        worker.join()
    assert seen == [True]


def test_backward_inside_no_grad(x):
    y = (x * x).sum()
    with gf.no_grad():
        y.backward()
    assert x.grad.tolist() == [2.0, 4.0]


def test_autograd_namespace_exports():
    assert gf.autograd.no_grad is gf.no_grad
    assert gf.autograd.set_grad_enabled is gf.set_grad_enabled
