"""Device parsing, CUDA availability, moves between devices, and seeded draws."""

import types

import numpy as np
import pytest

import gradflow as gf
from conftest import to_host

needs_no_gpu = pytest.mark.skipif(
    gf.cuda.is_available(), reason="checks the behaviour without a usable GPU"
)


# -- parsing ------------------------------------------------------------------


def test_parse_cpu():
    dev = gf.device("cpu")
    assert dev.type == "cpu"
    assert dev.index is None
    assert str(dev) == "cpu"
    assert dev.xp is np


@pytest.mark.parametrize("spec, index", [("cuda", 0), ("cuda:0", 0), ("cuda:3", 3),
                                         (" CUDA:1 ", 1)])
def test_parse_cuda(spec, index):
    dev = gf.device(spec)
    assert dev.type == "cuda"
    assert dev.index == index
    assert str(dev) == f"cuda:{index}"


def test_parse_auto():
    expected = "cuda:0" if gf.cuda.is_available() else "cpu"
    assert gf.device("auto") == expected


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cuda:-1", "", "cpu:0", "cuda:1:2"])
def test_parse_invalid_string(spec):
    with pytest.raises(ValueError, match="invalid device string"):
        gf.device(spec)


def test_invalid_message_lists_choices():
    with pytest.raises(ValueError, match="'cpu', 'cuda', 'cuda:N' or 'auto'"):
        gf.device("tpu")


def test_parse_non_string_raises():
    with pytest.raises(TypeError, match="got int"):
        gf.device(0)


def test_device_passes_through():
    dev = gf.device("cuda:2")
    assert gf.device(dev) is dev


def test_device_equality_and_hash():
    assert gf.device("cuda") == gf.device("cuda:0")
    assert gf.device("cuda:0") == "cuda:0"
    assert gf.device("cpu") != gf.device("cuda")
    assert len({gf.device("cuda"), gf.device("cuda:0")}) == 1


def test_device_repr():
    assert repr(gf.device("cuda:1")) == "device(type='cuda', index=1)"


def test_tensor_device_property(device):
    assert gf.zeros(2, device=device).device == device
    assert gf.tensor([1.0], device=device).device == device


def test_cpu_device_as_context():
    with gf.device("cpu") as dev:
        assert dev == "cpu"


def test_cuda_device_context_nests(monkeypatch):
    # A stand-in for CuPy records which devices the blocks select, so the
    # nesting runs without a GPU.
    events = []

    class FakeCupyDevice:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            events.append(("enter", self.index))

        def __exit__(self, *exc_info):
            events.append(("exit", self.index))

    fake_cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(Device=FakeCupyDevice))
    monkeypatch.setattr(gf._device, "_require_cupy", lambda dev: fake_cupy)
    outer = gf.device("cuda:1")
    with outer:
        with gf.device("cuda:0"):
            with outer:
                pass
    assert events == [("enter", 1), ("enter", 0), ("enter", 1),
                      ("exit", 1), ("exit", 0), ("exit", 1)]


# -- without a GPU ------------------------------------------------------------


def test_availability_matches_device_count():
    assert gf.cuda.is_available() == (gf.cuda.device_count() > 0)


@needs_no_gpu
def test_cuda_unavailable_here():
    assert not gf.cuda.is_available()
    assert gf.cuda.device_count() == 0


@needs_no_gpu
@pytest.mark.parametrize("create", [
    lambda: gf.zeros(2, device="cuda"),
    lambda: gf.tensor([1.0], device="cuda:0"),
    lambda: gf.randn(2, device="cuda"),
    lambda: gf.randperm(4, device="cuda"),
    lambda: gf.zeros(2).to("cuda"),
    lambda: gf.zeros(2).cuda(),
    lambda: gf.device("cuda").xp,
])
def test_cuda_request_without_gpu_raises(create):
    with pytest.raises(RuntimeError, match="CUDA is not usable") as info:
        create()
    assert "device='auto' to fall back to the CPU" in str(info.value)


# -- moves and mixed devices --------------------------------------------------


def test_move_is_differentiable(device):
    x = gf.tensor([1.0, 2.0], dtype=gf.float64, requires_grad=True)
    moved = x.to(device)
    assert moved.device == device
    (moved * 3).sum().backward()
    assert x.grad.device == gf.device("cpu")
    np.testing.assert_array_equal(to_host(x.grad), [3.0, 3.0])


def test_cpu_round_trip_keeps_values(device):
    t = gf.tensor([1.5, -2.0], device=device)
    assert t.cpu().tolist() == [1.5, -2.0]
    assert t.cpu().device == "cpu"


def test_mixed_devices_raise(device):
    if device.type == "cpu":
        pytest.skip("needs a CUDA device to mix with the CPU")
    a = gf.ones(2, device=device)
    b = gf.ones(2, device="cpu")
    message = "expected all tensors on one device"
    with pytest.raises(RuntimeError, match=message) as info:
        a + b
    assert str(device) in str(info.value)
    assert "cpu" in str(info.value)


def test_mixed_devices_in_matmul_raise(device):
    if device.type == "cpu":
        pytest.skip("needs a CUDA device to mix with the CPU")
    a = gf.ones(2, 2, device=device)
    b = gf.ones(2, 2, device="cpu")
    with pytest.raises(RuntimeError, match="MatMul: expected all tensors"):
        a @ b


# -- seeded draws -------------------------------------------------------------


def _draws(device):
    return [
        to_host(gf.randn(5, device=device)),
        to_host(gf.rand(5, device=device)),
        to_host(gf.randint(0, 100, size=(5,), device=device)),
        to_host(gf.randperm(7, device=device)),
    ]


def test_manual_seed_reproduces_draws(device):
    gf.manual_seed(123)
    first = _draws(device)
    gf.manual_seed(123)
    second = _draws(device)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_different_seeds_differ(device):
    gf.manual_seed(1)
    first = to_host(gf.randn(8, device=device))
    gf.manual_seed(2)
    second = to_host(gf.randn(8, device=device))
    assert not np.array_equal(first, second)


def test_successive_draws_differ(device):
    first = to_host(gf.randn(8, device=device))
    second = to_host(gf.randn(8, device=device))
    assert not np.array_equal(first, second)


def test_rng_state_round_trip(device):
    state = gf.get_rng_state(device)
    first = to_host(gf.rand(4, device=device))
    gf.set_rng_state(state, device)
    second = to_host(gf.rand(4, device=device))
    np.testing.assert_array_equal(first, second)


def test_random_dtype(device):
    assert gf.randn(3, dtype=gf.float64, device=device).dtype == gf.float64
    assert gf.rand(3, dtype=gf.float16, device=device).dtype == gf.float16


@pytest.mark.parametrize("seed", [-1, 1.5, "0"])
def test_manual_seed_rejects_invalid(seed):
    with pytest.raises(ValueError, match="non-negative int"):
        gf.manual_seed(seed)
